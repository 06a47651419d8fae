"""Write a directory all at once: into a temporary sibling, renamed into place when complete.

The staging folder is `.DIR.partial-<pid>-<random>` beside DIR, holding a marker file
(`STAGING_MARKER`: host, pid and the process's start time) while it is written; the marker is
removed just before the final rename, so it is never part of an export. A run that was killed
leaves its staging folder behind: the next export to the same DIR removes such folders whose
marker names a dead process of this host (never a live run's, never a folder without a valid
marker: those are named in a warning).

The final rename never deletes what this run did not create. Without `overwrite`, a DIR that
appeared (or filled) while the export was being written is left untouched and the export is
refused; the finished export is kept in its staging folder (without a marker, so no later run
removes it) and the error says where. With `overwrite`, DIR is re-checked at that moment (a
directory, not a symbolic link), renamed aside to a unique name of this run, the new export
renamed in, and only the aside copy deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from duquant.config import check_output_dir

log = logging.getLogger(__name__)

STAGING_MARKER = ".duquant-staging.json"
_MARKER_MAX_BYTES = 4096


class ExportError(ValueError):
    """An export cannot be made (bad destination, unexportable method, failed write): one clear line."""


def check_destination(dest: str | Path, overwrite: bool) -> Path:
    """The destination as a Path, or ExportError when it is a file, a symbolic link or a non-empty
    directory (without `overwrite`)."""
    path = Path(dest).expanduser()
    if path.is_symlink():
        raise ExportError(
            f"--save {path} is a symbolic link; give the directory path itself (duquant does not "
            "write through or replace links)"
        )
    if path.exists() and not path.is_dir():
        raise ExportError(f"--save {path} is a file; give a directory path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExportError(
            f"--save {path} exists and is not empty; pass --overwrite to replace it, "
            "or choose another directory"
        )
    # the staged copy is made beside `dest`: probe that place (os.access is wrong for root and
    # read-only mounts)
    check_output_dir(path.absolute().parent, "--save")
    return path


# ---- staging folders and their owners ----------------------------------------------------------


def _start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot, Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _marker() -> dict:
    """What identifies this process as the owner of a staging folder."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}


def read_marker(folder: Path) -> dict | None:
    """A staging folder's marker when it is a valid one, else None (never trusted blindly)."""
    path = folder / STAGING_MARKER
    try:
        if path.is_symlink() or path.stat().st_size > _MARKER_MAX_BYTES:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("host"), str):
        return None
    pid, start = data.get("pid"), data.get("start")
    if type(pid) is not int or not 0 < pid < 2**31 or not (start is None or type(start) is int):
        return None
    return data


def owner_alive(marker: dict) -> bool:
    """Whether the process a marker names may still be running (when unsure: yes)."""
    if marker["host"] != socket.gethostname():
        return True  # another machine's run (a shared file system): cannot tell
    pid = marker["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # exists, owned by someone else
    now = _start_time(pid)
    # the pid was reused by a later process: the owner is gone
    return marker["start"] is None or now is None or now == marker["start"]


def _staging_folders(parent: Path, name: str) -> list[Path]:
    """Staging folders of exports to `parent / name`."""
    prefix = f".{name}.partial-"
    try:
        return sorted(
            p
            for p in parent.iterdir()
            if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()
        )
    except OSError:
        return []


def clean_stale(dest: Path) -> list[Path]:
    """Remove the staging folders of `dest` left by dead processes of this host; return them.

    A folder without a valid marker (or of a live or unknown process) is kept; those without a
    marker, and interrupted replacements (`.DIR.old-*`), are named in a warning."""
    parent = dest.absolute().parent
    removed, unknown = [], []
    for folder in _staging_folders(parent, dest.name):
        marker = read_marker(folder)
        if marker is None:
            unknown.append(folder)
        elif not owner_alive(marker):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for folder in removed:
        log.warning("removed %s: the staging folder of an export whose process died", folder)
    old = [p for p in parent.glob(f".{dest.name}.old-*") if p.is_dir()]
    for folder in unknown + old:
        log.warning(
            "%s is left from an earlier export to %s (not removed: no live-process marker says "
            "it is stale); remove it yourself if it is not needed",
            folder,
            dest,
        )
    return removed


def _new_staging(dest: Path) -> Path:
    """A new, empty, private staging folder beside `dest`, named after this process, marked."""
    parent = dest.absolute().parent
    for _ in range(100):
        tmp = parent / f".{dest.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir(mode=0o700)
        except FileExistsError:
            continue
        try:
            (tmp / STAGING_MARKER).write_text(json.dumps(_marker()))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp
    raise ExportError(f"could not create a staging folder beside {dest}")


@contextlib.contextmanager
def staged_directory(dest: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory beside `dest`; on success it replaces `dest` by renames.

    Any error or interrupt (KeyboardInterrupt included) removes the temporary directory and leaves
    `dest` as it was. An OSError while writing becomes an ExportError naming the cause. When the
    final placement is refused (DIR appeared meanwhile), the finished export is kept and named.
    """
    dest = check_destination(dest, overwrite)
    dest.absolute().parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    tmp = _new_staging(dest)
    keep = False
    try:
        yield tmp
        (tmp / STAGING_MARKER).unlink()
        _default_modes(tmp)
        keep = True  # from here on, tmp is a finished export: never deleted on a refusal
        _place(tmp, dest, overwrite)
    except OSError as exc:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        why = "the disk is full" if exc.errno == errno.ENOSPC else str(exc)
        kept = f"; the finished export is kept at {tmp}" if keep and tmp.is_dir() else ""
        raise ExportError(
            f"could not write the export to {dest}: {why}; {dest} was left as it was{kept}"
            if keep
            else f"could not write the export to {dest}: {why}; nothing was written"
        ) from exc
    except ExportError:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_modes(root: Path) -> None:
    """Give the staged tree the modes a plain mkdir / open would (the folder is made private)."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2():
    """libc's renameat2 (Linux), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with FileExistsError when `dst` exists (atomically where the
    OS offers it: renameat2 RENAME_NOREPLACE; else a check and a rename, which on POSIX still never
    replaces a non-empty directory)."""
    fn = _renameat2()
    if fn is not None:
        rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _appeared(dest: Path, tmp: Path) -> ExportError:
    """The refusal when something appeared at `dest` while the export was staged at `tmp`."""
    return ExportError(
        f"--save {dest} was created or filled by someone else while this export was being "
        f"written; it was left untouched (pass --overwrite to replace it); the finished export "
        f"is kept at {tmp}"
    )


def _place(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` to `dest`. Without `overwrite` only onto nothing or onto the
    empty directory that was there; with it, an existing directory is renamed aside (a name of
    this run), the export renamed in, and only then the aside copy deleted."""
    if dest.is_symlink() or (os.path.lexists(dest) and not dest.is_dir()):
        kind = "a symbolic link" if dest.is_symlink() else "a file"
        raise ExportError(
            f"--save {dest} became {kind} while this export was being written; it was left "
            f"untouched; the finished export is kept at {tmp}"
        )
    if not os.path.lexists(dest):
        try:
            rename_noreplace(tmp, dest)
        except FileExistsError:
            raise _appeared(dest, tmp) from None
        log.info("export written to %s", dest)
        return
    if not overwrite:
        try:  # POSIX: replaces an empty directory atomically, never a non-empty one
            os.rename(tmp, dest)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise _appeared(dest, tmp) from None
            raise
        log.info("export written to %s", dest)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    rename_noreplace(dest, old)
    try:
        rename_noreplace(tmp, dest)
    except BaseException as exc:
        try:
            rename_noreplace(old, dest)
        except OSError:
            raise ExportError(
                f"--save {dest}: the new export could not be renamed in ({exc}) and the earlier "
                f"one not back; the earlier export is at {old}, the new one at {tmp}"
            ) from exc
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    log.info("export written to %s (replaced the earlier one)", dest)
