"""Write a directory all at once: into a temporary sibling, renamed into place when complete."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from duquant.config import check_output_dir

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """An export cannot be made (bad destination, unexportable method, failed write): one clear line."""


def check_destination(dest: str | Path, overwrite: bool) -> Path:
    """The destination as a Path, or ExportError when it is a file or a non-empty directory."""
    path = Path(dest).expanduser()
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


@contextlib.contextmanager
def staged_directory(dest: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory beside `dest`; on success it replaces `dest` by renames.

    Any error or interrupt (KeyboardInterrupt included) removes the temporary directory and leaves
    `dest` as it was. An OSError while writing becomes an ExportError naming the cause.
    """
    dest = check_destination(dest, overwrite)
    dest.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.absolute().parent))
    try:
        yield tmp
        _default_modes(tmp)
        _replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "the disk is full" if exc.errno == errno.ENOSPC else str(exc)
        raise ExportError(
            f"could not write the export to {dest}: {why}; nothing was written"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_modes(root: Path) -> None:
    """Give the staged tree the modes a plain mkdir / open would (mkdtemp makes it private)."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace(tmp: Path, dest: Path) -> None:
    """Rename the finished `tmp` to `dest`, moving an existing `dest` aside until that succeeded."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info("export written to %s", dest)
