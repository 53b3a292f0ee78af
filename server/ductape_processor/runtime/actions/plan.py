"""Actions compiled for running: templates parsed, policies compiled, path split. Built once per product version.

Manifest validation calls `compile_plan`: a template that cannot compile is refused at apply time with its path in
the manifest, and the plan of a valid manifest travels with its model (`Resolved.plan`), so calls never compile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from ductape_processor.adapters.http.encoding import header_field, header_name_problem, header_value_problem
from ductape_processor.runtime.policies import RetryRules
from ductape_processor.runtime.registry.manifest import Action, App, CredentialAuth, Manifest, TokenAuth
from ductape_processor.runtime.templates import SENSITIVE_KINDS, Template, TemplateError, compile_template

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_PATH_SPLIT = re.compile(r"(:[A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class AuthPlan:
    """An auth's templates: for a token auth they read secrets; for a credential auth, the login response."""

    app: str
    auth: TokenAuth | CredentialAuth
    headers: dict[str, Template]
    query: dict[str, Template]
    body: Template
    login_input: Template | None


@dataclass(frozen=True, slots=True)
class ActionPlan:
    """One action, ready to render and send."""

    app: App
    action: Action
    path_parts: tuple[str, ...]
    path_names: tuple[str | None, ...]
    """For each of `path_parts`, the parameter's name (`:id` -> `id`), or None for a literal part."""
    path_params: tuple[str, ...]
    """The path's parameters' names, in order."""
    headers: dict[str, Template]
    query: Template | None
    body: Template | None
    auth_tags: frozenset[str]
    sensitive_headers: frozenset[str]
    input_headers_read: frozenset[str] | None
    """Lower-cased caller header names the templates read (`$Input{headers}{X-Trace}`); None when they read all."""
    uses_session: bool
    rules: RetryRules
    timeout_s: float
    idempotent: bool
    renders: bool
    """The action has templates (headers, query or body) to render: a call builds the scope they read."""
    resource: str
    """`app:action`, the way the execution log names it (spelled once here, not on every call's record)."""


@dataclass(frozen=True, slots=True)
class ProductPlan:
    """Every action and auth of one product version."""

    actions: dict[tuple[str, str], ActionPlan]
    auths: dict[tuple[str, str], AuthPlan]


def _auth_tags(*templates: Template | None) -> frozenset[str]:
    return frozenset(
        str(ref.keys[0])
        for template in templates
        if template is not None
        for ref in template.references
        if ref.kind == "Auth" and ref.keys
    )


def _input_headers_read(*templates: Template | None) -> frozenset[str] | None:
    names: set[str] = set()
    for template in templates:
        for ref in template.references if template is not None else ():
            if ref.kind != "Input" or (ref.keys and ref.keys[0] != "headers"):
                continue
            if len(ref.keys) < 2:
                return None  # `$Input` or `$Input{headers}`: every caller header is read
            names.add(str(ref.keys[1]).lower())
    return frozenset(names)


def _header_problems(action: Action, where: str) -> list[tuple[str, str]]:
    """Header names that are not tokens or are framing headers, and template text with control characters."""
    problems: list[tuple[str, str]] = []
    for name, template in action.headers.items():
        problem = header_name_problem(name) or header_value_problem(template)
        if problem is not None:
            problems.append((header_field(f"{where}.headers", name), problem))
    for name, spec in action.input.headers.items():
        problem = header_name_problem(name)
        if problem is None and spec.decorator is not None:
            problem = header_value_problem(spec.decorator.text)
        if problem is not None:
            problems.append((header_field(f"{where}.input.headers", name), problem))
    return problems


def _compile_action(app: App, action: Action, where: str) -> ActionPlan:
    headers = {name: compile_template(value, f"{where}.headers.{name}") for name, value in action.headers.items()}
    query = compile_template(action.query, f"{where}.query") if action.query else None
    body = compile_template(action.body, f"{where}.body") if action.body is not None else None
    templates = [*headers.values(), query, body]
    # Literal parts are percent-encoded once here; parameters are encoded per call as one segment each.
    path_parts = tuple(
        part if part.startswith(":") else quote(part, safe="/:@!$&'()*+,;=-._~%")
        for part in _PATH_SPLIT.split(action.path)
        if part
    )
    path_names = tuple(part[1:] if part.startswith(":") else None for part in path_parts)
    return ActionPlan(
        app=app,
        action=action,
        path_parts=path_parts,
        path_names=path_names,
        path_params=tuple(name for name in path_names if name is not None),
        headers=headers,
        query=query,
        body=body,
        auth_tags=_auth_tags(*templates),
        sensitive_headers=frozenset(name for name, template in headers.items() if template.selectors & SENSITIVE_KINDS),
        input_headers_read=_input_headers_read(*templates),
        uses_session=any(t is not None and "Session" in t.selectors for t in templates),
        rules=RetryRules.from_policy(action.retry or app.retry),
        timeout_s=(action.timeout or app.timeout).total_seconds(),
        idempotent=action.method in IDEMPOTENT_METHODS,
        renders=any(t is not None for t in templates),
        resource=f"{app.tag}:{action.tag}",
    )


def _compile_auth(app: App, auth: TokenAuth | CredentialAuth, where: str) -> AuthPlan:
    return AuthPlan(
        app=app.tag,
        auth=auth,
        headers={name: compile_template(value, f"{where}.headers.{name}") for name, value in auth.headers.items()},
        query={name: compile_template(value, f"{where}.query.{name}") for name, value in auth.query.items()},
        body=compile_template(dict(auth.body), f"{where}.body"),
        login_input=compile_template(dict(auth.input), f"{where}.input") if isinstance(auth, CredentialAuth) else None,
    )


def compile_plan(manifest: Manifest) -> tuple[ProductPlan | None, list[tuple[str, str]]]:
    """Compile every action and auth of a manifest, once, when it is validated; the registry keeps the plan.

    Returns the plan, or None with every problem found (path in the manifest, why): templates that cannot compile,
    header names and values that cannot be sent, references to an auth the app does not declare.
    """
    actions: dict[tuple[str, str], ActionPlan] = {}
    auths: dict[tuple[str, str], AuthPlan] = {}
    problems: list[tuple[str, str]] = []
    for a, app in enumerate(manifest.apps):
        declared = {auth.tag: auth for auth in app.auths}
        for i, auth in enumerate(app.auths):
            for name, text in auth.headers.items():
                problem = header_value_problem(text)
                if problem is not None:
                    problems.append((header_field(f"apps[{a}].auths[{i}].headers", name), problem))
            try:
                auths[(app.tag, auth.tag)] = _compile_auth(app, auth, f"apps[{a}].auths[{i}]")
            except TemplateError as exc:
                problems.append((exc.path, exc.reason))
        for i, action in enumerate(app.actions):
            where = f"apps[{a}].actions[{i}]"
            problems.extend(_header_problems(action, where))
            try:
                plan = actions[(app.tag, action.tag)] = _compile_action(app, action, where)
            except TemplateError as exc:
                problems.append((exc.path, exc.reason))
                continue
            for tag in sorted(plan.auth_tags - set(declared)):
                problems.append((where, f"uses $Auth{{{tag}}}, but app {app.tag!r} declares no auth {tag!r}"))
            for tag in sorted(plan.auth_tags & set(declared)):
                auth = declared[tag]
                if isinstance(auth, CredentialAuth) and auth.action == action.tag:
                    problems.append((where, f"is the login action of auth {tag!r}, so it cannot use $Auth{{{tag}}}"))
    return (None, problems) if problems else (ProductPlan(actions, auths), problems)
