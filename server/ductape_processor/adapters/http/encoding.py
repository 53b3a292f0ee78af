"""Request encoding for HTTP upstreams: header checks, path segments, query pairs and bodies in a request type.

Everything here turns rendered values into what goes on the wire, and refuses (with the field that holds it) what
cannot go there unambiguously: a header name that is not an RFC 9110 token or frames the message, a control character
in a header value or in a multipart part's headers, a path parameter that is a dot-segment.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote, unquote, urlencode

from yarl import URL

from ductape_processor.errors import FieldViolation, InvalidArgument
from ductape_processor.reasons import Reason

FRAMING_HEADERS: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer", "keep-alive", "expect"}
)
"""Headers that frame or route a message hop by hop (plus every `Proxy-*`): only the HTTP client sets them."""

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_TARGET = re.compile(r"[\x21-\x7e]*")
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]+")
"""What `quote(..., safe="")` leaves as it is and `unquote` cannot change (RFC 3986's unreserved characters)."""
"""What a request target may hold (RFC 9112): visible ASCII, so no space, CR, LF or NUL can end the request line."""


def header_name_problem(name: str) -> str | None:
    """Why `name` cannot be sent as a header name, or None when it can."""
    lowered = name.strip().lower()
    if lowered in FRAMING_HEADERS or lowered.startswith("proxy-"):
        return "is a framing or hop-by-hop header (set by the processor's HTTP client), so it cannot be given"
    if not _TOKEN.fullmatch(name):
        return (
            "is not a valid header name (RFC 9110 token: letters, digits and !#$%&'*+-.^_`|~ only; "
            "no spaces, colons or control characters)"
        )
    return None


def request_line_problem(method: str, url: URL) -> tuple[str, str] | None:
    """The field and why, when `method` or `url`'s path or query cannot go into a request line unambiguously, or None.

    Input cannot put such bytes there (path parameters and query pairs are percent-encoded), but the base URL is the
    manifest's, taken as encoded, and yarl keeps a space or a NUL in it: checked again here, before anything is sent.
    """
    if not _TOKEN.fullmatch(method):
        return "method", "is not an HTTP method (an RFC 9110 token)"
    if not (_TARGET.fullmatch(url.raw_path) and _TARGET.fullmatch(url.raw_query_string)):
        return "url", "holds a space, a control character or a byte outside ASCII in its path or query"
    return None


def header_value_problem(value: str) -> str | None:
    """Why `value` cannot be sent as a header value (a CR, LF, NUL or other control character), or None."""
    found = _CONTROL.search(value)
    if found is None:
        return None
    return f"contains the control character U+{ord(found.group()):04X}; header values cannot hold CR, LF, NUL or others"


def header_field(where: str, name: str) -> str:
    """How an error names one header: `input.headers["X Y"]` (JSON-quoted, so any name prints safely)."""
    return f"{where}[{json.dumps(name)}]"


def canonical_json(value: Any) -> str:
    """`value` as compact JSON with sorted keys: the text of a structured value in a header, query or form field
    (and a stable form to hash)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _segment(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else canonical_json(value) if isinstance(value, (dict, list)) else str(value)


def path_parameter(name: str, value: Any) -> str:
    """One path parameter, encoded as one segment; a dot-segment (`.`, `..`, `%2e`, ...) is refused.

    Encoding cannot make a dot-segment safe: RFC 3986 normalisation decodes `%2E` back to `.` and then removes dot
    segments, so a proxy or framework in front of the upstream would take `/items/%2E%2E/detail` to `/detail`.
    """
    text = value if type(value) is str else _segment(value)
    if text not in (".", "..") and _UNRESERVED.fullmatch(text):
        return text  # nothing to decode, nothing to encode: `quote(text, safe="")` is `text`
    decoded = text
    for _ in range(8):  # and what any number of rounds of percent-decoding make of it (bounded)
        if decoded in (".", ".."):
            raise InvalidArgument(
                f"invalid input: input.params.{name}: is a dot-segment",
                reason=Reason.INVALID_INPUT,
                violations=[
                    FieldViolation(
                        f"input.params.{name}",
                        "is a dot-segment ('.' or '..', or a percent-encoded form): it would change the path",
                    )
                ],
            )
        decoded, before = unquote(decoded), decoded
        if decoded == before:
            break
    return quote(text, safe="")


def query_pairs(value: Any, where: str) -> list[tuple[str, str]]:
    """A rendered query (or form) object as name/value pairs: a list repeats its name, None leaves a value out."""
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise InvalidArgument.field(where, "the query renders to something other than an object")
    pairs: list[tuple[str, str]] = []
    for key, item in value.items():
        for one in item if isinstance(item, list) else [item]:
            if one is None:
                continue
            if isinstance(one, bool):
                pairs.append((key, "true" if one else "false"))
            elif isinstance(one, (dict, list)):
                pairs.append((key, canonical_json(one)))
            else:
                pairs.append((key, str(one)))
    return pairs


def _multipart_text(text: str, field: str, what: str) -> None:
    """A multipart part's name, file name or content type goes into its headers: no control characters there."""
    problem = header_value_problem(text)
    if problem is not None:
        raise InvalidArgument(
            f"invalid input: {field}: the {what} {problem}",
            reason=Reason.INVALID_INPUT,
            violations=[FieldViolation(field, f"the {what} {problem}")],
        )


def _quoted(text: str) -> str:
    """A multipart part's name or file name inside its quotes, escaped as browsers do (HTML's form encoding)."""
    return text.replace('"', "%22")  # CR and LF cannot be there: refused with the other control characters


def multipart_body(parts: list[tuple[str, bytes, str | None, str | None]]) -> tuple[bytes, str]:
    """A multipart/form-data body (RFC 7578) of (name, content, file name, content type) parts, and its content type.

    Names, file names and content types must be free of control characters (`_multipart_text` checks them) and the
    boundary is random: nothing a part holds can end it or add a part.
    """
    boundary = secrets.token_hex(16)
    chunks: list[bytes] = []
    for name, content, filename, content_type in parts:
        disposition = f'form-data; name="{_quoted(name)}"'
        if filename is not None:
            disposition += f'; filename="{_quoted(filename)}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n"
        chunks += [head.encode(), b"\r\n", content, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def encode_body(body: Any, request_type: str, method: str) -> tuple[bytes | None, str | None]:
    """The request body in the app environment's request type, and its content type."""
    if body is None or method in ("GET", "HEAD"):
        return None, None
    if request_type == "application/json":
        return json.dumps(body, ensure_ascii=False).encode(), "application/json"
    if request_type == "application/x-www-form-urlencoded":
        if not isinstance(body, Mapping):
            raise InvalidArgument.field("input.body", "a form body must be an object")
        return urlencode(query_pairs(body, "input.body")).encode(), request_type
    if request_type == "multipart/form-data":
        if not isinstance(body, Mapping):
            raise InvalidArgument.field("input.body", "a multipart body must be an object")
        parts: list[tuple[str, bytes, str | None, str | None]] = []
        for key, value in body.items():
            _multipart_text(key, header_field("input.body", key), "field name")
            if isinstance(value, Mapping) and "content_base64" in value:
                try:
                    content = base64.b64decode(str(value["content_base64"]), validate=True)
                except ValueError:
                    raise InvalidArgument.field(f"input.body.{key}", "content_base64 is not base64") from None
                filename = str(value.get("filename", key))
                content_type = str(value.get("content_type", "application/octet-stream"))
                _multipart_text(filename, f"input.body.{key}.filename", "file name")
                _multipart_text(content_type, f"input.body.{key}.content_type", "content type")
                parts.append((key, content, filename, content_type))
            else:
                text = value if isinstance(value, str) else canonical_json(value)
                parts.append((key, text.encode(), None, "text/plain; charset=utf-8"))
        return multipart_body(parts)
    if not isinstance(body, str):
        raise InvalidArgument.field("input.body", f"a {request_type} body must render to text (the XML document)")
    return body.encode(), f"{request_type}; charset=utf-8"
