"""The storage providers the contract suite (tests/test_storage.py) runs against, each with an independent way to
check what landed: the folder itself for fs, the provider's own client for the cloud providers. A provider's
emulator is started by its fixture on a free loopback port; without it the tests skip (fail under CI=true)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Backend:
    """One provider for the contract suite."""

    provider: str
    env: dict[str, Any]
    """The storage's environment settings in the test manifest."""
    fetch: Callable[[str], Awaitable[bytes | None]]
    """The bytes stored under a key, read without the processor (None: no such file)."""
    keys: Callable[[], Awaitable[list[str]]]
    """Every key stored, read without the processor (leftovers of failed uploads included)."""
    unreachable_env: dict[str, Any] | None = None
    """Settings pointing at nothing, with credentials that must not appear in errors."""
    secrets: dict[str, str] = field(default_factory=dict)
    """Secrets the settings reference, as PROCESSOR_SECRET_* environment variables."""
    signs_put: bool = True


def fs_backend(data_dir: Path, product: str, tag: str, env: str) -> Backend:
    """The fs provider: files under `<data_dir>/storage/<product>/<tag>/<env>`."""
    root = data_dir / "storage" / product / tag / env

    async def fetch(key: str) -> bytes | None:
        path = root / key
        return path.read_bytes() if path.is_file() and not path.is_symlink() else None

    async def keys() -> list[str]:
        if not root.exists():
            return []
        found = []
        for folder, _, files in os.walk(root):
            for name in files:
                found.append(os.path.relpath(os.path.join(folder, name), root))
        return sorted(found)

    return Backend("fs", {"provider": "fs"}, fetch, keys)
