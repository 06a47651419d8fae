"""Atomic JSON files: a crash or a full disk leaves the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path


def write_json(obj: dict, path: str | Path) -> None:
    """Write JSON atomically (temp file, flushed to disk, then renamed), so an interrupted write, a
    crash or Ctrl-C never leaves half a file: the old file or the new one, and no temp file."""
    path = Path(path)
    # per-process temp name: several processes may write the same cache file (a shared --out)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    text = json.dumps(obj, indent=2, default=str)  # before anything is created
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # OSError, and Ctrl-C mid-write: no temp file left behind
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the parent is not a directory: there is no temp file to remove
            pass
        if not isinstance(exc, OSError):
            raise
        hint = " (is the disk full?)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        err = OSError(f"could not write {path}: {exc.strerror or exc}{hint}")
        err.errno = exc.errno
        raise err from exc
