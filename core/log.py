"""What the CLIs print goes through `logging`: modules log, the entry point decides where it goes (libraries and
tests that import the modules get no handler from us).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm

from core.errors import stdout_gone

PACKAGES = ("core", "train", "convert")
log = logging.getLogger(__name__)


class _ToStdout(logging.StreamHandler):
    """stdout, until its reader goes away (`... | head`): then the run goes on quietly, instead of logging's
    "--- Logging error ---" traceback on every line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            stdout_gone()
            return
        super().handleError(record)


def setup_cli_logging() -> None:
    """Route our loggers to stdout (below ERROR) and stderr (ERROR and above), message only."""
    out = _ToStdout(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.ERROR)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.ERROR)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers[:] = [out, err]
        logger.setLevel(logging.INFO)
    # bitsandbytes (imported by PEFT) warns on AVX512-BF16 CPUs that it cannot download an optional kernel: offline
    # that is always so and changes nothing (its fallback runs).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not on_terminal():
        # In a file or a pipe a bar is one line of thousands of carriage returns: the libraries' bars go (switches
        # read at their import, after this); ours and the Trainer's print a line per interval (progress()).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # huggingface_hub and transformers' loading
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def on_terminal() -> bool:
    """Whether progress goes to a terminal (bars) or to a file or pipe (a line per interval)."""
    return sys.stderr.isatty()


class _Lines:
    """A progress 'bar' for files and pipes: one log line every INTERVAL seconds and one at the end."""

    INTERVAL = 30.0

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.INTERVAL:
            self.last = time.monotonic()
            log.info(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit} ({self.n / max(self.total, 1):.0%})")

    def close(self) -> None:
        log.info(f"{self.desc}: {self.n:,} {self.unit} in {time.monotonic() - self.start:.0f} s")


def progress(total: int, desc: str, unit: str = "it"):
    """A bar (tqdm) on a terminal; elsewhere a line per interval. Both: update(n), close()."""
    return tqdm(total=total, desc=desc, unit=unit) if on_terminal() else _Lines(total, desc, unit)
