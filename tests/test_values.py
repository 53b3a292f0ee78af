"""api/values.py: an upstream's JSON answer reaches the caller as the same Value whichever parser reads it."""

from __future__ import annotations

import json
import math

import pytest
from google.protobuf import struct_pb2

from ductape_processor.api.values import MAX_JSON_DEPTH, json_to_value, python_to_value

BODIES = [
    b'{"ok": true, "id": 1, "name": "Ada", "score": 1.5, "none": null, "tags": ["a", {"b": []}], "o": {}}',
    b"[1, -0.0, 1e300, 18446744073709551616]",  # the last integer is past 64 bits: orjson refuses it
    b'"text"',
    b"null",
    b'{"a": {"b": {"c": [[[1]]]}}}',
    # Members of every kind, in an object and in an array (strings, numbers and flags are set without `_fill`).
    b'{"t": true, "f": false, "s": "", "i": -3, "x": 0.25, "n": null, "big": 18446744073709551616, "l": [], "o": {}}',
    b'[true, false, "s", 2, 2.5, null, [1, "x", true], {"k": false}, 18446744073709551616]',
    b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH,
]


@pytest.mark.parametrize("body", BODIES)
def test_json_answers_become_the_value_the_standard_parser_gives(body: bytes) -> None:
    expected = python_to_value(json.loads(body))
    got = struct_pb2.Value()
    assert json_to_value(body, got)
    assert got == expected


@pytest.mark.parametrize(
    "body",
    [
        b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
        b'{"name": "\\ud800"}',  # a lone surrogate: no protobuf string can hold it
        b'["ok", "\\ud800"]',  # the same in an array
        b"[" + b"9" * 400 + b"]",  # an integer past a double's range (Python's parser takes it)
        b'{"x": ' + b"9" * 400 + b"}",  # the same as a member
        b'{"x": NaN}',  # Python's parser takes NaN and Infinity, which are not JSON
        b"[-Infinity]",
        b'{"x": 1e999}',  # a float past a double: Infinity
        b'{"a":',
        b"\xff\xfe",
        b"",
    ],
)
def test_answers_that_cannot_be_a_value_are_refused(body: bytes) -> None:
    assert not json_to_value(body, struct_pb2.Value())


@pytest.mark.parametrize("body", [b"{}", b"[]"])
def test_an_empty_document_leaves_the_value_unset(body: bytes) -> None:
    value = struct_pb2.Value()
    assert json_to_value(body, value)
    assert value.WhichOneof("kind") is None


def test_a_document_the_processor_wrote_keeps_nan_and_infinity_when_asked() -> None:
    # Feature outputs: JSON the runtime wrote from values that held them (a PostgreSQL row's 'NaN'::float8); no bytes
    # to answer instead, so they stay numbers, as they always were.
    value = struct_pb2.Value()
    assert json_to_value(b'{"x": NaN, "y": -Infinity}', value, finite=False)
    assert math.isnan(value.struct_value.fields["x"].number_value)
    assert value.struct_value.fields["y"].number_value == -math.inf
    assert not json_to_value(b'{"x": NaN}', struct_pb2.Value()), "refused where the bytes can be answered instead"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"n": 1, "x": NaN}', None),  # a Value, NaN kept
        ('{"big": ' + "9" * 400 + "}", '{"big": ' + "9" * 400 + "}"),  # no double holds it: the JSON text
        (
            "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),
            "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),
        ),
    ],
)
def test_a_feature_output_no_value_holds_is_shown_as_its_json_text_not_cut_short(
    text: str, expected: str | None
) -> None:
    from ductape_processor.api.feature import _output

    value = struct_pb2.Value()
    _output(text, value)
    if expected is None:
        assert value.struct_value.fields["n"].number_value == 1
        assert math.isnan(value.struct_value.fields["x"].number_value)
    else:
        assert value.WhichOneof("kind") == "string_value" and value.string_value == expected
