"""Test hook for tests/cli/test_interrupts.py, on PYTHONPATH only there: with TEST_SLOW_CHILD=<seconds>, the
llama.cpp child processes of an export (TEST_SLOW_CHILD_KIND: "convert": the converter, run directly or through
convert/converter_child.py; "quantize": llama-quantize, a binary, so the test puts a Python stand-in of that name in
front of it, which execs the real tool once this hook has run) wait that long before they start, so that a test can
interrupt the parent while the child runs. Each such child appends its pid to the file TEST_SLOW_CHILD_PIDS, so the
test can check that no child outlived the interrupt. Production code never sees it.
"""

import os
import sys
import time

_kind = os.environ.get("TEST_SLOW_CHILD_KIND", "")
_is_child = (_kind == "quantize" and os.path.basename(sys.argv[0]) == "llama-quantize") or (
    _kind == "convert" and sys.argv[0].endswith(("convert_hf_to_gguf.py", "converter_child.py"))
)
if os.environ.get("TEST_SLOW_CHILD") and _is_child:
    with open(os.environ["TEST_SLOW_CHILD_PIDS"], "a") as pids:
        pids.write(f"{os.getpid()}\n")
    time.sleep(float(os.environ["TEST_SLOW_CHILD"]))
