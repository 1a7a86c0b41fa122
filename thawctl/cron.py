"""KFP's cron format, checked before anything reaches the cluster.

KFP's scheduler reads ``cron_expression`` with robfig/cron's ``Parse``: six fields, seconds
first (``sec min hour day-of-month month day-of-week``, UTC). It also takes five, still
seconds first, so a Unix cron like ``0 3 * * *`` silently means "minute 3 of every hour":
five fields are refused here with the six-field form to use instead.
"""

from __future__ import annotations

import re

from thaw.errors import ThawError

FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23),
          ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 6))
_NAMES = {4: ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV",
              "DEC"],
          5: ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]}
DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_EVERY = re.compile(r"@every (\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")
_ITEM = re.compile(r"(?P<range>\*|\?|[A-Za-z0-9]+(-[A-Za-z0-9]+)?)(/(?P<step>\d+))?")
HELP = ('six fields, seconds first, UTC: "0 0 3 * * *" is every day at 03:00:00; '
        '"0 30 2 * * MON" every Monday at 02:30')


def check_cron(expression: str) -> str:
    """The expression, stripped, if KFP reads it as meant; else a ThawError saying why."""
    cron = " ".join(expression.split())
    if cron in DESCRIPTORS or _EVERY.fullmatch(cron):
        return cron
    fields = cron.split(" ") if cron else []
    if len(fields) == 5:
        raise ThawError(f"cron {expression!r} has 5 fields; KFP's cron has 6, seconds first "
                        f"(it would read this as second {fields[0]}, minute {fields[1]}, ...): "
                        f"for the Unix meaning use {'0 ' + cron!r}")
    if len(fields) != 6:
        count = f"{len(fields)} field{'' if len(fields) == 1 else 's'}"
        raise ThawError(f"cron {expression!r} has {count}; KFP's cron has {HELP}")
    for index, (field, (name, low, high)) in enumerate(zip(fields, FIELDS, strict=True)):
        for item in field.split(","):
            problem = _check_item(item, index, low, high)
            if problem:
                raise ThawError(f"cron {expression!r}: {name} field {field!r}: {problem} "
                                f"(allowed {low}-{high}; {HELP})")
    return cron


def _check_item(item: str, index: int, low: int, high: int) -> str | None:
    match = _ITEM.fullmatch(item)
    if not match:
        return f"cannot read {item!r}"
    if match["step"] is not None and int(match["step"]) == 0:
        return "a step of 0"
    part = match["range"]
    if part == "?":
        return None if index in (3, 5) else "'?' is only for day of month or day of week"
    if part == "*":
        return None
    bounds = []
    for value in part.split("-"):
        number = _number(value, index)
        if number is None:
            return f"{value!r} is not a number{' or name' if index in _NAMES else ''}"
        if not low <= number <= high:
            return f"{number} is out of range"
        bounds.append(number)
    if len(bounds) == 2 and bounds[0] > bounds[1]:
        return f"range {part} runs backwards"
    return None


def _number(value: str, index: int) -> int | None:
    if value.isdigit():
        return int(value)
    names = _NAMES.get(index, [])
    upper = value.upper()
    if upper in names:
        return names.index(upper) + (1 if index == 4 else 0)
    return None
