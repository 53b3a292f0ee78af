"""The manifest's `features` section: what is refused at apply time, with its path, and what a valid one compiles to."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ductape_processor.errors import InvalidManifest
from ductape_processor.runtime.features.kinds import STEP_KINDS
from ductape_processor.runtime.registry.loader import load_manifest
from ductape_processor.runtime.registry.manifest import Manifest


def manifest(*features: dict[str, Any], **sections: Any) -> bytes:
    document: dict[str, Any] = {
        "product": "shop",
        "environments": [{"slug": "dev"}],
        "apps": [
            {
                "tag": "api",
                "envs": {"dev": {"base_url": "http://127.0.0.1:9"}},
                "actions": [
                    {"tag": "create", "method": "POST", "path": "/users"},
                    {"tag": "read", "method": "GET", "path": "/users"},
                    {"tag": "remove", "method": "DELETE", "path": "/users"},
                ],
            }
        ],
        "brokers": [{"tag": "events", "envs": {"dev": {"type": "memory"}}, "topics": [{"tag": "done", "name": "d"}]}],
        "caches": [{"tag": "short", "ttl": "1m"}],
        "features": list(features),
    }
    document.update(sections)
    return json.dumps(document).encode()


def event(tag: str, kind: str = "action", address: str = "api:create", **fields: Any) -> dict[str, Any]:
    return {"tag": tag, "type": kind, "event": address, **fields}


def step(tag: str, *events: dict[str, Any], parents: list[str] | None = None) -> dict[str, Any]:
    return {"tag": tag, "parents": parents or [], "events": list(events) or [event("e")]}


def feature(*steps: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"tag": "signup", "sequence": list(steps), **fields}


def problems(source: bytes) -> dict[str, str]:
    with pytest.raises(InvalidManifest) as caught:
        load_manifest(source)
    return {p.field: p.description for p in caught.value.problems}


def test_a_valid_feature_compiles_its_steps_parents_first_and_its_templates() -> None:
    loaded = load_manifest(
        manifest(
            feature(
                step(
                    "notify",
                    event("publish", "publish", "events:done", input={"message": "$Sequence{create}{user}"}),
                    parents=["create"],
                ),
                step("create", event("user", input={"body": {"email": "$Input{email}"}}, retries=2)),
                input={"email": {"type": "email", "required": True}},
                output={"id": "$Sequence{create}{user}{id}"},
            )
        )
    )
    plan = loaded.compiled.features["signup"]
    assert [s.tag for s in plan.sequences] == ["create", "notify"]
    [user] = plan.sequences[0].events
    assert user.call.kind == "action" and user.retries == 2 and not user.call.safe  # a POST
    assert plan.output.selectors == {"Sequence"}


def test_a_cycle_of_parents_is_a_problem_naming_the_cycle() -> None:
    found = problems(manifest(feature(step("a", parents=["b"]), step("b", parents=["a"]))))
    assert found == {"features[0].sequence[0].parents": "the parents form a cycle: a -> b -> a"}


def test_an_unknown_parent_and_a_step_its_own_parent_are_problems() -> None:
    found = problems(manifest(feature(step("a", parents=["nope"]), step("b", parents=["b"]))))
    assert found["features[0].sequence[0].parents[0]"] == "'nope' is not a step of the feature"
    assert found["features[0].sequence[1].parents[0]"] == "a step cannot be its own parent"


def test_reading_a_step_that_is_not_an_ancestor_is_a_problem() -> None:
    found = problems(
        manifest(
            feature(
                step("a", event("x")),
                step("b", event("y", input={"body": {"v": "$Sequence{a}{x}{id}"}})),  # a is not b's parent
            )
        )
    )
    path = "features[0].sequence[1].events[0].input.body.v"
    assert "step 'a' is not an ancestor of this step" in found[path]


def test_an_ancestor_two_levels_up_can_be_read_and_the_output_reads_any_step() -> None:
    load_manifest(
        manifest(
            feature(
                step("a", event("x")),
                step("b", event("y"), parents=["a"]),
                step("c", event("z", input={"body": {"v": "$Sequence{a}{x}"}}), parents=["b"]),
                step("d", event("w")),
                output={"c": "$Sequence{c}{z}", "d": "$Sequence{d}{w}"},
            )
        )
    )


def test_unknown_steps_events_and_input_fields_are_problems() -> None:
    found = problems(
        manifest(
            feature(
                step(
                    "a",
                    event(
                        "x", input={"body": {"p": "$Sequence{zz}{x}", "q": "$Sequence{a}{nope}", "r": "$Input{who}"}}
                    ),
                ),
                input={"email": {"type": "string"}},
            )
        )
    )
    base = "features[0].sequence[0].events[0].input.body"
    assert found[f"{base}.p"].endswith("the feature has no step 'zz'")
    assert found[f"{base}.q"].endswith("step 'a' has no event 'nope'")
    assert found[f"{base}.r"].endswith("the feature's input has no field 'who'")


def test_resources_the_manifest_does_not_declare_are_problems_per_step_type() -> None:
    found = problems(
        manifest(
            feature(
                step(
                    "a",
                    event("x", "action", "api:nope"),
                    event("y", "publish", "events:nope"),
                    event("z", "database_action", "db:act"),
                    event("j", "job", "cron:api:create"),
                    event("w", "webhook", "hooks:paid"),
                    event("f", "feature", "other"),
                    event("c", "publish", "events:done", cache="short"),
                    event("k", "action", "api:read", cache="long"),
                )
            )
        )
    )
    base = "features[0].sequence[0].events"
    assert found[f"{base}[0].event"] == "'api' has no action 'nope'"
    assert found[f"{base}[1].event"] == "'events' has no topic 'nope'"
    assert "is not a database_action of the product" in found[f"{base}[2].event"]
    assert "is not a job's target" in found[f"{base}[3].event"]
    assert "is not a webhook event of the product" in found[f"{base}[4].event"]
    assert found[f"{base}[5].event"] == "no feature 'other'"
    assert found[f"{base}[6].cache"] == "a publish event takes no cache"
    assert found[f"{base}[7].cache"] == "no cache 'long'"


def test_a_feature_that_runs_itself_through_another_is_refused() -> None:
    found = problems(
        manifest(
            feature(step("a", event("x", "feature", "other"))),
            {"tag": "other", "sequence": [step("b", event("y", "feature", "signup"))]},
        )
    )
    assert found["features[0].sequence[0].events[0].event"] == "the feature would run itself: signup -> other -> signup"


def test_selectors_a_feature_cannot_read_and_bad_templates_are_problems() -> None:
    found = problems(
        manifest(
            feature(
                step(
                    "a",
                    event(
                        "x",
                        input={"t": "$Auth{key}{headers}{x}"},
                        rollback={"type": "action", "event": "api:remove", "input": "$Nope{x}"},
                    ),
                )
            )
        )
    )
    base = "features[0].sequence[0].events[0]"
    assert (
        found[f"{base}.input.t"]
        == "$Auth{key}{headers}{x}: an app's auth is read by the action's own templates, not by a feature's"
    )
    assert "Nope" in found[f"{base}.rollback.input"]


def test_a_loop_reads_its_own_output_and_a_rollback_reads_its_events_output() -> None:
    loaded = load_manifest(
        manifest(
            feature(
                step(
                    "a",
                    event(
                        "poll",
                        "action",
                        "api:read",
                        do_while={
                            "condition": {"left": "$Sequence{a}{poll}{done}", "op": "!=", "right": True},
                            "max": 5,
                        },
                        rollback={
                            "type": "action",
                            "event": "api:remove",
                            "input": {"query": {"id": "$Sequence{a}{poll}{id}"}},
                        },
                    ),
                )
            )
        )
    )
    [poll] = loaded.compiled.features["signup"].sequences[0].events
    assert poll.loop_max == 5 and poll.rollback is not None and poll.call.safe  # a GET


def test_duplicate_step_and_event_tags_and_duplicate_features_are_problems() -> None:
    found = problems(manifest(feature(step("a", event("x"), event("x")), step("a"))))
    assert found["features[0].sequence[1].tag"] == "step 'a' is already used by features[0].sequence[0]"
    assert (
        found["features[0].sequence[0].events[1].tag"]
        == "event 'x' is already used by features[0].sequence[0].events[0]"
    )
    assert "features[1].tag" in problems(manifest(feature(step("a")), feature(step("b"))))


def test_do_while_is_bounded_and_zero_values_in_conditions_are_values() -> None:
    found = problems(manifest(feature(step("a", event("x", do_while={"condition": {"left": 0}, "max": 5000})))))
    assert "features[0].sequence[0].events[0].do_while.max" in found
    load_manifest(
        manifest(feature(step("a", event("x", condition=[{"left": 0, "op": "==", "right": ""}, {"left": False}]))))
    )


def test_every_step_type_of_the_manifest_has_a_registration() -> None:
    declared = Manifest.model_json_schema()["$defs"]["FeatureEvent"]["properties"]["type"]["enum"]
    assert sorted(declared) == sorted(STEP_KINDS)


def test_a_declared_job_may_run_a_feature_the_manifest_declares() -> None:
    job = {"tag": "nightly", "target": {"kind": "feature", "event": "nope"}, "repeat": {"every": "1h"}}
    found = problems(manifest(feature(step("a")), jobs=[job]))
    assert found["jobs[0].target.event"] == "'nope' is not a feature of the product (give feature_tag)"
    load_manifest(manifest(feature(step("a")), jobs=[{**job, "target": {"kind": "feature", "event": "signup"}}]))
