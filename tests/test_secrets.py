"""Secret sources: the secrets file first, then PROCESSOR_SECRET_<NAME> variables, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from ductape_processor.runtime.policies.secrets import (
    SecretsFileError,
    SecretSource,
    read_secrets_file,
    referenced_secrets,
)


def test_the_file_wins_over_prefixed_environment_variables(tmp_path: Path) -> None:
    path = tmp_path / "secrets.env"
    path.write_text("# comment\nMAILER_KEY=from-file\nexport QUOTED='a # b'\nEMPTY=\n")
    environ = {"PROCESSOR_SECRET_MAILER_KEY": "from-env", "PROCESSOR_SECRET_OTHER": "env-only"}
    source = SecretSource(read_secrets_file(path), environ)
    assert source.get("MAILER_KEY") == "from-file"
    assert source.get("QUOTED") == "a # b"
    assert source.get("EMPTY") == ""
    assert source.get("OTHER") == "env-only"
    assert source.missing(["MAILER_KEY", "OTHER", "NOPE"]) == ["NOPE"]


def test_unprefixed_environment_variables_are_not_secrets() -> None:
    source = SecretSource(None, {"PGPASSWORD": "hunter2", "AWS_SECRET_ACCESS_KEY": "x"})
    assert source.get("PGPASSWORD") is None
    assert source.get("AWS_SECRET_ACCESS_KEY") is None


def test_a_malformed_secrets_file_names_the_line_not_the_value(tmp_path: Path) -> None:
    path = tmp_path / "secrets.env"
    path.write_text("GOOD=1\nthis line has the value s3cr3t\n")
    with pytest.raises(SecretsFileError) as caught:
        read_secrets_file(path)
    assert ":2:" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)
    with pytest.raises(SecretsFileError, match="cannot read"):
        read_secrets_file(tmp_path / "missing.env")


def test_referenced_secret_names_are_found_anywhere() -> None:
    document = {"a": ["Bearer $Secret{ONE}", {"b": "$Secret{TWO}:$Secret{ONE}"}], "c": 3}
    assert referenced_secrets(document) == {"ONE", "TWO"}


def test_resolving_replaces_every_reference_and_names_the_first_missing_one() -> None:
    source = SecretSource({"USER": "u", "PASSWORD": "p@ss"}, {})
    assert source.resolve("amqp://$Secret{USER}:$Secret{PASSWORD}@host/", KeyError) == "amqp://u:p@ss@host/"
    assert source.resolve("$Secret{PASSWORD}", KeyError) == "p@ss"
    assert source.resolve("no reference", KeyError) == "no reference"
    with pytest.raises(KeyError) as missing:
        source.resolve("redis://:$Secret{NOPE}@host/$Secret{ALSO_NOPE}", KeyError)
    assert missing.value.args == ("NOPE",)
