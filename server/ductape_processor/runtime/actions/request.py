"""The HTTP request of one action call, built from the action's compiled plan and its rendered templates, and the
same request as the execution record shows it (every part built from a sensitive value redacted)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, unquote

from yarl import URL

from ductape_processor.adapters.http.client import HttpRequest
from ductape_processor.adapters.http.encoding import (
    canonical_json,
    encode_body,
    header_field,
    header_name_problem,
    header_value_problem,
    path_parameter,
    query_pairs,
)
from ductape_processor.errors import FieldViolation, InvalidArgument
from ductape_processor.reasons import Reason
from ductape_processor.runtime.actions.call import CallState
from ductape_processor.runtime.actions.plan import ActionPlan
from ductape_processor.runtime.templates import Scope
from ductape_processor.telemetry.context import outgoing_trace_context

_REDACTED = "[redacted]"


def require_path_params(plan: ActionPlan, checked: Mapping[str, Any]) -> None:
    """Every `:name` of the path needs a value, even when the contract left the parameter optional."""
    params = checked.get("params") or {}
    for name in plan.path_params:
        if params.get(name) is None:
            break
    else:
        return  # every parameter given (or none to give): the list below only for an error
    missing = [name for name in plan.path_params if params.get(name) is None]
    if missing:
        raise InvalidArgument(
            f"the action's path needs {', '.join(':' + name for name in missing)}",
            reason=Reason.INVALID_INPUT,
            violations=[
                FieldViolation(f"input.params.{name}", "is required: the path has :" + name) for name in missing
            ],
        )


def _caller_headers(plan: ActionPlan, given: Mapping[str, Any]) -> dict[str, str]:
    """The caller's headers to send: only those the action's input contract declares, each a valid field.

    An undeclared header is refused unless a template reads it (`$Input{headers}{X-Trace}`): then it is data for
    the template, not sent as it is. Every problem is one violation naming `input.headers["<name>"]`.
    """
    declared = plan.action.input.headers
    read = plan.input_headers_read
    headers: dict[str, str] = {}
    violations: list[FieldViolation] = []
    for name, value in given.items():
        field = header_field("input.headers", name)
        problem = header_name_problem(name)
        if problem is None and name not in declared:
            if read is None or name.lower() in read:
                continue
            problem = "is not declared in the action's input.headers; an action sends only the headers it declares"
        if problem is None and value is not None:
            text = value if isinstance(value, str) else canonical_json(value)
            problem = header_value_problem(text)
            headers[name] = text
        if problem is not None:
            violations.append(FieldViolation(field, problem))
    if violations:
        first = violations[0]
        raise InvalidArgument(
            f"invalid input: {first.field}: {first.description}", reason=Reason.INVALID_INPUT, violations=violations
        )
    return headers


def build_request(state: CallState, scope: Callable[[], Scope], checked: Mapping[str, Any]) -> HttpRequest:
    """The request to send for the call: the plan's method, URL, headers, query and body, rendered with the scope
    `scope()` builds (only when the plan has templates: `ActionPlan.renders`).

    The action's own headers win over the caller's, and the processor's (`state.upstream_headers`) over both.
    """
    plan = state.plan
    app_env = plan.app.envs[state.resolved.env.slug]
    params = checked.get("params", {})
    # A loop rather than a generator in `join` (a frame and an object fewer a call).
    parts = []
    for part, name in zip(plan.path_parts, plan.path_names, strict=True):
        parts.append(part if name is None else path_parameter(name, params[name]))
    path = "".join(parts)
    # The base URL is the manifest's own; the path is fully encoded, and a parameter is one segment with every
    # reserved character escaped, so input can change neither scheme, host, port nor the path above it.
    url = URL(app_env.base_url + path, encoded=True)
    given_headers = checked.get("headers")
    headers = _caller_headers(plan, given_headers) if given_headers else {}
    query = checked.get("query") or None
    body = checked.get("body") or None
    if plan.renders:
        rendering = scope()
        _render_headers(plan, rendering, headers)
        if plan.query is not None:
            query = plan.query.render(rendering)
        if plan.body is not None:
            body = plan.body.render(rendering)
    if body is not None:
        data, content_type = encode_body(body, app_env.request_type, plan.action.method)
        if content_type and not any(h.lower() == "content-type" for h in headers):
            headers["Content-Type"] = content_type
    else:
        data = None
    headers.update(outgoing_trace_context())
    upstream_headers = state.upstream_headers
    if upstream_headers:
        ours = {name.lower() for name in upstream_headers}
        headers = {name: value for name, value in headers.items() if name.lower() not in ours}
        headers.update(upstream_headers)
    pairs = query_pairs(query, "query") if query is not None else []
    return HttpRequest(plan.action.method, url, headers, pairs, data)


def _render_headers(plan: ActionPlan, scope: Scope, headers: dict[str, str]) -> None:
    """The action's own headers rendered into `headers`, each winning over a caller's of the same name."""
    for name, template in plan.headers.items():
        rendered = template.render(scope)
        if rendered is None:
            continue
        text = rendered if isinstance(rendered, str) else canonical_json(rendered)
        problem = header_value_problem(text)
        if problem is not None:
            field = header_field("headers", name)
            raise InvalidArgument(
                f"{field}: the value rendered from {template.path} {problem}",
                reason=Reason.HEADER_VALUE_INVALID,
                metadata={"template": template.path},
                violations=[FieldViolation(field, f"the value rendered from {template.path} {problem}")],
            )
        for given in [given for given in headers if given.lower() == name.lower()]:
            del headers[given]  # the action's own header wins over the caller's, whatever the letter case
        headers[name] = text


def recorded_request(state: CallState, request: HttpRequest) -> str:
    """The request as the execution record shows it: every part built from a sensitive value is `[redacted]`.

    Redaction follows the call's taint (what was rendered from secrets, auths, a login response or the session),
    so a secret is hidden wherever it went: a path segment, a query name or value, a header; a part that merely
    contains one (`Bearer …`, `/x/…/y` as one parameter) is hidden whole. Header values are never shown.
    """
    taint = state.taint
    url = request.url
    sensitive = state.plan.sensitive_headers
    pairs = [*url.query.items(), *request.query] if url.raw_query_string else request.query
    if not taint.texts and not sensitive:  # nothing was rendered from a sensitive value: nothing to redact
        target = f"{url.scheme}://{url.raw_authority}{url.raw_path}"
        if pairs:
            target += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
        return f"{request.method} {target}; headers: {', '.join(sorted(request.headers))}"

    def shown(raw: str) -> str:
        return _REDACTED if taint.touches(raw) or taint.touches(unquote(raw)) else raw

    path = "/".join(shown(segment) for segment in url.raw_path.split("/"))
    query = "&".join(f"{shown(quote(k, safe=''))}={shown(quote(v, safe=''))}" for k, v in pairs)
    names = ", ".join(
        f"{name}: {_REDACTED}" if name in sensitive or taint.touches(value) else name
        for name, value in sorted(request.headers.items())
    )
    target = f"{url.scheme}://{url.raw_authority}{path}" + (f"?{query}" if query else "")
    return f"{request.method} {target}; headers: {names}"
