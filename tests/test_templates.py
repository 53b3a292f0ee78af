"""The template engine: selectors, operators, the typing rule, escaping, compile errors, limits, and properties."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ductape_processor.runtime.templates import (
    AUTH_PARTS,
    MAX_NESTING,
    MAX_RENDERED_LENGTH,
    MAX_TEMPLATE_LENGTH,
    MAX_TEMPLATE_TOTAL_LENGTH,
    MAX_VALUE_DEPTH,
    OPERATOR_NAMES,
    RESPONSE_PARTS,
    Reference,
    RenderError,
    Scope,
    Taint,
    TemplateError,
    compile_template,
)

SECRETS = {"MAILER_KEY": "k-123", "CRM_USER": "crm"}

SCOPE = Scope(
    input={
        "body": {
            "email": "ada@example.com",
            "name": "  Ada Lovelace  ",
            "count": 3,
            "ratio": 1.5,
            "whole": 4.0,
            "active": True,
            "nothing": None,
            "tags": ["a", "b", "c"],
            "items": [{"sku": "x1", "price": 5}, {"sku": "x2", "price": 20}, {"sku": "x3", "price": 12}],
            "created": "2024-07-15T10:30:45Z",
            "day": "2024-02-09",
            "csv": "red,green,blue",
            "numeric": "12",
            "mixed": [{"a": 1}, {"b": 2}],
        },
        "query": {"page": "2"},
        "params": {"id": "u-1"},
        "headers": {"X-Trace": "t-9"},
    },
    variables={"mailer": {"region": "eu", "limits": {"daily": [100, 200]}}},
    constants={"mailer": {"api_version": "v2", "retries": 3}},
    auth={"key": {"headers": {"Authorization": "Bearer abc"}, "query": {"token": "q"}, "body": {}}},
    secrets=SECRETS.get,
    session={"userId": "u-42", "roles": ["admin", "dev"], "profile": {"plan": "pro"}},
    sequence={"main": {"create-user": {"id": "usr_123abc456def", "emails": [{"address": "x@y.z"}]}}},
    response={"status": 200, "headers": {"X-Token": "h"}, "body": {"access_token": "tok", "expires_in": 3600}},
    default="fallback",
)


def render(template: Any, scope: Scope = SCOPE, path: str = "") -> Any:
    return compile_template(template, path).render(scope)


def render_error(template: Any, scope: Scope = SCOPE) -> RenderError:
    compiled = compile_template(template, "here")
    with pytest.raises(RenderError) as caught:
        compiled.render(scope)
    return caught.value


def template_error(template: Any, path: str = "apps[0].actions[0].body") -> TemplateError:
    with pytest.raises(TemplateError) as caught:
        compile_template(template, path)
    return caught.value


# ---------------------------------------------------------------------------------------------------------------
# Selectors


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("$Input{body}{email}", "ada@example.com"),
        ("$Input{body}{count}", 3),
        ("$Input{body}{active}", True),
        ("$Input{body}{nothing}", None),
        ("$Input{body}{tags}", ["a", "b", "c"]),
        ("$Input{body}{tags}{[1]}", "b"),
        ("$Input{body}{items}{[1]}{price}", 20),
        ("$Input{params}", {"id": "u-1"}),
        ("$Variable{mailer}{region}", "eu"),
        ("$Variable{mailer}{limits}{daily}{[1]}", 200),
        ("$Constant{mailer}{api_version}", "v2"),
        ("$Constant{mailer}{retries}", 3),
        ("$Auth{key}{headers}{Authorization}", "Bearer abc"),
        ("$Auth{key}{query}{token}", "q"),
        ("$Secret{MAILER_KEY}", "k-123"),
        ("$Token{CRM_USER}", "crm"),
        ("$Session{userId}", "u-42"),
        ("$Session{roles}{[0]}", "admin"),
        ("$Session{profile}{plan}", "pro"),
        ("$Sequence{main}{create-user}{id}", "usr_123abc456def"),
        ("$Sequence{main}{create-user}{emails}{[0]}{address}", "x@y.z"),
        ("$Response{body}{access_token}", "tok"),
        ("$Response{status}", 200),
        ("$Response{headers}{X-Token}", "h"),
        ("$Default", "fallback"),
    ],
)
def test_selector_reads_its_value(template: str, expected: Any) -> None:
    assert render(template) == expected


def test_whole_input_selector_renders_the_whole_input() -> None:
    assert render("$Input") is SCOPE.input


@pytest.mark.parametrize(
    ("template", "scope", "message"),
    [
        ("$Input{body}{missing}", SCOPE, "$Input{body} has no key 'missing'"),
        ("$Input{nope}{x}", SCOPE, "$Input has no key 'nope'"),
        ("$Input{body}{tags}{[3]}", SCOPE, "$Input{body}{tags} has 3 items: [3] is out of range"),
        ("$Input{body}{email}{x}", SCOPE, "$Input{body}{email} is a string, not an object"),
        ("$Input{body}{items}{sku}", SCOPE, "$Input{body}{items} is an array, not an object"),
        ("$Input{body}{count}{[0]}", SCOPE, "$Input{body}{count} is a number, not an array"),
        ("$Input{body}{nothing}{x}", SCOPE, "is null, not an object"),
        ("$Variable{crm}{region}", SCOPE, "$Variable has no key 'crm'"),
        ("$Constant{mailer}{nope}", SCOPE, "$Constant{mailer} has no key 'nope'"),
        ("$Auth{other}{headers}{Authorization}", SCOPE, "$Auth has no key 'other'"),
        ("$Secret{UNKNOWN}", SCOPE, "secret UNKNOWN is not defined"),
        ("$Token{UNKNOWN}", SCOPE, "secret UNKNOWN is not defined"),
        ("$Session{userId}", Scope(), "the call carries no session"),
        ("$Sequence{main}{send}{id}", SCOPE, "$Sequence{main} has no key 'send'"),
        ("$Response{body}{access_token}", Scope(), "there is no login response here"),
        ("$Default", Scope(), "this field has no default value"),
    ],
)
def test_selector_that_finds_nothing_raises_render_error_naming_it(template: str, scope: Scope, message: str) -> None:
    error = render_error(template, scope)
    assert error.selector == template
    assert message in error.message
    assert error.path == "here"


def test_render_error_inside_text_names_the_selector_and_the_path() -> None:
    compiled = compile_template({"to": ["Hello $Input{body}{first_name}!"]}, "apps[0].actions[1].body")
    with pytest.raises(RenderError) as caught:
        compiled.render(SCOPE)
    assert caught.value.selector == "$Input{body}{first_name}"
    assert caught.value.path == "apps[0].actions[1].body.to[0]"
    assert str(caught.value).startswith("apps[0].actions[1].body.to[0]: $Input{body}{first_name}: ")


def test_render_error_never_shows_a_secret_value() -> None:
    error = render_error("$Add($Secret{MAILER_KEY}, 1)")
    assert "k-123" not in str(error)
    assert error.selector == "$Add($Secret{MAILER_KEY}, 1)"


def test_empty_scope_works() -> None:
    assert render("static") == "static"
    assert render_error("$Input{a}", Scope()).message == "$Input has no key 'a'"


# ---------------------------------------------------------------------------------------------------------------
# Typing rule


def test_whole_expression_keeps_its_type() -> None:
    assert render({"n": "$Input{body}{count}", "o": "$Session{profile}", "b": "$Input{body}{active}"}) == {
        "n": 3,
        "o": {"plan": "pro"},
        "b": True,
    }
    assert render("$Add($Input{body}{count}, 1)") == 4


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("n=$Input{body}{count}", "n=3"),
        ("r=$Input{body}{ratio}", "r=1.5"),
        ("w=$Input{body}{whole}", "w=4"),
        ("a=$Input{body}{active}", "a=true"),
        ("z=$Input{body}{nothing}.", "z=."),
        ("t=$Input{body}{tags}", 't=["a","b","c"]'),
        ("p=$Session{profile}", 'p={"plan":"pro"}'),
        (" $Input{body}{count}", " 3"),
        ("$Input{params}{id}/$Input{query}{page}", "u-1/2"),
        ("Bearer $Secret{MAILER_KEY}", "Bearer k-123"),
    ],
)
def test_expression_inside_text_is_written_as_text(template: str, expected: str) -> None:
    assert render(template) == expected


def test_non_string_scalars_and_keys_pass_through() -> None:
    template = {"$Input{body}{email}": 1, "flag": False, "none": None, "list": [1.5, "$Input{params}{id}"]}
    assert render(template) == {"$Input{body}{email}": 1, "flag": False, "none": None, "list": [1.5, "u-1"]}


# ---------------------------------------------------------------------------------------------------------------
# Operators


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("$Add(10, 20, 30)", 60),
        ("$Add($Input{body}{count}, 0.5)", 3.5),
        ("$Add($Input{body}{numeric}, 1)", 13),
        ("$Subtract(100, 20, 30)", 50),
        ("$Subtract($Input{body}{count}, 5)", -2),
        ('$Concat(["Hello", "World"], " ")', "Hello World"),
        ("$Concat([$Input{params}{id}, $Input{body}{count}, null, true])", "u-13true"),
        ("$Substring($Sequence{main}{create-user}{id}, 4, 12)", "123abc45"),
        ("$Substring($Input{body}{email}, 4)", "example.com"),
        ("$Substring($Input{body}{email}, 0, 100)", "ada@example.com"),
        ("$Substring($Input{body}{email}, $Input{query}{page}, 3.0)", "a"),
        ("$Trim($Input{body}{name})", "Ada Lovelace"),
        ("$Split($Input{body}{csv}, ',')", ["red", "green", "blue"]),
        ("$Pick($Input{body}{tags}, 2)", "c"),
        ("$Pick($Input{body}{email}, 0)", "a"),
        ('$Pick($Session{profile}, "plan")', "pro"),
        ('$Join($Input{body}{tags}, " & ")', "a & b & c"),
        ("$Uppercase($Input{body}{email})", "ADA@EXAMPLE.COM"),
        ("$Lowercase('MiXeD')", "mixed"),
        ('$Dateformat($Input{body}{created}, "DD/MM/YYYY")', "15/07/2024"),
        ('$Dateformat($Input{body}{created}, "YY-MM-DD HH:mm:ss")', "24-07-15 10:30:45"),
        ('$Dateformat($Input{body}{day}, "YYYYMMDD")', "20240209"),
        ('$Dateformat(0, "YYYY-MM-DD HH:mm")', "1970-01-01 00:00"),
        ('$Dateformat(1721039445, "DD.MM.YYYY at HH:mm")', "15.07.2024 at 10:30"),
        ('$Replace($Input{body}{csv}, ",", " | ")', "red | green | blue"),
        ('$Replace("a.b.c", ".", "")', "abc"),
        ('$Filter($Input{body}{items}, "price", ">", 10)', [{"sku": "x2", "price": 20}, {"sku": "x3", "price": 12}]),
        ('$Filter([3, 1, 4, 1, 5], "<=", 3)', [3, 1, 1]),
        ('$Filter($Input{body}{tags}, "!=", "b")', ["a", "c"]),
        ('$Filter([1, 1.0, true, "1"], "==", 1)', [1, 1.0]),
        ('$Filter($Input{body}{mixed}, "a", ">=", 1)', [{"a": 1}]),
        ('$Find($Input{body}{items}, "sku", "==", "x3")', {"sku": "x3", "price": 12}),
        ('$Find(["b", "a", "c"], "<", "b")', "a"),
        ('$Find([[1, 2], [3]], "==", [3])', [3]),
    ],
)
def test_operator(template: str, expected: Any) -> None:
    assert render(template) == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("$Add($Input{body}{email}, 1)", "argument 1 is a string that is not a number"),
        ("$Add(1, $Input{body}{active})", "argument 2 is a boolean, not a number"),
        ("$Add($Input{body}{tags}, 1)", "argument 1 is an array, not a number"),
        ("$Subtract($Input{body}{nothing}, 1)", "argument 1 is null, not a number"),
        ("$Add($Input{body}{count}, 1e308, 1e308)", "the result is out of range"),
        ("$Concat($Input{body}{email}, '-')", "the first argument is a string, not an array"),
        ("$Concat($Input{body}{tags}, $Input{body}{count})", "the separator is a number, not a string"),
        ("$Substring($Input{body}{count}, 0, 1)", "the first argument is a number, not a string"),
        ("$Substring($Input{body}{email}, 3, 1)", "the end 1 is before the start 3"),
        ("$Substring($Input{body}{email}, 99)", "the start 99 is past the end of the string"),
        ("$Substring($Input{body}{email}, -1, 2)", "the start is negative"),
        ("$Substring($Input{body}{email}, 1.5, 2)", "the start is not a whole number"),
        ("$Trim($Input{body}{tags})", "the argument is an array, not a string"),
        ("$Split($Input{body}{csv}, '')", "the separator is empty"),
        ("$Pick($Input{body}{tags}, 3)", "index 3 is out of range (3 items)"),
        ("$Pick($Session{profile}, 'nope')", "the object has no key 'nope'"),
        ("$Pick($Session{profile}, 0)", "an object is picked by a string key"),
        ("$Pick($Input{body}{count}, 0)", "only an array, a string or an object can be picked from"),
        ("$Join($Input{body}{email}, ',')", "not an array"),
        ("$Uppercase($Input{body}{count})", "the argument is a number, not a string"),
        ("$Lowercase($Input{body}{nothing})", "the argument is null, not a string"),
        ("$Dateformat($Input{body}{email}, 'YYYY')", "not an ISO 8601 date or date-time"),
        ("$Dateformat($Input{body}{active}, 'YYYY')", "the date is a boolean"),
        ("$Dateformat(1e300, $Input{body}{email})", "not a valid unix time"),
        ("$Dateformat($Input{body}{day}, $Input{body}{count})", "the format is a number, not a string"),
        ("$Replace($Input{body}{email}, '', 'x')", "the text to find is empty"),
        ("$Replace($Input{body}{count}, 'a', 'x')", "the first argument is a number, not a string"),
        ("$Filter($Input{body}{email}, '==', 1)", "the first argument is a string, not an array"),
        ("$Filter($Input{body}{tags}, '>', 1)", "cannot compare a string with a number using >"),
        ("$Filter($Input{body}{tags}, 'sku', '>', 1)", "item [0] is a string, not an object with key 'sku'"),
        ("$Filter($Input{body}{tags}, $Input{body}{email}, 1)", "the comparison is not one of"),
        ("$Find($Input{body}{items}, 'price', '>', 100)", "no item matches"),
    ],
)
def test_operator_bad_input_raises_render_error_naming_the_operator(template: str, message: str) -> None:
    error = render_error(template)
    assert error.selector == template
    assert message in error.message


def test_error_in_an_argument_names_the_innermost_selector() -> None:
    error = render_error("$Uppercase($Trim($Input{body}{missing}))")
    assert error.selector == "$Input{body}{missing}"


def test_nested_operators() -> None:
    template = (
        "$Concat(['User ', $Substring($Sequence{main}{create-user}{id}, 4, 12), ' created on ', "
        "$Dateformat($Sequence{main}{create-user}{id}, 'DD/MM/YYYY')], '')"
    )
    assert "not an ISO 8601 date" in render_error(template).message
    assert render("$Uppercase($Trim($Input{body}{name}))") == "ADA LOVELACE"
    assert render("$Add($Pick($Split('1,22,333', ','), 1), $Input{body}{count})") == 25
    assert render("$Join($Filter($Split($Input{body}{csv}, ','), '!=', 'green'), '+')") == "red+blue"
    assert render("$Lowercase($Pick($Find($Input{body}{items}, 'price', '<', 10), 'sku'))") == "x1"
    assert render("Total: $Add($Input{body}{count}, 2) items") == "Total: 5 items"


def test_operator_arguments_allow_spacing_newlines_and_both_quotes() -> None:
    assert render('$Concat(\n  [ "a\\"b" , \'c\\\'d\' , "e\\\\f\\n" ] ,\n  "-"\n)') == "a\"b-c'd-e\\f\n"


def test_operator_of_literals_is_evaluated_at_compile_time() -> None:
    compiled = compile_template("$Concat([$Trim(' hello '), $Pick($Split('a,b,c', ','), 1)], '-')")
    assert compiled.is_static
    assert compiled.render(Scope()) == "hello-b"
    number = compile_template("n=$Add(1, 2)")
    assert number.is_static
    assert number.render(Scope()) == "n=3"
    assert compile_template("$Add(1, 2)").render(Scope()) == 3


def test_operator_of_literals_with_bad_input_is_a_compile_error() -> None:
    error = template_error("x $Uppercase(3)")
    assert "$Uppercase(3): the argument is a number, not a string" in error.reason
    assert error.position == 2


# ---------------------------------------------------------------------------------------------------------------
# Escaping and literal dollars


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("costs $5", "costs $5"),
        ("$$Input{body}{email}", "$Input{body}{email}"),
        ("$$", "$"),
        ("a $$ b", "a $ b"),
        ("$$$Input{params}{id}", "$u-1"),
        ("${HOME} and $PATH", "${HOME} and $PATH"),
        ("$USD 10", "$USD 10"),
        ("$Inputs", "$Inputs"),
        ("$Default_value", "$Default_value"),
        ("$lower(x) $foo{y}", "$lower(x) $foo{y}"),
        ("end $", "end $"),
    ],
)
def test_dollar_that_starts_no_expression_is_text(template: str, expected: str) -> None:
    compiled = compile_template(template)
    assert compiled.render(SCOPE) == expected


def test_escaped_text_is_static() -> None:
    compiled = compile_template({"a": "$$Secret{X}", "b": 1})
    assert compiled.is_static
    assert compiled.selectors == frozenset()
    assert compiled.render(Scope()) == {"a": "$Secret{X}", "b": 1}


# ---------------------------------------------------------------------------------------------------------------
# Compile errors


@pytest.mark.parametrize(
    ("template", "reason", "position"),
    [
        ("Hi $Foo(1)", "unknown operator $Foo", 3),
        ("$Bar{x}", "unknown selector $Bar", 0),
        ("$input{body}", "did you mean $Input?", 0),
        ("$UPPERCASE('a')", "did you mean $Uppercase?", 0),
        ("$Add(1)", "$Add takes 2 or more arguments, not 1", 0),
        ("$Trim()", "$Trim takes 1 argument, not 0", 0),
        ("$Concat([1], 'a', 'b')", "$Concat takes 1 or 2 arguments, not 3", 0),
        ("$Replace('a', 'b')", "$Replace takes 3 arguments, not 2", 0),
        ("$Filter([1], 1, 2, 3, 4)", "$Filter takes 3 or 4 arguments, not 5", 0),
        ("$Filter($Input{a}, '~', 1)", "the comparison must be one of > < >= <= == !=", 0),
        ("$Find($Input{a}, 'k', 3, 1)", "the comparison must be one of", 0),
        ("x $Add", "$Add is an operator: write $Add(…)", 2),
        ("$Input{body", "'{' is never closed", 6),
        ("$Input{a{b}}", "a key may not contain '{'", 8),
        ("$Input{}", "empty key {}", 6),
        ("$Input{[x]}", "is not an array index", 6),
        ("$Input{[1234567890]}", "is not an array index", 6),
        ("$Input{[-1]}", "is not an array index", 6),
        ("$Default{x}", "$Default takes no keys", 0),
        ("$Secret{mailer-key}", "names one secret", 0),
        ("$Secret{1KEY}", "names one secret", 0),
        ("$Secret", "names one secret", 0),
        ("$Token{A}{B}", "names one secret", 0),
        ("$Variable{mailer}", "$Variable needs an app tag and a key", 0),
        ("$Constant", "$Constant needs an app tag and a key", 0),
        ("$Auth{key}{cookies}{x}", "$Auth needs an auth tag and a part", 0),
        ("$Sequence{main}", "$Sequence needs a sequence and an event tag", 0),
        ("$Response{cookies}", "$Response reads {status}, {headers} or {body}", 0),
        ("$Add(1, 2", "'(' is never closed by ')'", 4),
        ("$Add(1, 2,)", "expected a value", 10),
        ("$Add(1 2)", "expected ',' or ')', found '2'", 7),
        ("$Concat([1, 2)", "expected ',' or ']', found ')'", 13),
        ("$Trim(hello)", "found 'hello'; quote text", 6),
        ("$Trim('abc)", "a string is never closed", 6),
        ("$Trim('a\\qb')", "unknown escape \\q", 8),
        ("$Add(1., 2)", "malformed number", 5),
        ("$Add(1e999, 2)", "is too long or out of range", 5),
        ("$Trim($foo)", "is not a selector or an operator", 6),
        ("$Trim($$)", "is not a selector or an operator", 6),
    ],
)
def test_compile_error_names_the_text_and_its_position(template: str, reason: str, position: int) -> None:
    error = template_error(template)
    assert reason in error.reason
    assert error.position == position
    assert error.path == "apps[0].actions[0].body"
    assert str(error).startswith("apps[0].actions[0].body: ")
    assert f"at position {position} of " in str(error)


def test_compile_error_path_points_inside_the_value() -> None:
    error = template_error({"user": {"emails": ["ok", "$Foo(1)"]}}, "apps[0].actions[2].body")
    assert error.path == "apps[0].actions[2].body.user.emails[1]"
    assert template_error({"a": "$Foo(1)"}, "").path == "a"


@pytest.mark.parametrize("value", [{1: "a"}, {"a": {1, 2}}, ("a",), b"bytes"])
def test_compile_refuses_values_that_are_not_json(value: Any) -> None:
    with pytest.raises(TemplateError):
        compile_template(value)


def test_template_error_is_a_value_error() -> None:
    assert issubclass(TemplateError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# What a compiled template tells about itself


def test_template_lists_its_selectors_secrets_and_references() -> None:
    compiled = compile_template(
        {
            "auth": "Bearer $Secret{MAILER_KEY}",
            "crm": ["$Token{CRM_USER}", "$Uppercase($Input{body}{name})"],
            "h": "$Auth{key}{headers}{Authorization}",
            "n": "$Sequence{main}{create-user}{emails}{[0]}",
        },
        "body",
    )
    assert compiled.selectors == frozenset({"Secret", "Input", "Auth", "Sequence"})
    assert compiled.secret_names == frozenset({"MAILER_KEY", "CRM_USER"})
    assert not compiled.is_static
    assert Reference("Secret", ("CRM_USER",), "$Token{CRM_USER}", "body.crm[0]") in compiled.references
    assert (
        Reference(
            "Sequence", ("main", "create-user", "emails", 0), "$Sequence{main}{create-user}{emails}{[0]}", "body.n"
        )
        in compiled.references
    )


def test_static_template_renders_the_value_itself() -> None:
    value = {"a": [1, {"b": "text"}], "c": None}
    compiled = compile_template(value)
    assert compiled.is_static
    assert compiled.render(Scope()) is value
    assert compile_template(None).render(SCOPE) is None


def test_partly_static_value_keeps_its_static_parts() -> None:
    compiled = compile_template({"fixed": {"x": 1}, "id": "$Input{params}{id}"})
    assert compiled.render(SCOPE) == {"fixed": {"x": 1}, "id": "u-1"}


def test_rendering_does_not_mutate_the_scope() -> None:
    before = copy.deepcopy(SCOPE.input)
    render(
        {
            "a": "$Filter($Input{body}{items}, 'price', '>', 1)",
            "b": "$Split($Input{body}{csv}, ',')",
            "c": "$Input{body}{tags}",
            "d": "x $Input{body}{items}",
        }
    )
    assert before == SCOPE.input


# ---------------------------------------------------------------------------------------------------------------
# Limits


def nested_operators(levels: int) -> str:
    return "$Trim(" * levels + "$Input{a}" + ")" * levels


def test_operator_nesting_is_bounded() -> None:
    assert compile_template(nested_operators(MAX_NESTING)).render(Scope(input={"a": " x "})) == "x"
    error = template_error(nested_operators(MAX_NESTING + 1))
    assert f"nested more than {MAX_NESTING} levels deep" in error.reason


def test_array_literal_nesting_counts_towards_the_bound() -> None:
    template = "$Concat(" + "[" * MAX_NESTING + "$Input{a}" + "]" * MAX_NESTING + ")"
    assert "nested more than" in template_error(template).reason


def test_value_depth_is_bounded() -> None:
    value: Any = "$Input{a}"
    for _ in range(MAX_VALUE_DEPTH):
        value = [value]
    compile_template(value)
    assert "nested more than" in template_error([value]).reason


def test_template_length_is_bounded() -> None:
    compile_template("x" * MAX_TEMPLATE_LENGTH)
    assert "longer than" in template_error("x" * (MAX_TEMPLATE_LENGTH + 1)).reason
    parts = MAX_TEMPLATE_TOTAL_LENGTH // MAX_TEMPLATE_LENGTH + 1
    assert "longer than" in template_error(["x" * MAX_TEMPLATE_LENGTH] * parts).reason


def test_rendered_size_is_bounded() -> None:
    big = Scope(input={"a": "x" * (MAX_RENDERED_LENGTH // 2 + 1), "n": "y" * 2000})
    assert compile_template("$Input{a}").render(big) == big.input["a"]  # passed through, not produced
    error = render_error("$Input{a}$Input{a}", big)
    assert "exceeds the limit" in error.message or "would exceed the limit" in error.message
    error = render_error("$Replace($Input{n}, 'y', '" + "z" * 1000 + "')", big)
    assert error.selector.startswith("$Replace(")
    assert "limit" in error.message
    error = render_error("$Concat([" + ", ".join(["$Input{a}"] * 3) + "])", big)
    assert "limit" in error.message


def test_non_json_values_in_the_scope_are_render_errors_in_text() -> None:
    scope = Scope(input={"when": object(), "nan": float("nan"), "set": [{1, 2}]})
    assert "is not a JSON value" in render_error("at $Input{when}", scope).message
    assert "not finite" in render_error("n=$Input{nan}", scope).message
    assert "not JSON" in render_error("s=$Input{set}", scope).message


# ---------------------------------------------------------------------------------------------------------------
# Properties

KEYS = ["a", "b", "c"]
SECRET_NAMES = ["S1", "S2"]

text_scalars = st.text(max_size=6) | st.sampled_from(
    ["2024-07-15", "2024-07-15T10:30:00+02:00", "1,2,3", "12", "-1.5", "", " a "]
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text_scalars
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(KEYS), children, max_size=3),
    max_leaves=6,
)
objects = st.fixed_dictionaries({}, optional={k: json_values for k in KEYS})
nested_objects = st.fixed_dictionaries({}, optional={k: objects for k in KEYS})
scopes = st.builds(
    Scope,
    input=objects,
    variables=nested_objects,
    constants=nested_objects,
    auth=st.dictionaries(
        st.sampled_from(KEYS), st.dictionaries(st.sampled_from(sorted(AUTH_PARTS)), objects), max_size=1
    ),
    secrets=st.dictionaries(st.sampled_from(SECRET_NAMES), st.text(max_size=5)).map(lambda d: d.get),
    session=st.none() | objects,
    sequence=st.dictionaries(st.sampled_from(KEYS), nested_objects, max_size=1),
    response=st.none()
    | st.fixed_dictionaries({"status": st.integers(100, 599), "headers": objects, "body": json_values}),
    default=json_values,
)

key = st.sampled_from(KEYS).map(lambda k: "{" + k + "}") | st.integers(0, 2).map(lambda i: "{[" + str(i) + "]}")
keys = st.lists(key, max_size=3).map("".join)
name = st.sampled_from(KEYS).map(lambda k: "{" + k + "}")
selectors = st.one_of(
    keys.map(lambda k: "$Input" + k),
    keys.map(lambda k: "$Session" + k),
    st.tuples(st.sampled_from(["Variable", "Constant", "Sequence"]), name, name, keys).map(lambda t: "$" + "".join(t)),
    st.tuples(name, st.sampled_from(sorted(AUTH_PARTS)), keys).map(lambda t: f"$Auth{t[0]}{{{t[1]}}}{t[2]}"),
    st.tuples(st.sampled_from(sorted(RESPONSE_PARTS)), keys).map(lambda t: f"$Response{{{t[0]}}}{t[1]}"),
    st.tuples(st.sampled_from(["Secret", "Token"]), st.sampled_from(SECRET_NAMES)).map(lambda t: f"${t[0]}{{{t[1]}}}"),
    st.just("$Default"),
)
literals = st.one_of(
    st.integers(-3, 30).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.text(alphabet="ab ,.-:/YMDHms", max_size=6).map(lambda s: '"' + s + '"'),
    st.sampled_from(["true", "false", "null", '">"', "'<='", '"=="', '"!="', '"a"', "','", '"DD/MM/YYYY HH:mm"']),
)
ARITY = {
    "Add": (2, 4),
    "Subtract": (2, 3),
    "Concat": (1, 2),
    "Substring": (2, 3),
    "Trim": (1, 1),
    "Split": (2, 2),
    "Pick": (2, 2),
    "Join": (2, 2),
    "Uppercase": (1, 1),
    "Lowercase": (1, 1),
    "Dateformat": (2, 2),
    "Replace": (3, 3),
    "Filter": (3, 4),
    "Find": (3, 4),
}
assert set(ARITY) == OPERATOR_NAMES


def operator_calls(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(ARITY)).flatmap(
        lambda op: st.lists(inner, min_size=ARITY[op][0], max_size=ARITY[op][1]).map(
            lambda args: f"${op}({', '.join(args)})"
        )
    )


expressions = st.recursive(
    selectors | selectors | literals,
    lambda inner: operator_calls(inner) | st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
    max_leaves=8,
)
template_strings = expressions | st.lists(
    expressions | st.sampled_from(["x", " ", "$", "$5 "]), min_size=2, max_size=3
).map("".join)
template_values = st.recursive(
    template_strings | template_strings | template_strings | json_scalars,
    lambda children: (
        st.lists(children, min_size=1, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS), children, min_size=1, max_size=3)
    ),
    max_leaves=5,
)

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(PROPERTY, max_examples=150)
@given(template_strings | template_values, scopes)
def test_rendering_raises_nothing_but_render_error(template: Any, scope: Scope) -> None:
    try:
        compiled = compile_template(template, "t")
    except TemplateError:
        return  # e.g. an operator of literals given a bad literal
    before = copy.deepcopy((scope.input, scope.session, scope.sequence, scope.response, scope.default))
    failure: RenderError | None = None
    try:
        json.dumps(compiled.render(scope), default=str)  # a JSON-like value
    except RenderError as exc:
        failure = exc
    if failure is not None:
        assert failure.selector
        assert failure.path.startswith("t")
    assert before == (scope.input, scope.session, scope.sequence, scope.response, scope.default)


FRAGMENTS = [
    "$", "$$", "Input", "Token", "Secret", "Add", "Filter", "Default", "Foo", "input", "{", "}", "(", ")", "[", "]",
    "{[0]}", "{a}", ",", " ", '"', "'", "\\", "-", "1", "1e5", ".", "true", "x", "$Input{a}", "$Add(", "$Concat([",
    "$Secret{S1}", "'>'", "$Dateformat(",
]  # fmt: skip


@PROPERTY
@given(st.text(max_size=60) | st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join))
def test_compiling_any_text_raises_nothing_but_template_error(text: str) -> None:
    try:
        compiled = compile_template(text)
    except TemplateError as exc:
        failure = exc
    else:
        with contextlib.suppress(RenderError):
            compiled.render(SCOPE)
        return
    assert failure.position is None or 0 <= failure.position <= len(text)


no_dollar = st.text(alphabet=st.characters(exclude_characters="$"), max_size=12)
dollarless = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | no_dollar,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=12,
)


@PROPERTY
@given(dollarless)
def test_template_without_selectors_renders_to_itself(value: Any) -> None:
    compiled = compile_template(value)
    assert compiled.is_static
    assert compiled.selectors == frozenset()
    assert compiled.render(SCOPE) is value


@PROPERTY
@given(st.text(max_size=40))
def test_escaped_text_renders_to_the_original_text(text: str) -> None:
    compiled = compile_template(text.replace("$", "$$"))
    assert compiled.is_static
    assert compiled.render(Scope()) == text


# -- secrets: errors withhold, renders report what derives from them ---------------------------------------------

LONG_SECRET = "s3cr3t-value-19char"
SECRET_SCOPE = Scope(
    input={"body": {"a": 1}},
    secrets={"LONG": LONG_SECRET, "WORD": "hunter"}.get,
    auth={"key": {"headers": {"Authorization": "Bearer abcdefgh"}, "query": {"parts": ["x", "y"]}, "body": {}}},
    response={"status": 200, "headers": {}, "body": {"access_token": "tok-123456"}},
)


@pytest.mark.parametrize(
    ("template", "selector", "revealing"),
    [
        ("$Substring($Secret{LONG}, 30)", "$Secret{LONG}", [str(len(LONG_SECRET)), "characters"]),
        ("$Substring($Secret{LONG}, 5, 2)", "$Secret{LONG}", ["the end"]),
        ("$Pick($Secret{LONG}, 40)", "$Secret{LONG}", [str(len(LONG_SECRET))]),
        ("$Pick($Input{body}, $Secret{WORD})", "$Secret{WORD}", ["hunter"]),
        ("$Add($Secret{WORD}, 1)", "$Secret{WORD}", ["not a number"]),
        ("$Pick($Auth{key}{headers}{Authorization}, 99)", "$Auth{key}{headers}{Authorization}", ["15"]),
        ("$Substring($Response{body}{access_token}, 50)", "$Response{body}{access_token}", ["10"]),
        ("$Find([$Uppercase($Secret{WORD})], '==', 'HUNTER2')", "$Secret{WORD}", ["no item matches"]),
        ("$Dateformat($Secret{WORD}, 'YYYY')", "$Secret{WORD}", ["ISO"]),
        ("x-$Substring($Trim($Secret{LONG}), 30)", "$Secret{LONG}", [str(len(LONG_SECRET))]),
    ],
)
def test_an_operator_error_on_a_secret_names_the_operator_and_selector_never_the_value(
    template: str, selector: str, revealing: list[str]
) -> None:
    error = render_error(template, SECRET_SCOPE)
    operator = error.selector[: error.selector.index("(")]
    assert selector in error.message and operator in error.message and "withheld" in error.message
    for text in [LONG_SECRET, "hunter", "abcdefgh", "tok-123456", *revealing]:
        assert text not in error.message, error.message


def test_an_index_past_a_secret_array_withholds_its_length() -> None:
    error = render_error("$Auth{key}{query}{parts}{[5]}", SECRET_SCOPE)
    assert "2 items" not in str(error) and "[5] is out of range" in error.message


def test_a_render_reports_every_value_that_derives_from_a_secret() -> None:
    taint = Taint()
    scope = Scope(
        input={"q": "public"},
        secrets={"KEY": "k-123"}.get,
        session={"user": "u-7"},
        auth={"login": {"headers": {"Authorization": "Bearer t-9"}, "query": {}, "body": {}}},
        taint=taint,
    )
    value = {
        "a": "Bearer $Secret{KEY}",
        "b": "$Uppercase($Secret{KEY})",
        "c": "$Input{q}",
        "d": "/x/$Session{user}/y",
        "e": "$Auth{login}{headers}{Authorization}",
    }
    assert compile_template(value).render(scope) == {
        "a": "Bearer k-123",
        "b": "K-123",
        "c": "public",
        "d": "/x/u-7/y",
        "e": "Bearer t-9",
    }
    assert {"k-123", "Bearer k-123", "K-123", "u-7", "Bearer t-9"} <= taint.texts
    assert not taint.touches("public") and taint.touches("/a/k-123/b")
    # The login action's input is rendered from secrets: reading it again through $Input stays tainted.
    again = Scope(input={"key": "k-123"}, taint=taint)
    assert render_error("$Substring($Input{key}, 40)", again).message.endswith(
        "(the reason is withheld: it could reveal the value)"
    )
