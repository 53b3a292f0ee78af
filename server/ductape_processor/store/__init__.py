"""The processor's own durable state behind one interface: SQLite (embedded default) and PostgreSQL."""

from ductape_processor.store.base import ProductRevision, Store, VersionRecord
from ductape_processor.store.factory import open_store

__all__ = ["ProductRevision", "Store", "VersionRecord", "open_store"]
