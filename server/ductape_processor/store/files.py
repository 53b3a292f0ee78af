"""The processor's own files on local disk (the data directory, the SQLite store): readable by its user alone.

They hold what must not be read by other users of the machine: execution records, idempotency records, session
revocations, sealed tokens, the generated session key. Directories the processor creates are 0700 and its files 0600,
whatever the umask; its files and its data directory that already exist with a looser mode are tightened, with a
warning. When the processor does not own the directory (a volume mounted by the platform, such as a Kubernetes
`emptyDir` owned by root with an `fsGroup`) or the directory is a shared one (sticky, like `/tmp`), its mode is left
as it is, with a warning: the files inside are still 0600.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

DIRECTORY_MODE: Final = 0o700
"""Mode of the directories the processor keeps its state in."""
FILE_MODE: Final = 0o600
"""Mode of the files the processor keeps its state in."""


def _left_open(path: Path, mode: int, message: str) -> None:
    log.warning(message, path, oct(mode), extra={"path": str(path), "mode": oct(mode)})


def _tighten(path: Path, mode: int) -> None:
    current = stat.S_IMODE(path.stat().st_mode)
    if current & ~mode == 0:
        return
    if current & stat.S_ISVTX:
        _left_open(
            path, current, "%s is shared with other users (mode %s): keep the processor's state in a folder of its own"
        )
        return
    try:
        path.chmod(current & mode)
    except PermissionError:
        _left_open(
            path,
            current,
            "%s is open to other users (mode %s) and the processor cannot change that: it does not own it",
        )
        return
    log.warning(
        "tightened %s from mode %s to %s: the processor's state is for its own user",
        path,
        oct(current),
        oct(current & mode),
        extra={"path": str(path), "mode": oct(current & mode)},
    )


def private_directory(path: Path, *, tighten: bool) -> None:
    """Create `path` and its missing parents with mode 0700; with `tighten`, also an existing `path` with more.

    Only a directory that is the processor's own is tightened (the data directory); the existing parent of a store
    file the settings name elsewhere is not the processor's to change.
    """
    if not path.is_dir():
        for parent in reversed([path, *path.parents]):
            if not parent.is_dir():
                # mkdir's mode is filtered by the umask, which can only remove bits: 0700 or less, never more.
                parent.mkdir(mode=DIRECTORY_MODE, exist_ok=True)
        return
    if tighten:
        _tighten(path, DIRECTORY_MODE)


def private_file(path: Path, *, create: bool = True) -> None:
    """Create `path` empty with mode 0600 (when `create`), or tighten it when it exists with more."""
    if not create:
        if path.exists():
            _tighten(path, FILE_MODE)
        return
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        _tighten(path, FILE_MODE)
        return
    os.close(descriptor)
