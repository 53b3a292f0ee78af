"""Choose and open the store the settings name."""

from __future__ import annotations

from pathlib import Path

from ductape_processor.store.base import Store


def open_store(spec: str, data_dir: Path, schema: str = "processor") -> Store:
    """Build (not yet open) the store for `spec`: `sqlite`, `sqlite:///path`, or a `postgresql://` DSN."""
    if spec == "sqlite":
        from ductape_processor.store.sqlite import SqliteStore

        return SqliteStore(data_dir / "processor.db")
    if spec.startswith("sqlite:///"):
        from ductape_processor.store.sqlite import SqliteStore

        return SqliteStore(Path(spec.removeprefix("sqlite:///")))
    if spec.startswith(("postgresql://", "postgres://")):
        from ductape_processor.store.postgres import PostgresStore

        return PostgresStore(spec, schema)
    raise ValueError("store must be 'sqlite', 'sqlite:///path/to/file.db' or a postgresql:// DSN")
