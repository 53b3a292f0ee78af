"""Where `$Secret{NAME}` values come from: a secrets file (KEY=VALUE lines), then `PROCESSOR_SECRET_<NAME>`
environment variables.

Only variables with that prefix are secrets: a manifest cannot read the processor's other environment variables
(`PGPASSWORD`, cloud credentials, ...). Values never reach logs, traces, errors or responses; only names do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from ductape_processor.runtime.manifest import SECRET_NAME, SECRET_REFERENCE

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
