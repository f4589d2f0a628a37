# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Planned file changes for the deployment modules (private to the collection).

A deployment module first builds the complete list of files it wants (content, mode, owner),
compares it with what is on disk and only then, outside check mode, writes the differences.
Each write is atomic (temporary file in the same directory, mode and owner set before the
rename). Secret files carry a masking function so the diff never shows their values.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable

# One implementation of atomic writes for the whole collection.
from ansible_collections.gatehouse.access.plugins.module_utils._common.atomicfile import (
    read_bytes,
    write_atomic,
)

MASK = "********"
SECRET_TEXT = "<secret, not shown>\n"  # noqa: S105 - shown instead of a secret
SECRET_CHANGED_TEXT = "<secret, not shown (changed)>\n"  # noqa: S105


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    """sha256 of the file ``path``, read in chunks (bundles and backups can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _text(data: bytes | None, mask: Callable[[str], str] | None) -> str:
    if data is None:
        return ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "<binary, sha256 %s>\n" % sha256(data)
    return mask(text) if mask else text


def _attributes_differ(entry: PlannedFile | PlannedDir) -> bool:
    """Mode or a requested owner of an existing file or directory differs from what is wanted."""
    if entry.before_mode != entry.mode:
        return True
    if entry.before_owner is None:
        raise RuntimeError("internal error: owner of existing %s was not read" % entry.path)
    if entry.uid is not None and entry.before_owner[0] != entry.uid:
        return True
    return entry.gid is not None and entry.before_owner[1] != entry.gid


class PlannedFile:
    """One file the module wants: its content, mode and owner, and how it differs from disk."""

    def __init__(
        self,
        path: str,
        data: bytes,
        mode: int,
        uid: int | None = None,
        gid: int | None = None,
        mask: Callable[[str], str] | None = None,
        hidden: bool = False,
        secret: bool = False,
    ) -> None:
        self.path = path
        self.data = data
        self.mode = mode
        self.uid = uid
        self.gid = gid
        # mask: rewrites secret values in diffs; hidden: never show the content at all (private keys);
        # secret: a file that is one secret value (password, shared secret, key): not even a hash of
        # it is shown, since a hash of a short password can be guessed offline.
        self.mask = mask
        self.hidden = hidden
        self.secret = secret
        self.before = read_bytes(path)
        self.before_mode: int | None = None
        self.before_owner: tuple[int, int] | None = None
        if self.before is not None:
            st = os.stat(path)
            self.before_mode = stat.S_IMODE(st.st_mode)
            self.before_owner = (st.st_uid, st.st_gid)

    @property
    def content_changed(self) -> bool:
        return self.before != self.data

    @property
    def attributes_changed(self) -> bool:
        return self.before is None or _attributes_differ(self)

    @property
    def changed(self) -> bool:
        return self.content_changed or self.attributes_changed

    def diff(self) -> dict:
        if self.secret:
            before = "" if self.before is None else SECRET_TEXT
            after = SECRET_CHANGED_TEXT if self.content_changed else SECRET_TEXT
        elif self.hidden:
            before = "" if self.before is None else "<private key, sha256 %s>\n" % sha256(self.before)
            after = "<private key, sha256 %s>\n" % sha256(self.data)
        else:
            before, after = _text(self.before, self.mask), _text(self.data, self.mask)
        if self.before is not None and self.before_mode != self.mode:
            before += "# mode %04o\n" % self.before_mode
            after += "# mode %04o\n" % self.mode
        return {"before_header": self.path, "after_header": self.path, "before": before, "after": after}

    def apply(self) -> None:
        if self.content_changed:
            write_atomic(self.path, self.data, self.mode, self.uid, self.gid)
            return
        os.chmod(self.path, self.mode)
        if self.uid is not None or self.gid is not None:
            os.chown(self.path, -1 if self.uid is None else self.uid, -1 if self.gid is None else self.gid)


class PlannedDir:
    """A directory the module wants, with mode and owner."""

    def __init__(self, path: str, mode: int, uid: int | None = None, gid: int | None = None) -> None:
        self.path = path
        self.mode = mode
        self.uid = uid
        self.gid = gid
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self.exists = False
            self.before_mode = None
            self.before_owner = None
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError("%s exists and is not a directory" % path)
            self.exists = True
            self.before_mode = stat.S_IMODE(st.st_mode)
            self.before_owner = (st.st_uid, st.st_gid)

    @property
    def changed(self) -> bool:
        return not self.exists or _attributes_differ(self)

    def apply(self) -> None:
        if not self.exists:
            os.makedirs(self.path, exist_ok=True)
        os.chmod(self.path, self.mode)
        if self.uid is not None or self.gid is not None:
            os.chown(self.path, -1 if self.uid is None else self.uid, -1 if self.gid is None else self.gid)


def mask_env_values(secret_keys: set[str]) -> Callable[[str], str]:
    """A masker for key=value text that replaces the values of ``secret_keys``."""

    def mask(text: str) -> str:
        lines = []
        for line in text.splitlines(keepends=True):
            key, sep, _value = line.partition("=")
            if sep and key.strip() in secret_keys:
                newline = "\n" if line.endswith("\n") else ""
                line = "%s=%s%s" % (key, MASK, newline)
            lines.append(line)
        return "".join(lines)

    return mask


def remove_paths(files: list[str], dirs: list[str], check_mode: bool) -> tuple[list[str], list[str]]:
    """Remove the listed files, then the listed directories if they are empty.

    Returns (removed, left_behind): directories that still hold files the module did not write
    are left in place so nothing of the operator's is deleted silently.
    """
    removed: list[str] = []
    left: list[str] = []
    for path in files:
        if os.path.lexists(path):
            removed.append(path)
            if not check_mode:
                os.unlink(path)
    for path in dirs:
        if not os.path.isdir(path):
            continue
        remaining = sorted(
            name
            for name in os.listdir(path)
            if os.path.join(path, name) not in removed
            # Leftovers of an interrupted atomic write are ours too.
            and not (name.startswith(".") and name.endswith(".tmp"))
        )
        if remaining:
            left.extend(os.path.join(path, name) for name in remaining)
            continue
        removed.append(path)
        if not check_mode:
            shutil.rmtree(path)
    return removed, left
