"""Where `$Secret{NAME}` values come from: a secrets file (KEY=VALUE lines), then `PROCESSOR_SECRET_<NAME>`
environment variables; and how secrets the processor mints itself (upstream tokens) are kept at rest.

Only variables with that prefix are secrets: a manifest cannot read the processor's other environment variables
(`PGPASSWORD`, cloud credentials, ...). Values never reach logs, traces, errors or responses; only names do.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from ductape_processor.runtime.registry.manifest import SECRET_NAME, SECRET_REFERENCE

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SettingsT = TypeVar("SettingsT", bound=BaseModel)

_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


class SecretsFileError(ValueError):
    """The secrets file cannot be read; the message names the line, never a value."""


def read_secrets_file(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines; `#` starts a comment line; values may be wrapped in single or double quotes."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecretsFileError(f"cannot read secrets file {path}: {exc.strerror}") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise SecretsFileError(f"{path}:{number}: expected NAME=value")
        value = match.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[match.group(1)] = value
    return values


ENV_PREFIX = "PROCESSOR_SECRET_"


class SecretSource:
    """Resolves secret names: the secrets file first, then `PROCESSOR_SECRET_<NAME>` environment variables."""

    def __init__(self, file_values: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None) -> None:
        self._file = dict(file_values or {})
        self._environ = environ if environ is not None else os.environ

    @classmethod
    def from_settings(cls, secrets_file: Path | None) -> SecretSource:
        """The source the settings describe."""
        return cls(read_secrets_file(secrets_file) if secrets_file is not None else None)

    def get(self, name: str) -> str | None:
        """The secret's value, or None when no source has it."""
        if not SECRET_NAME.match(name):
            return None
        value = self._file.get(name)
        return value if value is not None else self._environ.get(ENV_PREFIX + name)

    def resolve(self, text: str, missing: Callable[[str], Exception]) -> str:
        """`text` with every `$Secret{NAME}` in it replaced by the secret's value; `missing(name)` is raised for the
        first name no source has (its error names the secret, never a value)."""

        def value(match: re.Match[str]) -> str:
            found = self.get(match.group(1))
            if found is None:
                raise missing(match.group(1))
            return found

        return SECRET_REFERENCE.sub(value, text)

    def resolve_settings(self, settings: SettingsT, missing: Callable[[str], Exception]) -> SettingsT:
        """A copy of a manifest settings model whose text has its `$Secret{NAME}` references resolved, in its own
        fields and in the models, mappings and lists it holds (an adapter's settings, just before the adapter is
        built from them: a callback's `auth` and `headers` hold secrets too)."""
        resolved: SettingsT = self._resolved(settings, missing)
        return resolved

    def _resolved(self, value: Any, missing: Callable[[str], Exception]) -> Any:
        if isinstance(value, str):
            return self.resolve(value, missing) if SECRET_REFERENCE.search(value) else value
        if isinstance(value, BaseModel):
            update = {name: self._resolved(getattr(value, name), missing) for name in type(value).model_fields}
            changed = {name: item for name, item in update.items() if item is not getattr(value, name)}
            return value.model_copy(update=changed) if changed else value
        if isinstance(value, dict):
            items = {key: self._resolved(item, missing) for key, item in value.items()}
            return items if any(items[key] is not value[key] for key in value) else value
        if isinstance(value, list):
            elements = [self._resolved(item, missing) for item in value]
            return elements if any(a is not b for a, b in zip(elements, value, strict=True)) else value
        return value

    def missing(self, names: Iterable[str]) -> list[str]:
        """The names no source can resolve, sorted."""
        return sorted({name for name in names if self.get(name) is None})


def referenced_secrets(document: object) -> set[str]:
    """Every secret name a manifest document references."""
    found: set[str] = set()
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            found.update(SECRET_REFERENCE.findall(node))
    return found


_SEALED_PREFIX = "sealed.v1"
_NONCE_BYTES = 12
TOKEN_KEY_INFO = b"ductape-processor/auth-token/v1"
"""The HKDF info label of the key that seals minted tokens: distinct from every session key's label, so the same
root key never encrypts two kinds of data under one derived key."""


class TokenVault:
    """Seals the upstream tokens credential auths mint, before they reach the store.

    AES-256-GCM under a key derived with HKDF-SHA256 from the processor's session root keys (`PROCESSOR_SESSION_KEYS`,
    or the key generated in the data directory) with its own info label. The store row's key (product, environment,
    app and auth) is the authenticated data, so a sealed token opens only where it was stored. Every replica that
    shares the root keys opens what another sealed; one that cannot (other keys, a damaged row) mints again.
    """

    def __init__(self, root_keys: Sequence[tuple[str, bytes]]) -> None:
        if not root_keys:
            raise ValueError("at least one root key is needed")
        self._current = root_keys[0][0]
        self._roots = dict(root_keys)
        self._ciphers: dict[str, AESGCM] = {}  # derived on first use: a product without credential auths never does

    def _cipher(self, kid: str) -> AESGCM | None:
        cipher = self._ciphers.get(kid)
        if cipher is None and kid in self._roots:
            cipher = self._ciphers[kid] = aead(derive_key(self._roots[kid], TOKEN_KEY_INFO))
        return cipher

    def seal(self, key: str, plaintext: str) -> str:
        """`plaintext` encrypted for the store row `key`: `sealed.v1.<key id>.<base64url of nonce and ciphertext>`."""
        nonce = os.urandom(_NONCE_BYTES)
        cipher = self._cipher(self._current)
        assert cipher is not None  # the current key is one of the roots
        sealed = cipher.encrypt(nonce, plaintext.encode(), key.encode())
        encoded = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{_SEALED_PREFIX}.{self._current}.{encoded}"

    def open(self, key: str, sealed: str) -> str | None:
        """The plaintext of a row sealed for `key`, or None when this processor cannot open it."""
        prefix, _, rest = sealed.partition(f"{_SEALED_PREFIX}.")
        kid, _, encoded = rest.partition(".")
        cipher = self._cipher(kid) if not prefix else None
        if cipher is None:
            return None
        try:
            raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            plain = aead_open(cipher, raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], key.encode())
            return plain.decode() if plain is not None else None
        except (ValueError, binascii.Error):
            return None


# cryptography is imported where a key is first derived or a sealed value first opened, not with this module: its
# bindings take about 8 MB, which a processor whose products use no sessions, credential auths or signed storage
# URLs never needs.


def derive_key(root: bytes, info: bytes, length: int = 32) -> bytes:
    """A key derived from a root key with HKDF-SHA256 under the label `info` (one label per use of the roots)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(root)


def aead(key: bytes) -> AESGCM:
    """AES-GCM under `key`."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def aead_open(cipher: AESGCM, nonce: bytes, sealed: bytes, associated: bytes) -> bytes | None:
    """The plaintext of `sealed`, or None when it does not authenticate (another key, other data, tampered)."""
    from cryptography.exceptions import InvalidTag

    try:
        return cipher.decrypt(nonce, sealed, associated)
    except InvalidTag:
        return None
