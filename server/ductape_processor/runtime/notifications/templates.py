"""Message templates: the `{{name}}` placeholders of a notification's messages, rendered by Jinja2's sandbox.

Why Jinja2 and not the processor's own engine (`runtime/templates/`): that engine renders selectors
(`$Input{…}`, `$Secret{…}`) into JSON values; it has no `{{name}}` syntax, no HTML escaping, and it reports the first
missing value, not all of them. Jinja2's `ImmutableSandboxedEnvironment` gives `{{name}}` (and `{{user.name}}`,
filters, conditions) with attribute access limited to safe data, autoescaping for the HTML parts, and an AST from
which the names a template reads are listed at apply time (`jinja2.meta.find_undeclared_variables`), so a call
missing some is refused with every missing name before anything is sent. `StrictUndefined` makes anything the
list cannot see (a missing key inside a given object) an error instead of an empty string. Templates never see
secrets: their only values are the call's variables. docs/notifications.md says the same to users.

The two environments below keep no compiled templates (`cache_size=0`): compiled templates are cached by the
runtime (`render.MessageTemplates`), bounded, keyed by their text. This module imports no other part of the
processor: the manifest's models (`runtime/registry/notifications.py`) check templates with it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # Jinja2 (about 4 MB) is imported when a product's notifications first need it
    from jinja2 import Template as JinjaTemplate
    from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_MESSAGE_TEMPLATE: Final = 65_536
"""Characters in one message template."""
MAX_RENDERED: Final = 1_048_576
"""Characters a rendered template may hold."""


@functools.cache
def _environment(html: bool) -> ImmutableSandboxedEnvironment:
    """The sandbox for plain text or (autoescaping) HTML templates; built on first use."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(
        autoescape=html, undefined=StrictUndefined, keep_trailing_newline=True, cache_size=0, auto_reload=False
    )


class TemplateRenderError(ValueError):
    """A template could not be rendered with the values given: `missing` lists the variables it uses that the call
    did not give (sorted), or `message` says what else went wrong."""

    def __init__(self, message: str, missing: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.missing = missing


def template_variables(source: str, *, html: bool = False) -> frozenset[str]:
    """The top-level variables `source` reads; raise ValueError with the problem when it is not a valid template."""
    if len(source) > MAX_MESSAGE_TEMPLATE:
        raise ValueError(f"a template holds at most {MAX_MESSAGE_TEMPLATE} characters")
    from jinja2 import TemplateSyntaxError, meta

    try:
        ast = _environment(html).parse(source)
    except TemplateSyntaxError as exc:
        raise ValueError(f"template syntax error on line {exc.lineno}: {exc.message}") from None
    return frozenset(meta.find_undeclared_variables(ast))


@dataclass(frozen=True, slots=True)
class CompiledTemplate:
    """A template ready to render, and the variables it reads."""

    template: JinjaTemplate
    variables: frozenset[str]

    def render(self, values: Mapping[str, Any]) -> str:
        """The text; raise TemplateRenderError listing missing variables, or naming what else failed."""
        from jinja2.exceptions import SecurityError, TemplateError, UndefinedError

        missing = tuple(sorted(self.variables - values.keys()))
        if missing:
            raise TemplateRenderError(f"missing variables: {', '.join(missing)}", missing)
        try:
            text = self.template.render(dict(values))
        except UndefinedError as exc:
            raise TemplateRenderError(f"a variable lacks a value the template reads: {exc.message}") from None
        except SecurityError as exc:
            raise TemplateRenderError(f"the template did something the sandbox forbids: {exc}") from None
        except (TemplateError, TypeError, ValueError, ArithmeticError) as exc:
            raise TemplateRenderError(f"rendering failed: {type(exc).__name__}: {exc}") from None
        if len(text) > MAX_RENDERED:
            raise TemplateRenderError(f"the rendered text is longer than {MAX_RENDERED} characters")
        return text


def compile_message_template(source: str, *, html: bool = False) -> CompiledTemplate:
    """`source` compiled (it was checked when its manifest was applied)."""
    return CompiledTemplate(_environment(html).from_string(source), template_variables(source, html=html))
