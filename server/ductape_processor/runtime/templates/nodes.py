"""The compiled form of a template: one tree of nodes (selectors, operators, literals, and the JSON objects, arrays
and strings around them), and `Template`, what `compile_template` returns."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, cast

from pydantic import JsonValue

from ductape_processor.runtime.templates.operators import OperatorFn
from ductape_processor.runtime.templates.scope import NO_DEFAULT, RenderState, Scope
from ductape_processor.runtime.templates.taint import SECRET_KINDS, SENSITIVE_KINDS
from ductape_processor.runtime.templates.values import BadValue, counted, json_kind, to_text


class RenderError(Exception):
    """A template that cannot be rendered for this call: a selector found nothing, or an operator got bad input.

    `selector` is the selector or operator expression as written (`$Input{body}{email}`), `message` says why, and
    `path` is where the template sits in the manifest. Messages name keys and types, never values.
    """

    def __init__(self, selector: str, message: str, path: str = "") -> None:
        super().__init__(selector, message)
        self.selector = selector
        self.message = message
        self.path = path

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        selector = self.selector if len(self.selector) <= 200 else self.selector[:199] + "…"
        return f"{where}{selector}: {self.message}"


# ---------------------------------------------------------------------------------------------------------------
# Expression nodes


@dataclass(slots=True, eq=False)
class Node(abc.ABC):
    """One expression, or one JSON value of a template with expressions inside."""

    text: str
    """What was written, for error messages: the expression, or the template string; "" for an object or an array
    of the template's JSON."""

    @abc.abstractmethod
    def eval(self, scope: Scope, budget: RenderState) -> Any:
        """The value for this scope."""


@dataclass(slots=True, eq=False)
class Literal(Node):
    """A quoted string, a number, true, false, null, an expression of literals evaluated at compile time, or a
    value of the template's JSON that reads nothing."""

    value: Any

    def eval(self, scope: Scope, budget: RenderState) -> Any:
        return self.value


def _root_session(scope: Scope) -> Any:
    if scope.session is None:
        raise BadValue("the call carries no session")
    return scope.session


def _root_response(scope: Scope) -> Any:
    if scope.response is None:
        raise BadValue("there is no login response here ($Response is read by an auth's headers, query and body)")
    return scope.response


def _root_default(scope: Scope) -> Any:
    if scope.default is NO_DEFAULT:
        raise BadValue("this field has no default value")
    return scope.default


_ROOTS: dict[str, Callable[[Scope], Any]] = {
    "Input": attrgetter("input"),
    "Variable": attrgetter("variables"),
    "Constant": attrgetter("constants"),
    "Auth": attrgetter("auth"),
    "Sequence": attrgetter("sequence"),
    "Session": _root_session,
    "Response": _root_response,
    "Default": _root_default,
}


def _key_text(key: str | int) -> str:
    return f"{{[{key}]}}" if isinstance(key, int) else f"{{{key}}}"


@dataclass(slots=True, eq=False)
class Selector(Node):
    """`$Input{body}{email}` and every other selector but `$Secret`: a root in the scope, then keys."""

    name: str
    keys: tuple[str | int, ...]
    root: Callable[[Scope], Any] = field(init=False)
    secret: bool = field(init=False)
    sensitive: bool = field(init=False)

    def __post_init__(self) -> None:
        self.root = _ROOTS[self.name]
        self.secret = self.name in SECRET_KINDS
        self.sensitive = self.name in SENSITIVE_KINDS

    def _prefix(self, count: int) -> str:
        return "$" + self.name + "".join(_key_text(key) for key in self.keys[:count])

    def eval(self, scope: Scope, budget: RenderState) -> Any:
        try:
            value = self.root(scope)
        except BadValue as exc:
            raise RenderError(self.text, exc.message) from None
        for count, key in enumerate(self.keys):
            # Fast paths for the JSON shapes of nearly every call; the checks below say what went wrong.
            kind = type(value)
            if (kind is dict and type(key) is str and key in value) or (
                kind is list and type(key) is int and key < len(value)
            ):
                value = value[key]
            else:
                value = self._step(value, count, key)
        if self.secret or (scope.taint is not None and type(value) is str and value in scope.taint.texts):
            budget.taint(scope, self.text, value)
        elif self.sensitive and scope.taint is not None:
            scope.taint.add(value)
        return value

    def _step(self, value: Any, count: int, key: str | int) -> Any:
        if isinstance(key, int):
            if not isinstance(value, list | tuple):
                raise RenderError(
                    self.text, f"{self._prefix(count)} is {json_kind(value)}, not an array: [{key}] cannot index it"
                )
            if key >= len(value):
                # The length of a sensitive array (a token's parts) is withheld like its values.
                size = "fewer items" if self.secret else counted(len(value), "item")
                raise RenderError(self.text, f"{self._prefix(count)} has {size}: [{key}] is out of range")
            return value[key]
        if not isinstance(value, Mapping):
            raise RenderError(self.text, f"{self._prefix(count)} is {json_kind(value)}, not an object")
        if key not in value:
            raise RenderError(self.text, f"{self._prefix(count)} has no key {key!r}")
        return value[key]


@dataclass(slots=True, eq=False)
class Secret(Node):
    """`$Secret{NAME}` (and `$Token{NAME}`): one secret, resolved through the scope."""

    secret: str

    def eval(self, scope: Scope, budget: RenderState) -> Any:
        value = scope.secrets(self.secret)
        if value is None:
            raise RenderError(self.text, f"secret {self.secret} is not defined")
        budget.taint(scope, self.text, value)
        return value


def _withheld(operator: str, sources: list[str]) -> str:
    """An operator's error about a sensitive value: which operator and which selectors, never what went wrong."""
    read = ", ".join(dict.fromkeys(sources))
    return f"{operator} cannot use the value of {read} (the reason is withheld: it could reveal the value)"


@dataclass(slots=True, eq=False)
class Operator(Node):
    """`$Name(arguments)`: the arguments evaluated, then the operator's function."""

    fn: OperatorFn
    args: tuple[Node, ...]

    def eval(self, scope: Scope, budget: RenderState) -> Any:
        read = len(budget.sources)
        args = [arg.eval(scope, budget) for arg in self.args]
        try:
            result = self.fn(args, budget)
        except BadValue as exc:
            if len(budget.sources) > read:
                raise RenderError(self.text, _withheld(self.name, budget.sources[read:])) from None
            raise RenderError(self.text, exc.message) from None
        except RecursionError:
            raise RenderError(self.text, "a value is nested too deeply") from None
        if len(budget.sources) > read and scope.taint is not None:
            scope.taint.add(result)
        return result

    @property
    def name(self) -> str:
        """The operator as written, `$Substring`."""
        return self.text[: self.text.index("(")]


# ---------------------------------------------------------------------------------------------------------------
# The JSON around expressions


@dataclass(slots=True, eq=False)
class Whole(Node):
    """A string that is exactly one expression: renders to that expression's own value and type."""

    node: Node
    path: str

    def eval(self, scope: Scope, budget: RenderState) -> Any:
        try:
            return self.node.eval(scope, budget)
        except RenderError as exc:
            exc.path = exc.path or self.path
            raise


@dataclass(slots=True, eq=False)
class Text(Node):
    """Text with expressions inside: each expression's value is written as text."""

    parts: tuple[str | Node, ...]
    path: str
    fixed: int = field(init=False)
    """Characters of the text around the expressions."""

    def __post_init__(self) -> None:
        self.fixed = sum(len(part) for part in self.parts if isinstance(part, str))

    def eval(self, scope: Scope, budget: RenderState) -> Any:
        out: list[str] = []
        current: Node | None = None
        read = len(budget.sources)
        try:
            budget.spend(self.fixed)
            for part in self.parts:
                if isinstance(part, str):
                    out.append(part)
                    continue
                current = part
                before = len(budget.sources)
                value = part.eval(scope, budget)
                if len(budget.sources) > before:
                    try:
                        text = to_text(value)
                    except BadValue:
                        raise RenderError(
                            part.text, "cannot be written as text (the reason is withheld: it could reveal the value)"
                        ) from None
                else:
                    text = to_text(value)
                budget.spend(len(text))
                out.append(text)
        except BadValue as exc:
            node = current or next(part for part in self.parts if isinstance(part, Node))
            raise RenderError(node.text, exc.message, self.path) from None
        except RenderError as exc:
            exc.path = exc.path or self.path
            raise
        rendered = "".join(out)
        if len(budget.sources) > read and scope.taint is not None:
            scope.taint.add(rendered)
        return rendered


@dataclass(slots=True, eq=False)
class Object(Node):
    """An object with at least one value that reads something."""

    items: tuple[tuple[str, Node], ...]

    def eval(self, scope: Scope, budget: RenderState) -> Any:
        return {key: node.eval(scope, budget) for key, node in self.items}


@dataclass(slots=True, eq=False)
class Array(Node):
    """`[a, b, ...]` as an operator's argument, or an array of the template's JSON with at least one item that reads
    something."""

    items: tuple[Node, ...]

    def eval(self, scope: Scope, budget: RenderState) -> Any:
        return [item.eval(scope, budget) for item in self.items]


# ---------------------------------------------------------------------------------------------------------------
# Compiled templates


@dataclass(frozen=True, slots=True)
class Reference:
    """One selector used by a template, for checks at apply time (does that auth, constant or step exist?)."""

    kind: str
    """The selector kind (`Input`, `Secret`, ...); `$Token` is reported as `Secret`."""
    keys: tuple[str | int, ...]
    """The keys after the selector name; an `{[n]}` index is an int."""
    text: str
    """The selector as written."""
    path: str
    """Where the template string sits in the manifest."""


class Template:
    """A compiled template: render it once per call with `render(scope)`."""

    __slots__ = ("_root", "_value", "path", "references", "secret_names", "selectors")

    def __init__(self, root: Node, path: str, references: tuple[Reference, ...]) -> None:
        self._root: Node | None = None if isinstance(root, Literal) else root
        self._value: Any = root.value if isinstance(root, Literal) else None
        self.path = path
        self.references = references
        self.selectors: frozenset[str] = frozenset(ref.kind for ref in references)
        self.secret_names: frozenset[str] = frozenset(str(ref.keys[0]) for ref in references if ref.kind == "Secret")

    @property
    def is_static(self) -> bool:
        """True when the template reads nothing: `render` returns the same value every time, without work."""
        return self._root is None

    def render(self, scope: Scope) -> JsonValue:
        """The template's value for this scope; raises `RenderError` when a selector or an operator fails."""
        if self._root is None:
            return cast(JsonValue, self._value)
        return cast(JsonValue, self._root.eval(scope, RenderState()))

    def __repr__(self) -> str:
        return f"Template(path={self.path!r}, selectors={sorted(self.selectors)!r})"
