"""Compiling templates: `compile_template` walks a JSON value and parses each string that holds a `$` into nodes.

Everything a template can say is checked here (syntax, names of selectors and operators, their arity, literal-only
operator calls, which are evaluated now), so that a call can only fail on data.
"""

from __future__ import annotations

from typing import Any, Final, cast

from pydantic import JsonValue

from ductape_processor.runtime.templates.nodes import (
    Array,
    Literal,
    Node,
    Object,
    Operator,
    Reference,
    RenderError,
    Secret,
    Selector,
    Template,
    Text,
    Whole,
)
from ductape_processor.runtime.templates.operators import COMPARISONS, OPERATOR_NAMES, OPERATORS, arity_text
from ductape_processor.runtime.templates.scope import RenderState, Scope
from ductape_processor.runtime.templates.values import DIGITS, BadValue, json_kind, number_value, scan_number, to_text

MAX_TEMPLATE_LENGTH: Final = 65_536
"""Characters in one template string."""
MAX_TEMPLATE_TOTAL_LENGTH: Final = 1_048_576
"""Characters in all the strings of one compiled value."""
MAX_NESTING: Final = 32
"""Levels of operators and array literals inside one another."""
MAX_VALUE_DEPTH: Final = 64
"""Levels of objects and arrays in a compiled value."""

SELECTOR_KINDS: Final = frozenset(
    {"Input", "Secret", "Session", "Auth", "Variable", "Constant", "Sequence", "Default", "Response"}
)
AUTH_PARTS: Final = frozenset({"headers", "query", "body", "params"})
RESPONSE_PARTS: Final = frozenset({"status", "headers", "body"})

_SELECTOR_NAMES = SELECTOR_KINDS | {"Token"}
_KNOWN_NAMES = _SELECTOR_NAMES | OPERATOR_NAMES
_BY_LOWER_NAME = {name.lower(): name for name in _KNOWN_NAMES}
_ASCII_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_NAME_CHARS = _ASCII_LETTERS | DIGITS | {"_"}
_SPACE = frozenset(" \t\r\n")
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}
_MAX_INDEX_DIGITS = 9
_FOLD_SCOPE = Scope()


class TemplateError(ValueError):
    """A template that cannot be compiled: bad syntax, an unknown selector or operator, a wrong number of arguments.

    `path` is where the template sits in the manifest (given by the caller of `compile_template`), `position` the
    offset of the offending text in the template string, `reason` the problem alone.
    """

    def __init__(self, reason: str, *, path: str = "", position: int | None = None, text: str = "") -> None:
        self.reason = reason
        self.path = path
        self.position = position
        self.text = text
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = f"{self.path}: " if self.path else ""
        if self.position is None:
            return f"{where}{self.reason}"
        return f"{where}{self.reason} (at position {self.position} of {_snippet(self.text, self.position)})"


def _snippet(text: str, position: int) -> str:
    start = max(0, position - 30)
    end = min(len(text), position + 30)
    return ("…" if start else "") + repr(text[start:end]) + ("…" if end < len(text) else "")


def compile_template(value: JsonValue, path: str = "") -> Template:
    """Parse a JSON value whose strings may hold selectors and operators; `path` locates it in the manifest.

    Raises `TemplateError` for anything that cannot be right whatever the call's data.
    """
    compiler = _Compiler()
    root = compiler.value(value, path, 0)
    return Template(root, path, tuple(compiler.references))


def _child_path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class _Compiler:
    """Walks a JSON value, parsing its strings; collects the references and the total length."""

    def __init__(self) -> None:
        self.references: list[Reference] = []
        self.length = 0

    def value(self, value: Any, path: str, depth: int) -> Node:
        if isinstance(value, str):
            return self.string(value, path)
        if value is None or isinstance(value, bool | int | float):
            return Literal("", value)
        if depth >= MAX_VALUE_DEPTH:
            raise TemplateError(f"objects and arrays are nested more than {MAX_VALUE_DEPTH} levels deep", path=path)
        if isinstance(value, dict):
            items: list[tuple[str, Node]] = []
            for key, child in value.items():
                if not isinstance(key, str):
                    raise TemplateError(f"an object key must be a string, not {json_kind(key)}", path=path)
                items.append((key, self.value(child, _child_path(path, key), depth + 1)))
            if all(isinstance(node, Literal) for _, node in items):
                rendered = {key: cast(Literal, node).value for key, node in items}
                same = all(rendered[key] is original for key, original in value.items())
                return Literal("", value if same else rendered)
            return Object("", tuple(items))
        if isinstance(value, list):
            nodes = [self.value(child, _child_path(path, index), depth + 1) for index, child in enumerate(value)]
            if all(isinstance(node, Literal) for node in nodes):
                values = [cast(Literal, node).value for node in nodes]
                same = all(new is old for new, old in zip(values, value, strict=True))
                return Literal("", value if same else values)
            return Array("", tuple(nodes))
        raise TemplateError(f"{json_kind(value)} is not a JSON value", path=path)

    def string(self, text: str, path: str) -> Node:
        if len(text) > MAX_TEMPLATE_LENGTH:
            raise TemplateError(f"a template string is longer than {MAX_TEMPLATE_LENGTH} characters", path=path)
        self.length += len(text)
        if self.length > MAX_TEMPLATE_TOTAL_LENGTH:
            raise TemplateError(f"the template is longer than {MAX_TEMPLATE_TOTAL_LENGTH} characters", path=path)
        if "$" not in text:
            return Literal("", text)
        parts = _Parser(text, path, self.references).parse()
        if len(parts) == 1 and isinstance(parts[0], Node):
            node = parts[0]
            return node if isinstance(node, Literal) else Whole(text, node, path)
        merged: list[str | Node] = []
        for part in parts:
            if isinstance(part, Literal):
                literal = part
                try:
                    part = to_text(literal.value)
                except BadValue as exc:
                    raise TemplateError(f"{literal.text}: {exc.message}", path=path) from None
            if isinstance(part, str) and merged and isinstance(merged[-1], str):
                merged[-1] += part
            elif part != "":
                merged.append(part)
        if not merged:
            return Literal("", "")
        if len(merged) == 1 and isinstance(merged[0], str):
            return Literal("", merged[0])
        return Text(text, tuple(merged), path)


def _is_secret_name(name: str) -> bool:
    # The same rule as manifest.SECRET_NAME, without importing the manifest (which may come to import this module).
    return (
        0 < len(name) <= 128 and (name[0] in _ASCII_LETTERS or name[0] == "_") and all(c in _NAME_CHARS for c in name)
    )


class _Parser:
    """Parses one template string into literal text and expression nodes."""

    def __init__(self, text: str, path: str, references: list[Reference]) -> None:
        self.s = text
        self.n = len(text)
        self.path = path
        self.references = references

    def error(self, reason: str, position: int) -> TemplateError:
        return TemplateError(reason, path=self.path, position=position, text=self.s)

    def parse(self) -> list[str | Node]:
        s, n = self.s, self.n
        parts: list[str | Node] = []
        text: list[str] = []
        i = 0
        while True:
            j = s.find("$", i)
            if j < 0:
                text.append(s[i:])
                break
            text.append(s[i:j])
            if j + 1 < n and s[j + 1] == "$":
                text.append("$")
                i = j + 2
                continue
            end = self.name_end(j + 1)
            name = s[j + 1 : end]
            if name in _KNOWN_NAMES:
                node, i = self.expression(j, name, end, 0)
                parts.append("".join(text))
                text = []
                parts.append(node)
                continue
            if name and end < n and s[end] in "{(":
                self.unknown(name, j, s[end])
            text.append(s[j:end] if name else "$")
            i = end if name else j + 1
        parts.append("".join(text))
        return [part for part in parts if part != ""]

    def name_end(self, i: int) -> int:
        s, n = self.s, self.n
        if i < n and s[i] in _ASCII_LETTERS:
            i += 1
            while i < n and s[i] in _NAME_CHARS:
                i += 1
        return i

    def unknown(self, name: str, position: int, bracket: str) -> None:
        """Refuse `$Name{` / `$Name(` with an unknown name; a lowercase name with no near match is plain text."""
        kind = "selector" if bracket == "{" else "operator"
        near = _BY_LOWER_NAME.get(name.lower())
        if near is not None:
            raise self.error(f"unknown {kind} ${name} (names are case-sensitive: did you mean ${near}?)", position)
        if name[0].isupper():
            known = ", ".join(
                f"${known}" for known in sorted(_SELECTOR_NAMES if kind == "selector" else OPERATOR_NAMES)
            )
            raise self.error(f"unknown {kind} ${name} (known: {known}; write $$ for a literal $)", position)

    def skip_space(self, i: int) -> int:
        while i < self.n and self.s[i] in _SPACE:
            i += 1
        return i

    def expression(self, start: int, name: str, end: int, depth: int) -> tuple[Node, int]:
        if name in OPERATORS:
            return self.operator(start, name, end, depth)
        return self.selector(start, name, end)

    def selector(self, start: int, name: str, i: int) -> tuple[Node, int]:
        s, n = self.s, self.n
        keys: list[str | int] = []
        while i < n and s[i] == "{":
            close = s.find("}", i + 1)
            if close < 0:
                raise self.error(f"${name}: '{{' is never closed", i)
            key = s[i + 1 : close]
            if "{" in key:
                raise self.error(f"${name}: a key may not contain '{{'", i + 1 + key.index("{"))
            if not key:
                raise self.error(f"${name}: empty key {{}}", i)
            if key[0] == "[":
                digits = key[1:-1] if key[-1] == "]" else ""
                if not digits or len(digits) > _MAX_INDEX_DIGITS or any(c not in DIGITS for c in digits):
                    raise self.error(f"${name}: {{{key}}} is not an array index such as {{[0]}}", i)
                keys.append(int(digits))
            else:
                keys.append(key)
            i = close + 1
        text = s[start:i]
        kind = "Secret" if name == "Token" else name
        self.check_selector(kind, name, keys, start)
        node: Node = Secret(text, str(keys[0])) if kind == "Secret" else Selector(text, name, tuple(keys))
        self.references.append(Reference(kind, tuple(keys), text, self.path))
        return node, i

    def check_selector(self, kind: str, name: str, keys: list[str | int], position: int) -> None:
        names = [key for key in keys[:2] if isinstance(key, str)]
        if kind == "Default":
            if keys:
                raise self.error("$Default takes no keys", position)
        elif kind == "Secret":
            if len(keys) != 1 or not isinstance(keys[0], str) or not _is_secret_name(keys[0]):
                raise self.error(
                    f"${name}{{NAME}} names one secret: letters, digits and '_', not starting with a digit, "
                    "at most 128 characters",
                    position,
                )
        elif kind in ("Variable", "Constant"):
            if len(names) < 2:
                raise self.error(f"${name} needs an app tag and a key: ${name}{{app}}{{key}}", position)
        elif kind == "Auth":
            if len(names) < 2 or names[1] not in AUTH_PARTS:
                raise self.error(
                    "$Auth needs an auth tag and a part (headers, query, body or params): $Auth{tag}{headers}{key}",
                    position,
                )
        elif kind == "Sequence":
            if len(names) < 2:
                raise self.error("$Sequence needs a sequence and an event tag: $Sequence{seq}{event}{key}", position)
        elif kind == "Response" and keys and keys[0] not in RESPONSE_PARTS:
            raise self.error("$Response reads {status}, {headers} or {body} of the login response", position)

    def operator(self, start: int, name: str, i: int, depth: int) -> tuple[Node, int]:
        if depth >= MAX_NESTING:
            raise self.error(f"operators and arrays are nested more than {MAX_NESTING} levels deep", start)
        if i >= self.n or self.s[i] != "(":
            raise self.error(f"${name} is an operator: write ${name}(…)", start)
        args, end = self.arguments(i + 1, depth + 1, ")", i)
        fn, low, high = OPERATORS[name]
        if len(args) < low or (high is not None and len(args) > high):
            raise self.error(f"${name} takes {arity_text(low, high)}, not {len(args)}", start)
        if name in ("Filter", "Find"):
            op = args[-2]
            if isinstance(op, Literal) and (not isinstance(op.value, str) or op.value not in COMPARISONS):
                raise self.error(f"${name}: the comparison must be one of > < >= <= == !=, not {op.text}", start)
        node = Operator(self.s[start:end], fn, tuple(args))
        if all(isinstance(arg, Literal) for arg in args):
            return self.fold(node, start), end
        return node, end

    def fold(self, node: Node, position: int) -> Literal:
        """Evaluate an expression of literals now: its errors become compile errors, its renders cost nothing."""
        try:
            return Literal(node.text, node.eval(_FOLD_SCOPE, RenderState()))
        except RenderError as exc:
            raise self.error(f"{exc.selector}: {exc.message}", position) from None

    def arguments(self, i: int, depth: int, close: str, opened: int) -> tuple[list[Node], int]:
        items: list[Node] = []
        i = self.skip_space(i)
        if i < self.n and self.s[i] == close:
            return items, i + 1
        while True:
            node, i = self.argument(i, depth)
            items.append(node)
            i = self.skip_space(i)
            if i >= self.n:
                raise self.error(f"'{'(' if close == ')' else '['}' is never closed by '{close}'", opened)
            c = self.s[i]
            if c == ",":
                i = self.skip_space(i + 1)
                continue
            if c == close:
                return items, i + 1
            raise self.error(f"expected ',' or '{close}', found {c!r}", i)

    def argument(self, i: int, depth: int) -> tuple[Node, int]:
        s, n = self.s, self.n
        if i >= n:
            raise self.error("expected a value, found the end of the text", i)
        c = s[i]
        if c == "$":
            end = self.name_end(i + 1)
            name = s[i + 1 : end]
            if name in _KNOWN_NAMES:
                return self.expression(i, name, end, depth)
            if name and end < n and s[end] in "{(":
                self.unknown(name, i, s[end])
            raise self.error(f'{s[i:end]!r} is not a selector or an operator (quote text as "…")', i)
        if c in "\"'":
            return self.string_literal(i)
        if c == "[":
            if depth >= MAX_NESTING:
                raise self.error(f"operators and arrays are nested more than {MAX_NESTING} levels deep", i)
            items, end = self.arguments(i + 1, depth + 1, "]", i)
            node: Node = Array(s[i:end], tuple(items))
            if all(isinstance(item, Literal) for item in items):
                node = self.fold(node, i)
            return node, end
        if c == "-" or c in DIGITS:
            end = scan_number(s, i)
            if end == i:
                raise self.error(f"malformed number starting with {c!r}", i)
            value = number_value(s[i:end])
            if value is None:
                raise self.error(f"the number {s[i:end][:40]!r} is too long or out of range", i)
            return Literal(s[i:end], value), end
        end = self.name_end(i)
        word = s[i:end]
        if word in ("true", "false", "null"):
            return Literal(word, {"true": True, "false": False, "null": None}[word]), end
        found = repr(word) if word else repr(c)
        raise self.error(
            f"expected a value (a selector, an operator, a quoted string, a number, true, false, null or [...]), "
            f'found {found}; quote text as "…"',
            i,
        )

    def string_literal(self, start: int) -> tuple[Node, int]:
        s, n = self.s, self.n
        quote = s[start]
        out: list[str] = []
        i = start + 1
        while i < n:
            c = s[i]
            if c == quote:
                return Literal(s[start : i + 1], "".join(out)), i + 1
            if c == "\\":
                if i + 1 >= n:
                    break
                escaped = _ESCAPES.get(s[i + 1])
                if escaped is None:
                    raise self.error(f"unknown escape \\{s[i + 1]} (use \\\\ \\\" \\' \\n \\t or \\r)", i)
                out.append(escaped)
                i += 2
                continue
            out.append(c)
            i += 1
        raise self.error("a string is never closed", start)
