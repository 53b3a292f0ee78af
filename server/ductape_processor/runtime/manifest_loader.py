"""Reading manifest bytes (YAML or JSON) into a validated `Manifest`, or into the list of every problem found.

Parsing is defensive: the document size is bounded by the caller, duplicate keys are refused, YAML aliases cannot
expand into a huge document, and YAML 1.1's surprises are switched off (`on`, `yes` and `no` stay strings, dates
stay strings, mapping keys are always the text written).
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from ductape_processor.errors import FieldViolation, InvalidManifest
from ductape_processor.runtime.action_plan import plan_problems
from ductape_processor.runtime.manifest import Manifest, reference_problems, secret_problems

MAX_NODES = 200_000
MAX_DEPTH = 64


class ManifestFormat(enum.IntEnum):
    """How a manifest is encoded; the values match the `ManifestFormat` proto enum."""

    UNSPECIFIED = 0
    YAML = 1
    JSON = 2


@dataclass(frozen=True, slots=True)
class LoadedManifest:
    """A validated manifest with the forms the registry stores."""

    model: Manifest
    document: dict[str, Any]
    canonical_json: str
    checksum: str
    source: bytes
    format: ManifestFormat


class _ManifestYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans, no timestamps, literal string keys and no duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark
                )
            key = str(key_node.value)
            if key in mapping:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


_ManifestYamlLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ManifestYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_ManifestYamlLoader.add_constructor("tag:yaml.org,2002:map", _ManifestYamlLoader.construct_mapping)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise ValueError(f"duplicate key {key!r}")
        mapping[key] = value
    return mapping


def _bounded(document: object) -> None:
    """Refuse documents too deep or too large once aliases are expanded (e.g. the 'billion laughs')."""
    count = 0
    stack: list[tuple[object, int]] = [(document, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ValueError(f"the manifest has more than {MAX_NODES} values (counting YAML aliases expanded)")
        if depth > MAX_DEPTH:
            raise ValueError(f"the manifest nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)
        elif isinstance(node, float) and (node != node or node in (float("inf"), float("-inf"))):
            raise ValueError("NaN and infinite numbers are not allowed in a manifest")


def detect_format(source: bytes, declared: ManifestFormat) -> ManifestFormat:
    """The declared format, or JSON when the content starts with `{`, else YAML."""
    if declared != ManifestFormat.UNSPECIFIED:
        return declared
    return ManifestFormat.JSON if source.lstrip()[:1] == b"{" else ManifestFormat.YAML


def parse_document(source: bytes, fmt: ManifestFormat) -> dict[str, Any]:
    """Parse manifest bytes into plain data; raise InvalidManifest with the syntax problem."""
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidManifest([FieldViolation("", f"the manifest is not UTF-8 (byte {exc.start})")]) from None
    try:
        if fmt == ManifestFormat.JSON:
            document = json.loads(text, object_pairs_hook=_json_pairs)
        else:
            document = yaml.load(text, Loader=_ManifestYamlLoader)  # noqa: S506 - a SafeLoader subclass
        _bounded(document)
    except yaml.YAMLError as exc:
        raise InvalidManifest([FieldViolation("", f"YAML syntax error: {exc}")]) from None
    except (ValueError, RecursionError) as exc:
        kind = "JSON syntax error" if fmt == ManifestFormat.JSON else "invalid YAML"
        raise InvalidManifest([FieldViolation("", f"{kind}: {exc}")]) from None
    if not isinstance(document, dict):
        raise InvalidManifest(
            [FieldViolation("", "a manifest is a mapping with at least `product` and `environments`")]
        )
    return document


def _path(document: object, loc: Sequence[int | str]) -> str:
    """Turn a pydantic error location into a manifest path, dropping union discriminators pydantic inserts."""
    path = ""
    node: object = document
    for part in loc:
        if isinstance(node, list) and isinstance(part, int):
            path += f"[{part}]"
            node = node[part] if part < len(node) else None
            continue
        if isinstance(node, dict) and part in node:
            path += f".{part}" if path else str(part)
            node = node[part]
            continue
        if (isinstance(node, dict) and node.get("type") == part) or part == "[key]":
            continue
        path += f".{part}" if path else str(part)
        node = None
    return path


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field: not part of the manifest schema (see docs/manifest.md)"
    if kind == "missing":
        return "required field is missing"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def validate_document(document: dict[str, Any]) -> Manifest:
    """Validate parsed data into a `Manifest`; raise InvalidManifest listing every problem with its path."""
    try:
        model = Manifest.model_validate(document)
    except ValidationError as exc:
        violations = [FieldViolation(_path(document, err["loc"]), _message(err)) for err in exc.errors()]
        violations += [FieldViolation(p, m) for p, m in secret_problems(document)]
        raise InvalidManifest(violations) from None
    problems = reference_problems(model) + secret_problems(document)
    if not problems:
        problems = plan_problems(model)
    if problems:
        raise InvalidManifest([FieldViolation(path, why) for path, why in problems])
    return model


def canonical_json(document: dict[str, Any]) -> str:
    """The canonical JSON form: sorted keys, no spaces. Identical content, identical text, whatever the source."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def load_manifest(source: bytes, declared: ManifestFormat = ManifestFormat.UNSPECIFIED) -> LoadedManifest:
    """Parse and validate manifest bytes; raise InvalidManifest with every problem found."""
    fmt = detect_format(source, declared)
    document = parse_document(source, fmt)
    model = validate_document(document)
    text = canonical_json(document)
    checksum = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return LoadedManifest(model, document, text, checksum, source, fmt)
