"""What the CLI tests compare before and after a command: the bytes (and modes) of every file under a folder."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def tree_snapshot(folder: Path, contents: bool = True) -> dict[str, tuple[str, str]]:
    """{relative path: (kind and mode, sha256 or link target)} of everything under folder (links not followed).
    contents=False: a file's size and modification time instead of its sha256 (what any write changes; for large
    trees compared many times)."""
    out: dict[str, tuple[str, str]] = {}
    if not folder.exists():
        return out
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            p = Path(root) / name
            st = p.lstat()
            rel = str(p.relative_to(folder))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = (f"dir {stat.S_IMODE(st.st_mode):o}", "")
            else:
                what = hashlib.sha256(p.read_bytes()).hexdigest() if contents else f"{st.st_size} {st.st_mtime_ns}"
                out[rel] = (f"file {stat.S_IMODE(st.st_mode):o}", what)
    return out
