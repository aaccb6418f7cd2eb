"""A tool's output file (--out, --json): refused before the run when it cannot be written, then replaced
atomically, so minutes of benchmarking never end in a traceback or a half-written result."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable


def check_out(path: str | os.PathLike | None, tool: str, flag: str = "--out") -> Path | None:
    """Exit with one line now (not after the run) when `path` is a folder or its folder cannot be made or
    written. Returns the path (None when not given)."""
    if path is None or str(path) == "":
        return None
    out = Path(path)
    if out.is_dir() or str(path).endswith(os.sep):
        sys.exit(f"{tool}: error: {flag} {path} is a folder; give a file path (e.g. {out / 'result.json'})")
    if out.exists():  # through a symlink too; /dev/stdout, a pipe: written through, the folder need not be writable
        if os.access(out, os.W_OK):
            return out
        sys.exit(f"{tool}: error: {flag} {path} is not writable; give a path you can write to")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:  # the first folder that exists must take the new ones
        folder = folder.parent
    if not folder.is_dir():
        sys.exit(f"{tool}: error: {flag} {path}: {folder} is a file, not a folder; give a path in a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        sys.exit(f"{tool}: error: {flag} {path}: {folder} is not writable; give a path in a folder you can write to")
    return out


def write_out(path: str | os.PathLike, write: Callable[[Path], None] | str, tool: str, flag: str = "--out") -> Path:
    """Write `write` (text, or a function writing to the path it is given). A new or regular file is written
    beside itself and renamed over (a symlink's target, keeping the file's mode): a reader sees the old file
    or the whole new one. Anything else (/dev/stdout, a pipe, >(...)) is written through as given."""
    out = Path(path)
    target = Path(os.path.realpath(out)) if out.is_file() else out  # a symlink stays, its target is replaced
    direct = out.exists() and not out.is_file() or out.exists() and not os.access(target.parent, os.W_OK)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}{target.suffix}")  # suffix kept: savefig picks by it
    try:
        if direct:
            write(out) if callable(write) else out.write_text(write, encoding="utf-8")
            return out
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp) if callable(write) else tmp.write_text(write, encoding="utf-8")
        if target.exists():
            shutil.copymode(target, tmp)  # a private (0600) result stays private
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        sys.exit(f"{tool}: error: {flag} {path}: {e.strerror or type(e).__name__}; "
                 f"give a path in a folder you can write to")
    return out
