"""Both CLIs imported once, each command run in a fork: `python -m tests.support.cli_server` (tests only).

A `python -m train` process spends 7-9 s importing torch, transformers, peft and trl before it looks at its
input, so a table of sixty bad inputs spends most of its time starting interpreters. This server does what both
CLIs do before their first heavy import (`configure_cache_env`, in the working directory it starts in), imports
the commands once, then runs each request in a fork of itself: a real process with the request's working
directory, its own stdout and stderr (files) and exit status, running the CLI's real `main(argv)`. Nothing is
stubbed; the interpreter start and the imports are what is shared. Tests that need a process's start (signals
while it loads, imports ordered after the cache variables) keep starting `python -m ...` themselves.

Protocol, one JSON line each way on stdin/stdout:
    {"module": "train", "args": [...], "cwd": DIR, "stdout": FILE, "stderr": FILE, "timeout": SECONDS, "env": {...}}
    -> {"returncode": N}     (negative: killed by that signal; -9 after the timeout)
An optional "kill_at": POINT makes the command SIGKILL itself (no handler, no cleanup, as the OOM killer) when a
promotion reaches that point of core.releases.reached (after_stage, before_switch, between_renames).
"env" (optional) is added to the fork's environment before the command runs (the fault injection of
tests/support/faults.py, served as "tests.support.faults", is asked for that way); "hook" (optional) is a file the
fork runs next, before the command, as the interpreter would run a sitecustomize.py found first on PYTHONPATH (the
slow-stage hook of tests/support/slow_children). With "detach": true the server first replies {"pid": N}, so that
the test can signal the command while it runs, then {"returncode": N} when it ends; stdout and stderr may be one file.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import signal
import sys
import time
import traceback

from core.hub import configure_cache_env

configure_cache_env()  # as both CLIs' main() does before importing transformers
# Every command's stderr is a file (_child), so its main()'s setup_cli_logging (core/log.py) turns the libraries'
# progress bars off, through variables they read when imported: that is here, once for every command. Without
# this, "Loading weights" redrew itself with carriage returns into one line of ~600 characters per command.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
from convert.__main__ import main as convert_main  # noqa: E402
from convert.commands import cmd_export  # noqa: E402, F401 (the heavy imports the verbs make on first use)
from tests.support.faults import main as faults_main  # noqa: E402
from train.__main__ import main as train_main  # noqa: E402
from train.nightly.__main__ import main as nightly_main  # noqa: E402
from train.nightly.night import run_night  # noqa: E402, F401
from train.run import run  # noqa: E402, F401

MAINS = {
    "train": train_main,
    "convert": convert_main,
    "train.nightly": nightly_main,
    "tests.support.faults": faults_main,
}


def _child(request: dict) -> None:
    """In the fork: become the command, then leave with its exit status (never returns)."""
    code = 1
    try:
        os.environ.update(request.get("env") or {})
        os.chdir(request["cwd"])
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        same = request["stderr"] == request["stdout"]
        err = out if same else os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        if not same:
            os.close(err)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        if request.get("hook"):
            runpy.run_path(request["hook"])
        sys.argv = [f"python -m {request['module']}", *request["args"]]
        if request.get("kill_at"):
            from core import releases  # noqa: PLC0415

            point = request["kill_at"]
            releases.reached = lambda p: os.kill(os.getpid(), signal.SIGKILL) if p == point else None
        code = MAINS[request["module"]](request["args"])
    except SystemExit as e:  # argparse errors, sys.exit(...) inside the command
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # what `python -m` would print
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
                stream.flush()
        os._exit(code if isinstance(code, int) else 1)


def serve(requests, reply_fd: int) -> None:
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        if request.get("detach"):
            os.write(reply_fd, (json.dumps({"pid": pid}) + "\n").encode())
        deadline = time.monotonic() + float(request.get("timeout", 600))
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.05)
        os.write(reply_fd, (json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())


if __name__ == "__main__":
    reply = os.dup(1)  # replies go to the original stdout; anything else printed here goes to stderr
    os.dup2(2, 1)
    serve(sys.stdin, reply)
