"""Paths a user gives (config, data, --model, --resume-from, GGUF files), checked once and early: one that is not
what belongs there is a PathError (exit 2) naming the path, what it is, and what to do.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from core.errors import PathError


def what_is(path: Path) -> str:
    """What is at `path`, as a message says it: missing, a folder, an empty file, a device, a file."""
    try:
        st = path.stat()  # follows symlinks: a link is what it points to
    except FileNotFoundError:
        return "a broken symlink" if path.is_symlink() else "missing"
    except NotADirectoryError:
        return "missing (a parent of it is a file)"
    except PermissionError:
        return "not readable (permission denied)"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return "a device or other special file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a pipe or socket)"
    if not os.access(path, os.R_OK):
        return "not readable (permission denied)"
    return "an empty file" if st.st_size == 0 else "a file"


def _refused(what: str, path: str | os.PathLike, problem: str, fix: str = "") -> PathError:
    given = Path(path)
    where = given if given.is_absolute() else f"{given} (relative to {Path.cwd()})"
    return PathError(f"{what} {where}: {problem}" + (f"\n  fix: {fix}" if fix else ""))


def user_path(path: str | os.PathLike) -> Path:
    """A user's path as an absolute path: ~ expanded, relative to the working directory, symlinks kept."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def require_file(path: str | os.PathLike, what: str, fix: str = "") -> Path:
    """`path` as an absolute path, if it is a readable, non-empty regular file."""
    full = user_path(path)
    found = what_is(full)
    if found == "a file":
        return full
    raise _refused(what, path, f"is {found}, not a file" + (" with content" if found == "an empty file" else ""), fix)


def require_dir(path: str | os.PathLike, what: str, fix: str = "") -> Path:
    full = user_path(path)
    found = what_is(full)
    if found == "a folder":
        return full
    raise _refused(what, path, f"is {found}, not a folder", fix)


def creatable_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as an absolute path, if it is a folder or can become one (its nearest existing parent is a folder)."""
    full = probe = user_path(path)
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    found = what_is(probe)
    if found != "a folder":
        blocker = "" if probe == full else f" ({probe} is {found})"
        problem = f"cannot be a folder{blocker}; it is {what_is(full)}."
        raise _refused(what, path, problem, "point it at a folder, or move the file out of the way")
    return full
