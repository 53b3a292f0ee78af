"""Problems a manifest's models cannot see one by one: cross-references (environment slugs, tags, path parameters,
login actions) and malformed `$Secret{NAME}` references, each reported with its path, every one of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

from ductape_processor.runtime.jobs.checks import target_problem
from ductape_processor.runtime.registry.manifest import SECRET_NAME, SECRET_REFERENCE, CredentialAuth, Manifest

_PER_ENVIRONMENT: Final[Mapping[str, tuple[tuple[str, str], ...]]] = {
    "brokers": (("topics", "tag"), ("topics", "name")),
    "storage": (),
    "databases": (("actions", "tag"), ("migrations", "tag")),
    "notifications": (("messages", "tag"),),
}
"""The resource kinds configured per environment (each resource's `envs` names every environment, and no other):
kind -> the lists in one resource whose attribute must be unique there, as (list, attribute)."""


def _duplicates(items: list[Any], attr: str, where: str) -> Iterator[tuple[str, str]]:
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        value = getattr(item, attr)
        if value is None:
            continue
        if value in seen:
            yield f"{where}[{index}].{attr}", f"{attr} {value!r} is already used by {where}[{seen[value]}]"
        else:
            seen[value] = index


def _env_keys(mapping: Mapping[str, Any], slugs: list[str], where: str, *, complete: bool) -> Iterator[tuple[str, str]]:
    for key in mapping:
        if key not in slugs:
            yield (
                f"{where}.{key}",
                f"{key!r} is not an environment of the product (declared: {', '.join(slugs)})",
            )
    if complete:
        for slug in slugs:
            if slug not in mapping:
                yield where, f"no configuration for environment {slug!r}"


def reference_problems(manifest: Manifest) -> list[tuple[str, str]]:
    """Every cross-reference problem of a structurally valid manifest, as (path, why)."""
    problems: list[tuple[str, str]] = []
    slugs = [env.slug for env in manifest.environments]
    problems += _duplicates(manifest.environments, "slug", "environments")
    problems += _duplicates(manifest.environments, "name", "environments")
    names = {env.name for env in manifest.environments if env.name}
    for index, env in enumerate(manifest.environments):
        if env.slug in names and env.name != env.slug:
            problems.append((f"environments[{index}].slug", f"{env.slug!r} is also another environment's name"))
    for kind in (
        "apps",
        "brokers",
        "sessions",
        "caches",
        "storage",
        "databases",
        "notifications",
        "jobs",
        "webhooks",
        "features",
    ):
        problems += _duplicates(getattr(manifest, kind), "tag", kind)
    for a, app in enumerate(manifest.apps):
        where = f"apps[{a}]"
        problems += _env_keys(app.envs, slugs, f"{where}.envs", complete=True)
        problems += _env_keys(app.variables, slugs, f"{where}.variables", complete=False)
        problems += _duplicates(app.actions, "tag", f"{where}.actions")
        problems += _duplicates(app.auths, "tag", f"{where}.auths")
        action_tags = {action.tag for action in app.actions}
        for i, auth in enumerate(app.auths):
            if isinstance(auth, CredentialAuth) and auth.action not in action_tags:
                problems.append((f"{where}.auths[{i}].action", f"app {app.tag!r} has no action {auth.action!r}"))
        for i, action in enumerate(app.actions):
            declared = set(action.input.params)
            in_path = action.path_parameters()
            for name in in_path:
                if name not in declared:
                    problems.append(
                        (
                            f"{where}.actions[{i}].path",
                            f"path parameter :{name} is not declared in input.params",
                        )
                    )
            for name in declared - set(in_path):
                problems.append((f"{where}.actions[{i}].input.params.{name}", f"the path has no parameter :{name}"))
    for kind, unique in _PER_ENVIRONMENT.items():
        for index, resource in enumerate(getattr(manifest, kind)):
            where = f"{kind}[{index}]"
            problems += _env_keys(resource.envs, slugs, f"{where}.envs", complete=True)
            for items, attr in unique:
                problems += _duplicates(getattr(resource, items), attr, f"{where}.{items}")
    for index, job in enumerate(manifest.jobs):
        problem = target_problem(manifest, job.target.kind, job.target.event)
        if problem is not None:
            problems.append((f"jobs[{index}].target.event", problem))
        problems += _env_keys(dict.fromkeys(job.envs or ()), slugs, f"jobs[{index}].envs", complete=False)
    problems += _webhook_problems(manifest, slugs)
    return problems


def _webhook_problems(manifest: Manifest, slugs: list[str]) -> Iterator[tuple[str, str]]:
    """An endpoint's events are the webhook's; a receive's topic, job target and feature are the product's;
    environments are declared."""
    topics = {f"{broker.tag}:{topic.tag}" for broker in manifest.brokers for topic in broker.topics}
    for index, webhook in enumerate(manifest.webhooks):
        where = f"webhooks[{index}]"
        yield from _duplicates(webhook.events, "tag", f"{where}.events")
        yield from _env_keys(webhook.endpoints, slugs, f"{where}.endpoints", complete=False)
        yield from _env_keys(webhook.receive, slugs, f"{where}.receive", complete=False)
        events = {event.tag for event in webhook.events}
        for env, endpoints in webhook.endpoints.items():
            yield from _duplicates(endpoints, "url", f"{where}.endpoints.{env}")
            for e, endpoint in enumerate(endpoints):
                for unknown in [tag for tag in endpoint.events if tag not in events]:
                    yield f"{where}.endpoints.{env}[{e}].events", f"webhook {webhook.tag!r} has no event {unknown!r}"
        for env, receive in webhook.receive.items():
            dispatch = receive.dispatch
            if dispatch is not None and dispatch.publish is not None and dispatch.publish not in topics:
                yield (
                    f"{where}.receive.{env}.dispatch.publish",
                    f"{dispatch.publish!r} is not a broker_tag:topic_tag of the product",
                )
            if dispatch is not None and dispatch.job is not None:
                problem = target_problem(manifest, dispatch.job.kind, dispatch.job.event)
                if problem is not None:
                    yield f"{where}.receive.{env}.dispatch.job.event", problem
            if dispatch is not None and dispatch.feature is not None:
                problem = target_problem(manifest, "feature", dispatch.feature)
                if problem is not None:
                    yield f"{where}.receive.{env}.dispatch.feature", problem
    paths: dict[tuple[str, str], str] = {}
    for index, webhook in enumerate(manifest.webhooks):
        for env, receive in webhook.receive.items():
            where = f"webhooks[{index}].receive.{env}.path"
            taken = paths.setdefault((env, receive.path), where)
            if taken != where:
                yield where, f"{receive.path!r} is already the path of {taken}"


def secret_problems(document: object, path: str = "") -> list[tuple[str, str]]:
    """Malformed `$Secret{NAME}` references anywhere in the raw document, as (path, why)."""
    problems: list[tuple[str, str]] = []
    if isinstance(document, dict):
        for key, value in document.items():
            problems += secret_problems(value, f"{path}.{key}" if path else str(key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            problems += secret_problems(value, f"{path}[{index}]")
    elif isinstance(document, str):
        for name in SECRET_REFERENCE.findall(document):
            if not SECRET_NAME.match(name):
                problems.append(
                    (
                        path,
                        f"$Secret{{{name}}}: a secret name is letters, digits and '_', not starting with a digit",
                    )
                )
    return problems
