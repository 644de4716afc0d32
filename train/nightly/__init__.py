"""Nightly retraining that never ships a worse model (`python -m train.nightly`, docs/nightly.md; its modules:
docs/architecture.md). Training, export and verification are python -m train's (train/run.py); publication and
rollback are every promotion's (core/releases.py)."""
