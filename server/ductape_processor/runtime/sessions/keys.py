"""Session root keys: parsed from the configuration or generated once into the data directory; per-product keys derived.

A root key is `kid:base64url-of-32-bytes`. The key of tokens for one product and environment is derived from a root
key with HKDF-SHA256, so a token made for one product or environment never opens in another.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ductape_processor.runtime.policies.secrets import aead, derive_key
from ductape_processor.store.files import private_directory, private_file

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
GENERATED_KEY_FILE = "session-keys"


def b64(data: bytes) -> str:
    """URL-safe base64 without padding (the alphabet of tokens and ids)."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    """The inverse of `b64`; ValueError (binascii.Error) for text that is not base64url."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_root_key(spec: str) -> tuple[str, bytes]:
    """`kid:base64url-of-32-bytes` → (kid, key); ValueError with the expected form otherwise."""
    kid, sep, encoded = spec.partition(":")
    if not sep or not kid or not kid.replace("-", "").replace("_", "").isalnum() or len(kid) > 32:
        raise ValueError("a session key is 'id:key' with an id of letters, digits, '-' or '_' (at most 32)")
    try:
        key = unb64(encoded)
    except (ValueError, binascii.Error):
        raise ValueError(f"session key {kid!r}: the key is not base64url") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"session key {kid!r}: the key must be {KEY_BYTES} bytes ({len(key)} given)")
    return kid, key


def new_root_key(kid: str) -> str:
    """A fresh `kid:key` root key specification."""
    return f"{kid}:{b64(os.urandom(KEY_BYTES))}"


class SessionKeys:
    """Root keys by id; the first one signs new tokens. Derived keys are cached per (key, product, env)."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("at least one session key is needed")
        self.current = keys[0][0]
        self._roots = dict(keys)
        self._derived: dict[tuple[str, str, str], AESGCM] = {}

    @classmethod
    def load(cls, specs: list[str], data_dir: Path) -> tuple[SessionKeys, bool]:
        """The configured keys, or a key generated once and kept in the data directory (True when so)."""
        if specs:
            return cls([parse_root_key(spec) for spec in specs]), False
        path = data_dir / GENERATED_KEY_FILE
        private_file(path, create=False)
        if not path.exists():
            private_directory(path.parent, tighten=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(new_root_key("local") + "\n")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return cls([parse_root_key(line) for line in lines]), True

    def root_keys(self) -> list[tuple[str, bytes]]:
        """The root keys, the current one first: other secrets the processor keeps derive their keys from them."""
        return [(self.current, self._roots[self.current])] + [
            (kid, root) for kid, root in self._roots.items() if kid != self.current
        ]

    def cipher(self, kid: str, product: str, env: str) -> AESGCM | None:
        """The AEAD for tokens of (product, env) under root key `kid`, or None for an unknown key id."""
        cached = self._derived.get((kid, product, env))
        if cached is not None:
            return cached
        root = self._roots.get(kid)
        if root is None:
            return None
        info = f"ductape-processor/session/v1/{product}/{env}".encode()
        cipher = aead(derive_key(root, info, KEY_BYTES))
        self._derived[(kid, product, env)] = cipher
        return cipher
