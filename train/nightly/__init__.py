"""Nightly retraining that never ships a worse model (`python -m train.nightly`, docs/nightly.md).

__main__.py     the CLI: run, status, rollback, prune; exit codes
night.py        one night, top to bottom, and the other verbs
fingerprint.py  what would be trained, as one sha256 (seconds, no torch)
candidate.py    train + export + verify the candidate into its run folder; score it and the champion
evaluate.py     the scores: HF loss, llama.cpp loss on the shipped GGUF, exact-match task checks
gates.py        thresholds and "no worse than the champion"; NaN or missing never passes
promote.py      atomic promotion (one rename), rollback, crash recovery
registry.py     models/finetuned/registry.jsonl: append + fsync, replayed into the history
retention.py    what is kept and what is deleted
report.py       outputs/<run>/nightly.md + nightly_scores.png, and `status`
places.py       where all of it lives
"""
