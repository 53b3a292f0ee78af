"""When a job's occurrences fall due: cron expressions in a time zone (through cronsim) and fixed intervals.

Daylight saving time, for a cron expression whose minute and hour are fixed (`30 1 * * *`): when the clocks fall
back, the repeated wall-clock time runs once, at its first instance; when they spring forward past it, it runs
once, at the first minute after the gap (01:30 on a night that skips 01:00-02:00 runs at 02:00). An expression with
a wildcard minute or hour (`*/15 * * * *`, `0 * * * *`) runs at each real moment that matches, so in a repeated
hour it runs in both instances and in a skipped hour not at all. `every` counts elapsed time: clock changes do not
move it. cronsim applies this rule to 5-field expressions; 6-field ones (seconds first) get the same rule here.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo

from cronsim import CronSim

from ductape_processor.errors import InvalidArgument
from ductape_processor.runtime.jobs.checks import cron_problem, time_zone, zone_problem
from ductape_processor.runtime.jobs.model import MAX_RETRIES, MAX_SPAN, MIN_EVERY, JobSpec, Repeat


def zone(name: str, field: str) -> tzinfo:
    """The IANA time zone `name` (empty: UTC); INVALID_ARGUMENT on `field` when there is none of that name."""
    found = time_zone(name)
    if found is None:
        raise InvalidArgument.field(field, zone_problem(name) or "not a time zone")
    return found


def check_repeat(repeat: Repeat, now: datetime, prefix: str = "repeat") -> None:
    """INVALID_ARGUMENT naming the field when `repeat` cannot run: no rhythm, a bad cron or zone, an end past."""
    if repeat.cron:
        problem = cron_problem(repeat.cron)
        if problem is not None:
            raise InvalidArgument.field(f"{prefix}.cron", problem)
    elif repeat.every is None:
        raise InvalidArgument.field(f"{prefix}.cron", "give a cron expression or an `every` interval")
    elif not MIN_EVERY <= repeat.every <= MAX_SPAN:
        raise InvalidArgument.field(
            f"{prefix}.every", f"must be at least {MIN_EVERY.total_seconds():g} second and at most 100 years"
        )
    zone(repeat.timezone, f"{prefix}.timezone")
    if repeat.limit < 0:
        raise InvalidArgument.field(f"{prefix}.limit", "must not be negative")
    if repeat.end_at is not None and repeat.end_at <= now:
        raise InvalidArgument.field(f"{prefix}.end_at", "is in the past")


def _span(value: timedelta, field: str, *, zero: bool = False) -> None:
    low = "at least 0" if zero else "longer than 0"
    if value < timedelta(0) or (not zero and value == timedelta(0)) or value > MAX_SPAN:
        raise InvalidArgument.field(field, f"must be {low} and at most 100 years")


def check_spans(spec: JobSpec, start_at: datetime | None, delay: timedelta | None, now: datetime) -> None:
    """INVALID_ARGUMENT naming the field when a span of a job is out of bounds (`MAX_SPAN`, `MAX_RETRIES`): a start
    more than 100 years from now, a negative delay, a retry policy or catch-up window that is not positive."""
    if start_at is not None and delay is not None:
        raise InvalidArgument.field("delay", "give start_at or delay, not both")
    if start_at is not None and abs(start_at - now) > MAX_SPAN:
        raise InvalidArgument.field("start_at", "must be within 100 years of now")
    if delay is not None:
        _span(delay, "delay", zero=True)
    retry = spec.retry
    if not 0 <= retry.max_retries <= MAX_RETRIES:
        raise InvalidArgument.field("retry.max_retries", f"must be between 0 and {MAX_RETRIES}")
    _span(retry.initial_delay, "retry.initial_delay")
    _span(retry.max_delay, "retry.max_delay")
    _span(spec.catch_up, "catch_up_window")


def _cron_after(expression: str, after: datetime, where: tzinfo) -> datetime:
    """The first moment strictly after `after` that `expression` matches, read in the zone `where`."""
    local = after.astimezone(where)
    fields = expression.split()
    if len(fields) == 6 and where is not UTC and not fields[1].startswith("*") and not fields[2].startswith("*"):
        # cronsim's DST rule covers 5-field expressions only: iterate the wall clock, then place it (see above).
        wall = next(CronSim(expression, local.replace(tzinfo=None)))
        placed = wall.replace(tzinfo=where, fold=0)
        while placed.astimezone(UTC).astimezone(where).replace(tzinfo=None) != wall:  # in a skipped hour
            wall += timedelta(minutes=1)
            placed = wall.replace(tzinfo=where, fold=0)
        moment = placed.astimezone(UTC)
    else:
        moment = next(CronSim(expression, local)).astimezone(UTC)
    return moment if moment > after else _cron_after(expression, after + timedelta(seconds=1), where)


def first_due(repeat: Repeat | None, start: datetime) -> datetime | None:
    """The first occurrence at or after `start` (a one-off job's is `start`); None when the repeat ends before."""
    if repeat is None:
        return start
    if repeat.every is not None:
        due = start
    else:
        due = _cron_after(repeat.cron, start - timedelta(microseconds=1), zone(repeat.timezone, "repeat.timezone"))
    return due if repeat.end_at is None or due <= repeat.end_at else None


def due_after(repeat: Repeat, previous: datetime, earliest: datetime, started: int) -> datetime | None:
    """The occurrence after `previous` and not before `earliest` (the ones between are skipped: the caller passes
    now minus the catch-up window). None when the repeat's limit (`started` occurrences so far) or end is reached."""
    if repeat.limit and started >= repeat.limit:
        return None
    if repeat.every is not None:
        step = repeat.every
        due = previous + step
        if due < earliest:  # jump over the missed ones at once, however many
            due += step * ((earliest - due) // step)
            due = due if due >= earliest else due + step
    else:
        due = _cron_after(repeat.cron, max(previous, earliest - timedelta(microseconds=1)), zone(repeat.timezone, "tz"))
    return due if repeat.end_at is None or due <= repeat.end_at else None
