"""Databases read as an attacker would: a manifest author or a caller trying to reach past their own database
(other files, other products, the processor's store), to turn a value into SQL, or to make the processor hold more
than its bounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ductape.processor import FailedPreconditionError

from tests.conftest import ServerFactory
from tests.test_databases import open_db

# -- SQLite: one file per database, nothing else ----------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "ATTACH DATABASE :file AS other",
        "VACUUM INTO :file",
    ],
)
async def test_a_sqlite_statement_cannot_open_another_file(
    start_server: ServerFactory, tmp_path: Path, query: str
) -> None:
    actions: list[dict[str, Any]] = [
        {"tag": "reach", "type": "execute", "query": query, "params": {"file": "$Input{data}{file}"}},
        {"tag": "fixed", "type": "execute", "query": query.replace(":file", "'elsewhere.db'")},
        {"tag": "vacuum", "type": "execute", "query": "VACUUM"},
        {"tag": "pragma", "type": "execute", "query": f"PRAGMA temp_store_directory = '{tmp_path}'"},
    ]
    db = await open_db(start_server, "sqlite", actions)
    data_dir = Path(db.running.app.settings.data_dir)
    store = data_dir / "processor.db"
    assert store.exists()
    outside = tmp_path / "copy.db"
    for file in (str(store), str(outside)):
        with pytest.raises(FailedPreconditionError) as caught:
            await db.execute("reach", data={"file": file})
        assert caught.value.reason == "DB_QUERY_INVALID"
    with pytest.raises(FailedPreconditionError):
        await db.execute("fixed")
    with pytest.raises(FailedPreconditionError):
        await db.execute("pragma")
    assert not outside.exists()
    assert not list(Path.cwd().glob("elsewhere.db"))
    # The database's own statements still run, a plain VACUUM (which attaches a private temporary file) included.
    await db.execute("vacuum")
    await db.execute("create", data={"id": 1, "email": "a@x", "name": "A", "score": 1})
    assert (await db.execute("count", filter={"min": 0})).count == 1
    await db.execute("teardown")
