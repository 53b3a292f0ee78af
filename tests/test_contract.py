"""Input contracts: types, required versus falsy values, defaults, decorators, lengths, and every violation at once."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ductape_processor.errors import FieldViolation, InvalidArgument
from ductape_processor.reasons import Reason
from ductape_processor.runtime.actions.contract import check_action_input, check_input
from ductape_processor.runtime.registry.manifest import ActionInput, FieldSpec


def spec(**fields: Any) -> FieldSpec:
    return FieldSpec.model_validate(fields)


def violations(schema: dict[str, FieldSpec], values: Any, where: str = "body") -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        check_input(schema, values, where)
    return {v.field: v.description for v in caught.value.violations}


TYPE_CASES: list[tuple[str, list[Any], list[tuple[Any, str]]]] = [
    ("string", ["", "text", "ünïcode"], [(1, "must be a string, not a number"), ([], "not an array")]),
    (
        "number",
        [0, -3, 2.5, 10**20],
        [(True, "must be a number, not a boolean"), ("1", "not a string"), (float("nan"), "finite")],
    ),
    ("integer", [0, -7, 2**40], [(1.5, "not a fractional number"), (False, "not a boolean"), ("3", "not a string")]),
    ("boolean", [True, False], [(0, "must be a boolean, not a number"), ("true", "not a string")]),
    (
        "email",
        ["ada@example.com", "a.b+tag@mail.example.co.uk", "x@y.z"],
        [
            ("ada", "is not an email address"),
            ("ada@example", "is not an email address"),
            ("@example.com", "is not an email address"),
            ("a@@example.com", "is not an email address"),
            ("a@b@example.com", "is not an email address"),
            ("ada lovelace@example.com", "is not an email address"),
            ("ada@example..com", "is not an email address"),
            ("ada@example.com.", "is not an email address"),
            (42, "must be a string, not a number"),
        ],
    ),
    (
        "uuid",
        ["123e4567-e89b-12d3-a456-426614174000", "123E4567-E89B-12D3-A456-426614174000"],
        [
            ("123e4567e89b12d3a456426614174000", "is not a UUID"),
            ("{123e4567-e89b-12d3-a456-42661417400}", "is not a UUID"),
            ("123e4567-e89b-12d3-a456-4266141740zz", "is not a UUID"),
            ("123e4567-e89b-12d3-a456-4266_4174000", "is not a UUID"),
            ("123e4567-e89b-12d3-a456+426614174000", "is not a UUID"),
            ("not-a-uuid", "is not a UUID"),
        ],
    ),
    (
        "date",
        ["2024-07-15", "2024-07-15T10:30:00", "2024-07-15T10:30:00Z", "2024-07-15T10:30:00.123+02:00"],
        [
            ("15/07/2024", "is not an ISO 8601 date"),
            ("2024-13-01", "is not an ISO 8601 date"),
            (20240715, "not a number"),
        ],
    ),
    ("array", [[], [1, "a", None]], [("a,b", "must be an array, not a string"), ({}, "not an object")]),
    ("object", [{}, {"a": [1]}], [([], "must be an object, not an array"), ("{}", "not a string")]),
]


@pytest.mark.parametrize(("kind", "good", "bad"), TYPE_CASES, ids=[case[0] for case in TYPE_CASES])
def test_type_accepts_its_values_and_refuses_others(kind: str, good: list[Any], bad: list[tuple[Any, str]]) -> None:
    schema = {"f": spec(type=kind)}
    for value in good:
        assert check_input(schema, {"f": value}, "body") == {"f": value}
    for value, description in bad:
        found = violations(schema, {"f": value})
        assert list(found) == ["input.body.f"], value
        assert description in found["input.body.f"], (value, found)


def test_integer_accepts_an_integral_float_and_hands_on_an_int() -> None:
    result = check_input({"n": spec(type="integer")}, {"n": 3.0}, "query")
    assert result == {"n": 3}
    assert type(result["n"]) is int


@pytest.mark.parametrize(
    ("kind", "value"),
    [("string", ""), ("number", 0), ("integer", 0), ("boolean", False), ("array", []), ("object", {})],
)
def test_falsy_values_satisfy_required(kind: str, value: Any) -> None:
    assert check_input({"f": spec(type=kind, required=True)}, {"f": value}, "body") == {"f": value}


@pytest.mark.parametrize("values", [{}, {"f": None}, None])
def test_missing_or_null_required_field_is_reported(values: Any) -> None:
    assert violations({"f": spec(required=True)}, values) == {"input.body.f": "is required"}


def test_absent_optional_field_stays_as_given() -> None:
    schema = {"f": spec(type="string")}
    assert check_input(schema, {}, "body") == {}
    assert check_input(schema, {"f": None}, "body") == {"f": None}


def test_default_fills_missing_and_null_but_not_falsy_values() -> None:
    schema = {"n": spec(type="integer", default=10), "s": spec(default="x"), "b": spec(type="boolean", default=True)}
    assert check_input(schema, {}, "body") == {"n": 10, "s": "x", "b": True}
    assert check_input(schema, {"n": None, "s": None, "b": None}, "body") == {"n": 10, "s": "x", "b": True}
    assert check_input(schema, {"n": 0, "s": "", "b": False}, "body") == {"n": 0, "s": "", "b": False}


def test_default_satisfies_required() -> None:
    assert check_input({"f": spec(required=True, default="d")}, {}, "body") == {"f": "d"}


def test_default_is_copied_not_shared() -> None:
    field = spec(type="object", default={"tags": ["a"]})
    first = check_input({"o": field}, None, "body")
    first["o"]["tags"].append("b")
    assert check_input({"o": field}, None, "body") == {"o": {"tags": ["a"]}}
    assert field.default == {"tags": ["a"]}


def test_decorators_prepend_and_append_text() -> None:
    schema = {
        "auth": spec(decorator={"text": "Bearer ", "position": "prepend"}),
        "host": spec(decorator={"text": ".example.com", "position": "append"}),
        "plain": spec(),
    }
    values = {"auth": "abc", "host": "api", "plain": "p"}
    assert check_input(schema, values, "headers") == {"auth": "Bearer abc", "host": "api.example.com", "plain": "p"}
    assert values == {"auth": "abc", "host": "api", "plain": "p"}


def test_decorator_applies_to_the_default_too() -> None:
    schema = {"auth": spec(default="anonymous", decorator={"text": "User "})}
    assert check_input(schema, {}, "headers") == {"auth": "User anonymous"}


def test_lengths_are_checked_before_decorating() -> None:
    schema = {"code": spec(max_length=3, decorator={"text": "CODE-"})}
    assert check_input(schema, {"code": "abc"}, "body") == {"code": "CODE-abc"}


@pytest.mark.parametrize(
    ("field", "ok", "short", "long", "unit"),
    [
        (spec(type="string", min_length=2, max_length=4), ["ab", "abcd"], "a", "abcde", "characters"),
        (spec(type="email", min_length=6, max_length=9), ["a@b.cd", "ab@cd.efg"], "a@b.c", "abc@de.fgh", "characters"),
        (spec(type="array", min_length=2, max_length=3), [[1, 2], [1, 2, 3]], [1], [1, 2, 3, 4], "items"),
    ],
)
def test_min_and_max_length(field: FieldSpec, ok: list[Any], short: Any, long: Any, unit: str) -> None:
    schema = {"f": field}
    for value in ok:
        assert check_input(schema, {"f": value}, "body") == {"f": value}
    assert violations(schema, {"f": short}) == {
        "input.body.f": f"must have at least {field.min_length} {unit}, has {len(short)}"
    }
    assert violations(schema, {"f": long}) == {
        "input.body.f": f"must have at most {field.max_length} {unit}, has {len(long)}"
    }


def test_unknown_fields_pass_through_unchanged() -> None:
    extra = {"nested": [1, {"x": None}]}
    result = check_input({"a": spec()}, {"a": "1", "extra": extra, "none": None}, "body")
    assert result == {"a": "1", "extra": extra, "none": None}
    assert result["extra"] is extra


def test_part_that_is_not_an_object_is_reported() -> None:
    assert violations({"a": spec(required=True)}, ["a"]) == {
        "input.body": "must be an object, not an array",
        "input.body.a": "is required",
    }


def test_every_violation_is_listed_at_once_with_its_path() -> None:
    schema = {
        "email": spec(type="email", required=True),
        "age": spec(type="integer"),
        "name": spec(required=True),
        "tags": spec(type="array", max_length=1),
        "ok": spec(type="boolean"),
    }
    with pytest.raises(InvalidArgument) as caught:
        check_input(schema, {"email": "nope", "age": "ten", "tags": [1, 2], "ok": True}, "body")
    error = caught.value
    assert error.violations == [
        FieldViolation("input.body.email", "is not an email address"),
        FieldViolation("input.body.age", "must be an integer, not a string"),
        FieldViolation("input.body.name", "is required"),
        FieldViolation("input.body.tags", "must have at most 1 item, has 2"),
    ]
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == Reason.INVALID_INPUT
    assert error.message == "invalid input: input.body.email: is not an email address (and 3 more problems)"


def test_one_violation_per_field_even_with_several_problems() -> None:
    schema = {"u": spec(type="email", min_length=10)}
    assert violations(schema, {"u": "a b"}) == {
        "input.body.u": "is not an email address; must have at least 10 characters, has 3"
    }


ACTION = ActionInput.model_validate(
    {
        "params": {"id": {"type": "integer", "required": True}},
        "query": {"page": {"type": "integer", "default": 1}, "q": {"type": "string"}},
        "body": {"email": {"type": "email", "required": True}, "count": {"type": "number", "default": 0}},
        "headers": {"Authorization": {"type": "string", "required": True, "decorator": {"text": "Bearer "}}},
    }
)


def test_action_input_checks_and_fills_all_four_parts() -> None:
    result = check_action_input(
        ACTION,
        {"params": {"id": 7}, "body": {"email": "a@b.co", "extra": True}, "headers": {"Authorization": "t"}},
    )
    assert result == {
        "params": {"id": 7},
        "query": {"page": 1},
        "body": {"email": "a@b.co", "count": 0, "extra": True},
        "headers": {"Authorization": "Bearer t"},
    }


def test_action_input_lists_violations_from_every_part_together() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_action_input(ACTION, {"params": {"id": "x"}, "query": {"page": 1.5}, "body": {}, "cookies": {}})
    assert {v.field: v.description for v in caught.value.violations} == {
        "input.cookies": "is not a part of an action's input (params, query, body, headers)",
        "input.params.id": "must be an integer, not a string",
        "input.query.page": "must be an integer, not a fractional number",
        "input.body.email": "is required",
        "input.headers.Authorization": "is required",
    }


def test_action_input_of_none_is_empty_input() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_action_input(ACTION, None)
    assert [v.field for v in caught.value.violations] == [
        "input.params.id",
        "input.body.email",
        "input.headers.Authorization",
    ]
    assert check_action_input(ActionInput(), None) == {"params": {}, "query": {}, "body": {}, "headers": {}}


def test_header_names_match_without_case_and_take_the_declared_spelling() -> None:
    result = check_action_input(
        ACTION, {"params": {"id": 1}, "body": {"email": "a@b.co"}, "headers": {"authorization": "t", "X-Other": "o"}}
    )
    assert result["headers"] == {"Authorization": "Bearer t", "X-Other": "o"}


def test_header_given_twice_in_different_case_is_reported() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_action_input(
            ACTION,
            {"params": {"id": 1}, "body": {"email": "a@b.co"}, "headers": {"authorization": "a", "AUTHORIZATION": "b"}},
        )
    assert [v.field for v in caught.value.violations] == ["input.headers.Authorization"]
    assert "is given twice" in caught.value.violations[0].description


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=8,
)
field_specs = st.builds(
    FieldSpec,
    type=st.sampled_from(["number", "integer", "boolean", "uuid", "date", "object"]),
    required=st.booleans(),
) | st.builds(
    FieldSpec,
    type=st.sampled_from(["string", "email", "array"]),
    required=st.booleans(),
    min_length=st.none() | st.integers(0, 3),
    max_length=st.none() | st.integers(3, 6),
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), field_specs), json_values)
def test_any_value_is_accepted_or_refused_with_violations(schema: dict[str, FieldSpec], values: Any) -> None:
    try:
        result = check_input(schema, values, "body")
    except InvalidArgument as exc:
        failure = exc
    else:
        assert isinstance(result, dict)
        assert all(name in result or not field.required for name, field in schema.items())
        return
    assert failure.violations
    assert all(v.field == "input.body" or v.field.removeprefix("input.body.") in schema for v in failure.violations)
