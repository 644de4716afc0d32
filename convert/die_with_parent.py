"""Become a command after asking the kernel to SIGKILL this process when its parent dies.

    python -I -S die_with_parent.py PARENT_PID COMMAND [ARGUMENTS...]

run_child (convert/llamacpp.py) starts every llama.cpp child through this, so that a SIGKILLed export leaves no
child writing the temporary GGUF a rerun writes too. prctl(PR_SET_PDEATHSIG) must be asked between fork and exec;
subprocess's preexec_fn could, but it runs Python in a fork of a threaded process (deadlock-prone) and forces fork()
over vfork() (docs/operations.md, "Kill"). exec keeps the request (prctl(2)). Linux only; -I: imports nothing of ours.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main() -> None:
    parent, *cmd = sys.argv[1:]
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG, SIGKILL) failed")
    # A parent that died before the request sends nothing: this process already belongs to another.
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGKILL)
    os.execvp(cmd[0], cmd)  # execvp: a bare name is looked up on PATH, as subprocess would


if __name__ == "__main__":
    main()
