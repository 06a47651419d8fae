"""Atomic JSON files: a crash or a full disk leaves the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path


def write_json(obj: dict, path: str | Path) -> None:
    """Write JSON atomically (temp file then rename), so an interrupted write never leaves half a file."""
    path = Path(path)
    # per-process temp name: several processes may write the same cache file (a shared --out)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the parent is not a directory: there is no temp file to remove
            pass
        hint = " (is the disk full?)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        err = OSError(f"could not write {path}: {exc.strerror or exc}{hint}")
        err.errno = exc.errno
        raise err from exc
