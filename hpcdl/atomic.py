"""Write a file so readers see either the old version or the complete new one.

The temp file lives in the destination directory (a rename is only atomic
within one file system), is flushed and fsynced before `os.replace`, and the
directory is fsynced after it so the rename itself survives a crash.
Datasets, downloads and checkpoints all go through `atomic_output`.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from hpcdl.errors import DataError


@contextmanager
def atomic_output(path, temp=None):
    """Yield a temp path next to `path`; on success it becomes `path`, on an exception it vanishes.

    `temp` names the temp file (it must be in the same directory) for callers
    that recognise their own leftovers after a crash; by default a unique
    hidden name is made. A process killed inside the block leaves the temp
    file behind and `path` untouched.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise DataError(f"{path}: directory {path.parent} does not exist")
    if temp is None:
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        except OSError as exc:
            raise DataError(f"{path}: cannot write in {path.parent}: {exc.strerror or exc}") from None
        os.close(fd)
        temp = tmp_name
    tmp = Path(temp)
    try:
        yield tmp
        _fsync_path(tmp)
        # mkstemp creates 0600; a dataset is usually shared, so honour the umask instead.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems refuse to open directories; the rename is still done
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
