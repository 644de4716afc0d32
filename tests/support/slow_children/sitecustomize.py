"""Test hook, on PYTHONPATH only in the tests that put it there (tests/cli/test_interrupts.py, test_distributed.py):
holds one stage of an export for TEST_SLOW_CHILD seconds, so that a test's signal lands while that stage runs.
Each held process appends its pid to the file TEST_SLOW_CHILD_PIDS when the hold starts: the test signals then, and
can check afterwards that no child outlived the interrupt. Production code never sees it.

TEST_SLOW_CHILD_KIND says which stage:
  "convert", "quantize"  the llama.cpp child process waits before it starts: the converter, run directly or through
                         convert/converter_child.py; llama-quantize, a binary, so the test puts a Python stand-in
                         of that name in front of it, which execs the real tool once this hook has run
  "merge", "score"       in the export's own process, the first core.signals.deferred() block entered from
                         convert.merge (reading a tensor) or convert.score (a llama.cpp call) waits inside the block
                         until a stop signal is pending, as native code runs on until its call returns
"""

import contextlib
import os
import sys
import time

_kind = os.environ.get("TEST_SLOW_CHILD_KIND", "")
_on = bool(os.environ.get("TEST_SLOW_CHILD"))  # "0": no wait, the pid still recorded (test_distributed.py)
_seconds = float(os.environ.get("TEST_SLOW_CHILD") or 0)


def _started() -> None:
    with open(os.environ["TEST_SLOW_CHILD_PIDS"], "a") as pids:
        pids.write(f"{os.getpid()}\n")


_is_child = (_kind == "quantize" and os.path.basename(sys.argv[0]) == "llama-quantize") or (
    _kind == "convert" and sys.argv[0].endswith(("convert_hf_to_gguf.py", "converter_child.py"))
)
if _on and _is_child:
    _started()
    time.sleep(_seconds)

if _on and _kind in ("merge", "score"):
    from core import signals

    _real_deferred = signals.deferred
    _module = f"convert.{_kind}"
    _held = []

    @contextlib.contextmanager
    def _hold(block):
        with block:
            _started()
            deadline = time.monotonic() + _seconds
            while signals.pending() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            yield

    def _deferred():
        if not _held and sys._getframe(1).f_globals.get("__name__") == _module:
            _held.append(True)
            return _hold(_real_deferred())
        return _real_deferred()

    signals.deferred = _deferred
