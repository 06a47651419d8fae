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


class JSONFileError(ValueError):
    """A JSON file is unreadable, too large, not UTF-8, not JSON or not an object (one line)."""


def _no_constant(word: str):
    """JSON's non-standard NaN / Infinity literals are refused."""
    raise ValueError(f"{word} is not JSON")


def read_json_object(path: str | Path, max_bytes: int, constants: bool = False) -> dict:
    """The JSON object in `path`, its size bounded before it is read; JSONFileError whose one-line
    message says what is wrong (the caller names the file). `constants`: accept NaN / Infinity
    literals as floats (for records whose own checks refuse them where a number must be finite)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise JSONFileError(f"{size} bytes, over the {max_bytes >> 20} MiB such a file can be")
        raw = path.read_bytes().decode("utf-8")
        data = json.loads(raw, parse_constant=float if constants else _no_constant)
    except JSONFileError:
        raise
    except OSError as exc:
        raise JSONFileError(f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise JSONFileError("not UTF-8 text") from None
    except RecursionError:
        raise JSONFileError("JSON nested too deeply") from None
    except ValueError as exc:
        raise JSONFileError(f"not valid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise JSONFileError(f"a JSON {type(data).__name__}, not an object")
    return data
