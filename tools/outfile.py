"""A tool's output file (--out, --json): refused before the run when it cannot be written, then replaced
atomically, so minutes of benchmarking never end in a traceback or a half-written result."""

from __future__ import annotations

import os
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
    folder = out.parent
    while not folder.exists() and folder != folder.parent:  # the first folder that exists must take the new ones
        folder = folder.parent
    if not folder.is_dir():
        sys.exit(f"{tool}: error: {flag} {path}: {folder} is a file, not a folder; give a path in a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        sys.exit(f"{tool}: error: {flag} {path}: {folder} is not writable; give a path in a folder you can write to")
    return out


def write_out(path: str | os.PathLike, write: Callable[[Path], None] | str, tool: str, flag: str = "--out") -> Path:
    """Write `write` (text, or a function writing to the temporary path it is given) beside `path`, then
    rename it onto `path`: a reader sees the old file or the whole new one, never a part."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")  # suffix kept: savefig picks by it
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if callable(write):
            write(tmp)
        else:
            tmp.write_text(write, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        sys.exit(f"{tool}: error: {flag} {path}: {e.strerror or type(e).__name__}; "
                 f"give a path in a folder you can write to")
    return out
