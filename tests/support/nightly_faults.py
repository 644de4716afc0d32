"""Crash and pause points for the nightly tests: `python -m tests.support.nightly_faults ...` is
`python -m train.nightly ...` with train.nightly.promote.reached (a no-op at each named point of a promotion)
replaced. Production code never imports this module.

  NIGHTLY_TEST_KILL_AT=<point>   SIGKILL this process at that point (before_copy, after_copy, before_switch,
                                 between_renames, before_record): no handler, no cleanup, as the OOM killer
  NIGHTLY_TEST_PAUSE_S=<s>       sleep s seconds at every point, so that a reader polling the live files
                                 sees the promotion in each of its states
  NIGHTLY_TEST_HOLD_AT=<point>   at that point, wait until the file NIGHTLY_TEST_RELEASE names exists (the
                                 job holds its lock meanwhile: a test starts a second job, then releases it)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from train.nightly import promote
from train.nightly.__main__ import main as nightly_main

KILL_AT = "NIGHTLY_TEST_KILL_AT"
PAUSE_S = "NIGHTLY_TEST_PAUSE_S"
HOLD_AT, RELEASE = "NIGHTLY_TEST_HOLD_AT", "NIGHTLY_TEST_RELEASE"
POINTS = ("before_copy", "after_copy", "before_switch", "between_renames", "before_record")


def reached(point: str) -> None:
    assert point in POINTS, f"unknown promotion point {point!r}: update POINTS and the tests"
    print(f"[nightly_faults] reached {point}", flush=True)
    if os.environ.get(KILL_AT) == point:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(os.environ.get(PAUSE_S) or 0))
    if os.environ.get(HOLD_AT) == point:
        release = Path(os.environ[RELEASE])
        while not release.exists():
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    promote.reached = reached
    return nightly_main(argv)


if __name__ == "__main__":
    sys.exit(main())
