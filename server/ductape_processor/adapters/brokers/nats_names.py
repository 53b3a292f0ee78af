"""NATS names: a group's durable consumer, whether a stream's subjects cover a topic, a topic as a subject (see
`nats`)."""

from __future__ import annotations

import hashlib
import re

from ductape_processor.errors import FieldViolation, InvalidArgument

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")
_WHITESPACE = re.compile(r"\s")


def consumer_name(topic: str, group: str) -> str:
    """The durable consumer of `group` on `topic`: readable, valid for JetStream, distinct per (topic, group)."""
    digest = hashlib.sha256(f"{topic}\n{group}".encode()).hexdigest()[:12]
    return f"{_UNSAFE_NAME.sub('_', group)[:48]}__{_UNSAFE_NAME.sub('_', topic)[:64]}_{digest}"


def subject_covered(subject: str, patterns: list[str]) -> bool:
    """Whether one of the stream's subject patterns (with `*` and `>` wildcards) matches `subject`."""
    tokens = subject.split(".")
    for pattern in patterns:
        parts = pattern.split(".")
        for index, part in enumerate(parts):
            if part == ">":
                if len(tokens) > index:
                    return True
                break
            if index >= len(tokens) or part not in ("*", tokens[index]):
                break
        else:
            if len(parts) == len(tokens):
                return True
    return False


def check_subject(topic: str) -> None:
    """INVALID_ARGUMENT unless `topic` is a NATS subject a publish can name: the adapter writes its HPUB itself
    (`nats_publish.write`), so this is where whitespace, which would end the subject (and CR/LF the command), is
    refused, as nats-py's own publish does."""
    if not topic or any(not token for token in topic.split(".")):
        raise InvalidArgument(
            f"topic name {topic!r} is not a valid NATS subject (empty token between dots)",
            violations=[FieldViolation("topic.name", "NATS subjects have no empty tokens ('a..b', '.a', 'a.')")],
        )
    if _WHITESPACE.search(topic):
        raise InvalidArgument(
            f"topic name {topic!r} is not a valid NATS subject (whitespace)",
            violations=[FieldViolation("topic.name", "NATS subjects hold no whitespace")],
        )
