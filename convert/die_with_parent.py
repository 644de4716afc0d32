"""Become a command after asking the kernel to SIGKILL this process when its parent dies.

    python -I -S die_with_parent.py PARENT_PID COMMAND [ARGUMENTS...]

run_child (convert/llamacpp.py) starts every llama.cpp child through this. A SIGKILL of the export (kill -9, the
OOM killer) runs none of the parent's cleanup, and a child left running would go on writing the temporary GGUF that
a rerun writes too. prctl(PR_SET_PDEATHSIG) acts on the calling process only, so the child must ask between fork
and exec. subprocess's preexec_fn could ask, but it runs Python in a fork of a process with threads (torch's,
OpenMP's, the tokenizers'), which deadlocks if that code needs a lock another thread held at fork time, and it makes
subprocess fork() instead of vfork(): the page tables are copied, a cost that grows with the parent's memory
(0.44 s per child for a parent with 4 GiB resident, measured on the 2-core box). This costs one interpreter start
without site (~25 ms there), then execs the command: the same process, so the parent's kill() and wait() reach the
tool, and the request stays (prctl(2): exec clears it only for set-user-ID, set-group-ID or file-capability
programs).

Linux only. Run by file path in isolated mode (-I: no PYTHONPATH, no user site), so it imports nothing of ours.
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
