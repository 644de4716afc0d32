"""What the CLIs print goes through `logging`: modules log, the entry point decides where it goes.

The CLIs send our packages' records as bare messages: errors to stderr, everything else to stdout (what a
user pipes or greps). Libraries and tests that import the modules get no handler from us.
"""

from __future__ import annotations

import logging
import sys

from core.errors import stdout_gone

PACKAGES = ("core", "train", "convert")


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


class _ToStdout(logging.StreamHandler):
    """stdout, until its reader goes away (`python -m train ... | head`): then the run goes on, quietly, instead of
    logging's "--- Logging error ---" traceback on every line. What the run does never depends on its console."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            stdout_gone()
            return
        super().handleError(record)


def setup_cli_logging(level: int = logging.INFO) -> None:
    """Route our loggers to stdout (below ERROR) and stderr (ERROR and above), message only."""
    fmt = logging.Formatter("%(message)s")
    out = _ToStdout(sys.stdout)
    out.addFilter(_BelowError())
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.ERROR)
    for handler in (out, err):
        handler.setFormatter(fmt)
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers[:] = [out, err]
        logger.setLevel(level)
    # PEFT imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16 its CPU backend warns, at
    # import, that it cannot download an optional kernel from the Hub (bitsandbytes/backends/cpu/ops.py). Offline
    # that is always so and changes nothing: its own fallback runs. Errors still show.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
