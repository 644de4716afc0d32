"""Nightly retraining that never ships a worse model (`python -m train.nightly`, docs/nightly.md).

__main__.py     the CLI: run, status, rollback, prune; exit codes
night.py        one night, top to bottom, and the other verbs
inputs.py       what a night would train on, as one sha256 (seconds, no torch)
scores.py       the eval set, each model's scores on it (convert/score.py), the gates
report.py       outputs/<run>/nightly.md + nightly_scores.png, and `status`
retention.py    what is kept and what is deleted

Training, export and verification are python -m train's (train/run.py); publication and rollback are every
promotion's (core/releases.py).
"""
