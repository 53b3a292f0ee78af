"""docs/architecture.md stays true to the tree: every file or folder it names exists, and every package is named."""

from __future__ import annotations

import re

from tests.conftest import ROOT

ARCHITECTURE = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "server" / "ductape_processor"
_TOP_LEVEL = ("server/", "tests/", "docs/", "protos/", "clients/", "bench/", "examples/")
# A code span that names a path: folders end in '/', files in one of these suffixes.
_PATH = re.compile(r"`([A-Za-z0-9_./<>-]+(?:/|\.py|\.md|\.proto|\.json))`")


def named_paths(text: str) -> list[str]:
    """The paths a page names in code spans (`<system>` placeholders left out)."""
    return [path for path in _PATH.findall(text) if "<" not in path]


def test_every_path_the_architecture_page_names_exists() -> None:
    names = named_paths(ARCHITECTURE.read_text(encoding="utf-8"))
    assert len(names) > 40, "the page names the modules it describes"
    missing = [name for name in names if not (ROOT / name if name.startswith(_TOP_LEVEL) else PACKAGE / name).exists()]
    assert missing == [], f"docs/architecture.md names paths that do not exist: {missing}"


def test_the_architecture_page_names_every_package_of_the_server() -> None:
    names = set(named_paths(ARCHITECTURE.read_text(encoding="utf-8")))
    packages = sorted(
        f"{path.parent.relative_to(PACKAGE).as_posix()}/"
        for path in PACKAGE.rglob("__init__.py")
        if path.parent != PACKAGE
    )
    unnamed = [package for package in packages if package not in names]
    assert unnamed == [], f"docs/architecture.md does not name these packages: {unnamed}"


def test_a_missing_path_is_found() -> None:
    assert named_paths(
        "see `runtime/nowhere.py` and `api/` but not `$Secret{X}` or `adapters/brokers/<system>.py`"
    ) == [
        "runtime/nowhere.py",
        "api/",
    ]
