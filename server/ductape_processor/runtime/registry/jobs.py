"""The manifest's `jobs`: repeating jobs a product declares. Each lives while the version pinned for its
environment declares it (docs/jobs.md, "Declared jobs"); the jobs runtime keeps the store in step."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field, JsonValue, field_validator, model_validator

from ductape_processor.runtime.jobs.checks import cron_problem, zone_problem
from ductape_processor.runtime.registry.durations import PositiveDuration
from ductape_processor.runtime.registry.fields import ManifestModel, NamedResource

TargetKindName = Literal["action", "database_action", "notification", "storage", "publish", "feature"]


class JobTarget(ManifestModel):
    """What a declared job runs: a resource of the product, named as its own calls name it."""

    kind: TargetKindName = "action"
    event: str = Field(
        min_length=1,
        description="`app:action`, `database:action`, `notification:message`, `storage` or `broker:topic`.",
    )


class JobRepeat(ManifestModel):
    """When a declared job runs: a cron expression in a time zone, or a fixed interval."""

    cron: str | None = Field(None, description="5 fields, or 6 with seconds first; read in `timezone`.")
    every: PositiveDuration | None = Field(None, description="A fixed interval, at least 1s.")
    timezone: str = Field("UTC", description="The IANA time zone of the cron expression's hours.")
    limit: int = Field(0, ge=0, description="At most this many occurrences (0: no limit).")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        problem = cron_problem(value) if value is not None else None
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        problem = zone_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_rhythm(self) -> JobRepeat:
        if (self.cron is None) == (self.every is None):
            raise ValueError("give either cron or every")
        if self.every is not None and self.every < timedelta(seconds=1):
            raise ValueError("every must be at least 1s")
        return self


class JobRetryPolicy(ManifestModel):
    """How a declared job's failed runs are tried again: the delay before retry n is `initial_delay` x 2^(n-1),
    capped at `max_delay`, jittered when `jitter`."""

    max_retries: int = Field(0, ge=0, le=100)
    initial_delay: PositiveDuration = timedelta(seconds=1)
    max_delay: PositiveDuration = timedelta(minutes=5)
    jitter: bool = True


class DeclaredJob(NamedResource):
    """A repeating job of the product; its tag is its name among the environment's jobs."""

    target: JobTarget
    input: dict[str, JsonValue] = Field(default_factory=dict, description="The target's input.")
    repeat: JobRepeat
    retry: JobRetryPolicy = Field(default_factory=JobRetryPolicy)
    overlap: Literal["skip", "buffer_one", "allow"] = "skip"
    catch_up_window: PositiveDuration = timedelta(minutes=1)
    envs: list[str] | None = Field(None, description="The environments it runs in (slugs); default every one.")
