"""The processor's one settings object: `PROCESSOR_*` environment variables, overridden by command-line flags."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _split_list(value: object) -> object:
    """Accept a comma-separated string (as an environment variable gives it) as well as a list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Configuration of one processor instance. Every field has an embedded default that serves on loopback."""

    model_config = SettingsConfigDict(env_prefix="PROCESSOR_", extra="forbid", frozen=True)

    address: str = Field("127.0.0.1:50051", description="host:port the gRPC server listens on.")
    data_dir: Path = Field(Path(".data"), description="Folder for the embedded SQLite store and local state.")
    store: str = Field(
        "sqlite",
        description="`sqlite` (a file under data_dir), `sqlite:///path/to/file.db`, or a `postgresql://` DSN.",
    )
    store_schema: str = Field(
        "processor",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="PostgreSQL schema holding the store's tables.",
    )
    manifests: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Manifest files or folders (*.yaml, *.yml, *.json) applied at start.",
    )
    secrets_file: Path | None = Field(None, description="A KEY=VALUE file read as a secret source.")
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="The asyncio event loop: uvloop when installed (auto), or the standard one."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    helper_thread_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Nice value of the process's threads but the event loop's (gRPC's, the SQLite writer's): they"
        " stop preempting the loop at each wake-up (threads.py). 0: left as started.",
    )
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    max_concurrent_rpcs: int | None = Field(
        None, ge=1, description="Calls served at once; more are refused with RESOURCE_EXHAUSTED. Unset: no cap."
    )
    keepalive_time_s: float = Field(60.0, gt=0, description="Ping an idle client connection this often.")
    keepalive_timeout_s: float = Field(20.0, gt=0, description="Close a connection whose ping is unanswered.")
    shutdown_grace_s: float = Field(15.0, ge=0, description="Time calls in flight get to finish on SIGTERM.")
    api_key_hashes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hex SHA-256 hashes of the accepted API keys."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate chain of the server.")
    tls_key: Path | None = Field(None, description="PEM private key of the server.")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle; when set, clients must present a cert (mTLS).")
    insecure: bool = Field(False, description="Allow a non-loopback bind without TLS and authentication.")
    max_upstream_response_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest upstream response body an action accepts."
    )
    idempotency_retention_s: float = Field(
        86400.0, gt=0, description="How long an idempotency key's first result is kept and replayed."
    )
    execution_flush_s: float = Field(0.2, gt=0, description="How often queued execution records are written.")
    broker_max_message_bytes: int = Field(
        1024 * 1024, ge=1, description="Largest message payload BrokerService publishes."
    )
    storage_max_file_bytes: int = Field(
        5 * 1024**3, ge=1, description="Largest file a storage saves, unless its manifest entry sets max_file_bytes."
    )
    stream_idle_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Longest an upload may send nothing (UPLOAD_IDLE), or a download's client read nothing "
        "(DOWNLOAD_NOT_READ), before the call ends and lets go of its file.",
    )
    storage_http_address: str | None = Field(
        None, description="host:port of the HTTP listener serving fs storages' signed URLs; unset: off."
    )
    webhook_http_address: str | None = Field(
        "127.0.0.1:8090",
        description="host:port of the HTTP listener receiving provider webhooks, started once a product declares a "
        "receive path; empty: off.",
    )
    webhook_dispatch_lease_s: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="How long a received webhook's dispatch is leased to the replica making it; one that died is "
        "replaced after it. Keep it longer than a dispatch takes (a publish waits for its broker 8 s at most).",
    )
    webhook_retention_s: float = Field(
        30 * 86400.0,
        ge=3600,
        description="How long emitted webhook messages (with their deliveries and attempts) and received webhooks are "
        "kept; pending ones are kept until they are done.",
    )
    session_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Session root keys `id:base64url(32 bytes)`, newest first; the first encrypts new tokens.",
    )
    session_revocation_poll_s: float = Field(
        2.0, gt=0, description="How often revocations made on other replicas are picked up (their staleness bound)."
    )
    database_max_rows: int = Field(
        10_000, ge=1, le=1_000_000, description="Most rows one database action answers; beyond, RESOURCE_EXHAUSTED."
    )
    database_max_result_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="About the most bytes of rows one database action answers."
    )
    manifest_max_bytes: int = Field(
        1024 * 1024, ge=1024, le=64 * 1024 * 1024, description="Largest manifest Apply and Validate accept, in bytes."
    )
    registry_poll_s: float = Field(
        2.0, gt=0, description="How often a replica re-checks the store for products changed elsewhere."
    )
    job_lease_s: float = Field(
        30.0, ge=1, le=3600, description="How long a job run is leased to the replica running it (renewed every third)."
    )
    job_poll_s: float = Field(5.0, gt=0, description="How often the job scheduler re-checks the store as a fallback.")
    feature_lease_s: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="How long a feature run is leased to the replica running it (renewed every third).",
    )
    feature_poll_s: float = Field(
        5.0, gt=0, description="How often a replica re-checks the store for feature runs to take over, as a fallback."
    )
    feature_max_wait_s: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="The longest a FeatureService call with `wait` waits for its run to end, whatever its deadline.",
    )

    @field_validator(
        "secrets_file",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "max_concurrent_rpcs",
        "storage_http_address",
        "webhook_http_address",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("session_keys")
    @classmethod
    def _session_keys(cls, value: list[str]) -> list[str]:
        from ductape_processor.runtime.sessions import parse_root_key

        ids = [parse_root_key(spec)[0] for spec in value]
        if len(set(ids)) != len(ids):
            raise ValueError("session key ids must be unique")
        return value

    @field_validator("manifests", "api_key_hashes", "session_keys", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("api_key_hashes")
    @classmethod
    def _hashes(cls, value: list[str]) -> list[str]:
        lowered = [v.lower() for v in value]
        for item in lowered:
            if not _HEX_SHA256.match(item):
                raise ValueError("each API key hash must be 64 hex digits (SHA-256); see `ductape-processor hash-key`")
        return lowered

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        if value == "sqlite" or value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            return value
        raise ValueError("store must be 'sqlite', 'sqlite:///path/to/file.db' or a postgresql:// DSN")

    @field_validator("address", "storage_http_address", "webhook_http_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("address must be host:port, e.g. 127.0.0.1:50051 or [::1]:50051")
        return value

    @property
    def host(self) -> str:
        """The host part of `address`, without IPv6 brackets."""
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def is_loopback(self) -> bool:
        """True when the server is reachable from this machine only."""
        return _loopback(self.address)

    @property
    def tls_enabled(self) -> bool:
        """True when the server presents a certificate."""
        return self.tls_cert is not None

    def exposure_problems(self) -> list[str]:
        """Why serving on `address` would be unsafe: empty on loopback, or when TLS and authentication are on."""
        problems: list[str] = []
        if (self.tls_cert is None and self.tls_key is not None) or (self.tls_cert is not None and self.tls_key is None):
            problems.append("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and not self.tls_enabled:
            problems.append("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if not self.is_loopback and not self.session_keys:
            problems.append(
                f"{self.address} is not a loopback address and no session keys are configured (set "
                "PROCESSOR_SESSION_KEYS: a key generated for one replica cannot verify another's tokens)"
            )
        if self.storage_http_address is not None and not self.insecure and not _loopback(self.storage_http_address):
            problems.append(
                f"storage_http_address {self.storage_http_address} is not a loopback address (its URLs are "
                "unencrypted HTTP): put it on loopback behind a TLS proxy, or pass --insecure"
            )
        if self.webhook_http_address is not None and not self.insecure and not _loopback(self.webhook_http_address):
            problems.append(
                f"webhook_http_address {self.webhook_http_address} is not a loopback address (it serves plain "
                "HTTP): put it on loopback behind a TLS proxy, or pass --insecure"
            )
        if self.is_loopback or self.insecure:
            return problems
        if not self.tls_enabled:
            problems.append(
                f"{self.address} is not a loopback address and TLS is off (set PROCESSOR_TLS_CERT/PROCESSOR_TLS_KEY)"
            )
        if not self.api_key_hashes and self.tls_client_ca is None:
            problems.append(
                f"{self.address} is not a loopback address and no client authentication is configured "
                "(set PROCESSOR_API_KEY_HASHES or PROCESSOR_TLS_CLIENT_CA)"
            )
        return problems
