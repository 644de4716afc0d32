"""CLI processes that a test signals, kills or holds, their output in a file (a pipe could fill and block), stopped
when a line or a logged step shows they reached the stage under test. `start` starts `python -m ...` as a user does,
for the tests where the interpreter's start is part of the point (a second process beside a held one, torchrun);
`start_forked` runs the command in a fork of the CLI server (tests/conftest.py `cli`): a process of its own that
receives the signal, without the seconds of imports. Every other CLI call is `cli.run`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}  # what a stopped CLI exits with


class Proc:
    """A running `python -m <module> <args>` and the file its stdout and stderr go to."""

    def __init__(self, popen: subprocess.Popen, log: Path):
        self.popen, self.log = popen, log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text()


def new_log(cwd: Path, module: str) -> Path:
    """An empty <module>-<n>.out in cwd for a command's output (empty, so a test may read it before the command
    writes)."""
    log = cwd / f"{module}-{len(list(cwd.glob('*.out')))}.out"
    log.touch()
    return log


def start(
    cwd: Path,
    hf_home: Path,
    module: str,
    args: list[str],
    env: dict[str, str] | None = None,
    path_first: Path | None = None,
) -> Proc:
    """`python -m module args` in cwd; `env` is added to its environment, `path_first` goes first on its PYTHONPATH
    (and its children's: the slow-children hook)."""
    log = new_log(cwd, module)
    environ = cli_env(hf_home) | (env or {})
    if path_first is not None:
        environ["PYTHONPATH"] = os.pathsep.join([str(path_first), environ["PYTHONPATH"]])
    with open(log, "w") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=cwd, env=environ, stdout=out, stderr=subprocess.STDOUT
        )
    return Proc(popen, log)


def start_forked(
    cli, cwd: Path, module: str, args: list[str], env: dict[str, str] | None = None, hook: Path | None = None
) -> Proc:
    """`python -m module args` in cwd, run in a fork of the CLI server; `env` is added to its environment; `hook`:
    a slow_children folder, run in the fork as its sitecustomize.py and first on its children's PYTHONPATH."""
    log = new_log(cwd, module)
    env = dict(env or {})
    if hook is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(hook), str(ROOT)])  # the server's own is ROOT (cli_env)
    request = {"module": module, "args": args, "cwd": str(cwd), "stdout": str(log), "stderr": str(log), "env": env}
    cli.send(request | {"detach": True, "hook": str(hook / "sitecustomize.py") if hook else None})
    reply = cli.reply()
    assert "pid" in reply, f"the CLI server answered {reply} to a detached start"
    cli.detached = Detached(cli, reply["pid"])
    return Proc(cli.detached, log)  # type: ignore[arg-type]


class Detached:
    """What the helpers here use of a Popen, for a command the CLI server runs detached: it is the server's child,
    so its end is seen in /proc and its exit status read from the server's reply."""

    def __init__(self, cli, pid: int):
        self.cli, self.pid, self.returncode = cli, pid, None

    def poll(self) -> int | None:
        if self.returncode is None and not alive(self.pid):
            self.returncode = self.cli.reply()["returncode"]
            self.cli.detached = None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.02)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def wait_until(proc: Proc, ready: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """Poll until ready(); fail (and kill the process) if it ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.popen.poll() is not None:
            pytest.fail(f"ended (rc {proc.popen.returncode}) before {what}:\n{proc.output()[-3000:]}")
        if time.monotonic() > deadline:
            proc.popen.kill()
            proc.popen.wait()
            pytest.fail(f"no {what} within {timeout} s:\n{proc.output()[-3000:]}")
        time.sleep(0.02)


def wait_for_line(proc: Proc, text: str, timeout: float = 300) -> None:
    wait_until(proc, lambda: text in proc.output(), repr(text), timeout)


def logged_steps(metrics: Path) -> list[int]:
    """The steps metrics.jsonl logged a training loss for (a line being written is left out)."""
    rows = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return [r["step"] for r in rows if "loss" in r]


def wait_for_step(proc: Proc, metrics: Path, step: int, timeout: float = 300) -> None:
    wait_until(proc, lambda: max(logged_steps(metrics), default=0) >= step, f"step {step}", timeout)


def stop(proc: Proc, sig: signal.Signals, timeout: float = 120) -> tuple[str, float]:
    """Send sig and wait for the process to end; (its output, seconds from the signal to its exit). Asserts the exit
    status a CLI stopped by sig must have, and, for SIGINT/SIGTERM, that it ended without a traceback."""
    sent = time.monotonic()
    proc.popen.send_signal(sig)
    proc.popen.wait(timeout=timeout)
    seconds = time.monotonic() - sent
    out = proc.output()
    assert proc.popen.returncode == EXIT[sig], out[-3000:]
    if sig != signal.SIGKILL:
        assert "Traceback" not in out, out[-3000:]
    return out, seconds


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, ended but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
