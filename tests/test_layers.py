"""The import rules of docs/architecture.md's "Rules the layers keep": nothing under `api/` imports the store or the
adapters, and the adapters import from the runtime only the policies, the manifest's settings models and the broker
messages. And the size rule of issue 10: no module of the server is over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

SERVER = ROOT / "server"
PACKAGE = SERVER / "ductape_processor"
API_MAY_NOT_IMPORT = ("ductape_processor.store", "ductape_processor.adapters")
ADAPTERS_MAY_IMPORT_FROM_RUNTIME = (
    "ductape_processor.runtime.policies",
    "ductape_processor.runtime.registry.manifest",
    "ductape_processor.runtime.registry.storage",
    "ductape_processor.runtime.registry.databases",  # the databases section of the manifest: its settings models
    "ductape_processor.runtime.registry.notifications",  # the notifications section: the providers' settings
    "ductape_processor.runtime.notifications.addresses",  # mailbox parsing, shared by the manifest and SMTP
    "ductape_processor.runtime.brokers.messages",
)


MAX_MODULE_LINES = 500
"""A module that would grow past this is split by what its parts do (as `runtime/templates/` and `store/` were)."""


def imports(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """Every name `source` (the module `module`) imports, made absolute, with its line: `import a.b` gives `a.b`,
    `from a import b` gives `a.b` (b may be a module), relative imports are resolved, imports inside functions
    count."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def modules_under(folder: str) -> list[tuple[Path, str]]:
    """The modules of a folder of the server package, with their dotted names."""
    found = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        dotted = ".".join(path.relative_to(SERVER).with_suffix("").parts)
        found.append((path, dotted.removesuffix(".__init__")))
    return found


def test_no_module_under_api_imports_the_store_or_the_adapters() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path, module in modules_under("api")
        for line, name in imports(path.read_text(), module, is_package=path.name == "__init__.py")
        if within(name, API_MAY_NOT_IMPORT)
    ]
    assert len(modules_under("api")) > 5
    assert found == [], "api/ converts messages and calls the runtime only:\n" + "\n".join(found)


def test_adapters_import_from_the_runtime_only_what_they_share_with_it() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path, module in modules_under("adapters")
        for line, name in imports(path.read_text(), module, is_package=path.name == "__init__.py")
        if within(name, ("ductape_processor.runtime",)) and not within(name, ADAPTERS_MAY_IMPORT_FROM_RUNTIME)
    ]
    assert found == [], "docs/architecture.md lists what adapters may import from the runtime:\n" + "\n".join(found)


def test_the_scan_finds_each_way_of_importing_a_forbidden_layer() -> None:
    source = (
        "import ductape_processor.store.base\n"
        "from ductape_processor.adapters.brokers.base import BrokerAdapter\n"
        "from ductape_processor import adapters\n"
        "from ..store import sql\n"
        "from .. import store\n"
        "def lazy():\n    from ductape_processor.store.base import Store\n"
        "from ductape_processor.runtime.brokers.messages import IncomingEvent\n"
        "from ductape_processor.runtime.registry import store_notes\n"
        "from .values import timestamp\n"
    )
    found = [
        (line, name)
        for line, name in imports(source, "ductape_processor.api.example")
        if within(name, API_MAY_NOT_IMPORT)
    ]
    assert found == [
        (1, "ductape_processor.store.base"),
        (2, "ductape_processor.adapters.brokers.base.BrokerAdapter"),
        (3, "ductape_processor.adapters"),
        (4, "ductape_processor.store.sql"),
        (5, "ductape_processor.store"),
        (7, "ductape_processor.store.base.Store"),
    ]
    assert imports("from . import status\n", "ductape_processor.api", is_package=True) == [
        (1, "ductape_processor.api.status")
    ]


def test_no_module_of_the_server_is_over_500_lines() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    lengths = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in modules}
    over = [f"{path.relative_to(ROOT)}: {n} lines" for path, n in lengths.items() if n > MAX_MODULE_LINES]
    assert len(modules) > 100
    assert over == [], f"modules over {MAX_MODULE_LINES} lines (split them):\n" + "\n".join(over)
