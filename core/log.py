"""What the CLIs print goes through `logging`: modules log, the entry point decides where it goes.

The CLIs send our packages' records as bare messages: errors to stderr, everything else to stdout (what a
user pipes or greps). Libraries and tests that import the modules get no handler from us.
"""

from __future__ import annotations

import logging
import sys

PACKAGES = ("core", "train", "convert")


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def setup_cli_logging(level: int = logging.INFO) -> None:
    """Route our loggers to stdout (below ERROR) and stderr (ERROR and above), message only."""
    fmt = logging.Formatter("%(message)s")
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_BelowError())
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.ERROR)
    for handler in (out, err):
        handler.setFormatter(fmt)
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers[:] = [out, err]
        logger.setLevel(level)
