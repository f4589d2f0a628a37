# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Atomic file writes for the collection's modules (private to the collection).

A reader sees either the old file or the complete new one, never a half-written file:
the content goes to a temporary file in the same directory (same file system, so the
rename is atomic), gets its mode before it is renamed, is fsync'ed, then replaces the
target with os.replace().
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from typing import BinaryIO


@contextlib.contextmanager
def atomic_open(path: str, mode: int, uid: int | None = None, gid: int | None = None) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces ``path`` atomically when the block ends without error.

    The temporary file gets ``mode`` (and owner, when given) before any data is written, is
    fsync'ed, then renamed over ``path``; on any exception it is removed and ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), suffix=".tmp", dir=directory)
    try:
        # mkstemp creates 0600; set the final mode before any data is visible under the real name.
        os.fchmod(fd, mode)
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def write_atomic(path: str, data: bytes, mode: int, uid: int | None = None, gid: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically with permission bits ``mode`` (and owner, when given)."""
    with atomic_open(path, mode, uid, gid) as handle:
        handle.write(data)


def _fsync_dir(directory: str) -> None:
    # Persist the rename itself; not every file system supports fsync on directories.
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def file_mode(path: str) -> int | None:
    """Permission bits of ``path`` or None when it does not exist."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None


def read_bytes(path: str) -> bytes | None:
    """Content of ``path`` or None when it does not exist."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
