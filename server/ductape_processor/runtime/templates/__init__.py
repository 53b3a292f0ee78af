"""The selector and operator template engine shared by every resource kind.

A template is any JSON value whose strings may hold selectors (`$Input{body}{email}`, `$Secret{KEY}`, ...) and
operators (`$Uppercase($Trim($Input{name}))`). `compile_template` parses it once, when a manifest is applied, into a
small tree of nodes; `Template.render` evaluates that tree for each call against a `Scope`, without parsing again and
without regular expressions. Everything a template can say is checked at compile time (syntax, names of selectors
and operators, their arity, literal-only operator calls), so a call can only fail on data: a missing value or a bad
operator input, reported as a `RenderError` that names the selector. `docs/templates.md` is the user's reference.

Rendered values may share structure with the template and with the scope (a static template renders to the very
value it was compiled from; `$Input{body}` renders to the caller's object itself): treat them as read-only.

The layers, each importing only those before it: `values` (JSON values as text, numbers, operands), `taint` (which
values derive from sensitive selectors), `scope` (what a render reads, and one render's state), `operators`,
`nodes` (the compiled form and `Template`), `parser` (`compile_template`).
"""

from ductape_processor.runtime.templates.nodes import Reference, RenderError, Template
from ductape_processor.runtime.templates.operators import OPERATOR_NAMES
from ductape_processor.runtime.templates.parser import (
    AUTH_PARTS,
    MAX_NESTING,
    MAX_TEMPLATE_LENGTH,
    MAX_TEMPLATE_TOTAL_LENGTH,
    MAX_VALUE_DEPTH,
    RESPONSE_PARTS,
    TemplateError,
    compile_template,
)
from ductape_processor.runtime.templates.scope import MAX_RENDERED_LENGTH, Scope
from ductape_processor.runtime.templates.taint import SENSITIVE_KINDS, Taint
from ductape_processor.runtime.templates.values import json_kind

__all__ = [
    "AUTH_PARTS",
    "MAX_NESTING",
    "MAX_RENDERED_LENGTH",
    "MAX_TEMPLATE_LENGTH",
    "MAX_TEMPLATE_TOTAL_LENGTH",
    "MAX_VALUE_DEPTH",
    "OPERATOR_NAMES",
    "RESPONSE_PARTS",
    "SENSITIVE_KINDS",
    "Reference",
    "RenderError",
    "Scope",
    "Taint",
    "Template",
    "TemplateError",
    "compile_template",
    "json_kind",
]
