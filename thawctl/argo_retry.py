"""A task's retries as a Kubeflow Pipelines backend runs them: through Argo Workflows.

KFP's Argo compiler (``backend/src/v2/compiler/argocompiler/container.go`` at 2.14.0-2.17.0,
``getTaskRetryParametersWithValues`` and ``getTaskRetryStrategyFromInput``) turns the task's
``retryPolicy`` into a ``retryStrategy`` on the executor template only (the driver runs once):
``limit`` = maxRetryCount, ``backoff.duration`` and ``backoff.maxDuration`` = the durations'
whole seconds, ``backoff.factor`` = the factor written with Go's ``%v``; a field the policy
lacks falls back to the template default ``"0"``. It sets no ``retryPolicy``, so Argo applies
``OnFailure``: a Failed pod (non-zero exit) is retried, an Error (pod deleted, node lost) is not.

Argo decides each retry in ``processNodeRetries`` (``workflow/controller/operator.go`` at
v3.6.7, v3.7.3, v3.7.8, v4.0.5, the versions KFP 2.14.0-2.17.0 pin), and that is what
:meth:`ArgoRetry.after_failure` replays:

- ``maxDuration`` is a window counted from the FIRST attempt's start, not a cap on one delay:
  once it has passed, nothing is retried ("Max duration limit exceeded");
- the wait before retry ``n`` (1-based) is ``duration * factor**(n-1)``, the factor parsed as
  an integer (a factor of 1.5 fails the task: "value '1.5' cannot be resolved to an int");
- a wait that would end after the window fails the task ("Backoff would exceed max duration
  limit");
- beyond ``limit`` retries: "No more retries left";
- every retry runs with the window's end as its deadline: Argo's executor kills it there
  ("Step exceeded its deadline", ``workflow/executor/executor.go`` ``monitorDeadline``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEADLINE_MESSAGE = "Step exceeded its deadline"


class ArgoRetryError(Exception):
    """Argo could not process the retry strategy: the node ends in Error with this message."""


@dataclass(frozen=True)
class Retry:
    """Argo's answer after a failed attempt: wait ``wait_s``, or stop (``stop``: why)."""

    wait_s: float = 0.0
    stop: str = ""


@dataclass(frozen=True)
class ArgoRetry:
    """The ``retryStrategy`` KFP compiles for a task (string fields, as in the workflow)."""

    limit: str
    duration: str
    factor: str
    max_duration: str

    @classmethod
    def from_policy(cls, policy: dict[str, Any]) -> ArgoRetry | None:
        """The strategy for a pipeline-spec ``retryPolicy`` (None: the task has none)."""
        if not policy:
            return None
        return cls(limit=_go_value(policy.get("maxRetryCount", 0)),
                   duration=_whole_seconds(policy.get("backoffDuration")),
                   factor=_go_value(policy.get("backoffFactor", 0)),
                   max_duration=_whole_seconds(policy.get("backoffMaxDuration")))

    def window_end(self, first_started: float) -> float:
        """When the retry window closes (the deadline of every retry)."""
        return first_started + _parse_duration(self.max_duration)

    def after_failure(self, attempts: int, first_started: float, last_finished: float,
                      now: float) -> Retry:
        """Whether, and after how long, a task that failed ``attempts`` times is retried."""
        window_end = self.window_end(first_started)
        if now > window_end:
            return Retry(stop="Max duration limit exceeded")
        wait = _parse_duration(self.duration)
        factor = _argo_int(self.factor)
        if factor > 0:
            wait *= factor ** (attempts - 1)
        if last_finished + wait > window_end:
            return Retry(stop="Backoff would exceed max duration limit")
        if attempts > _argo_int(self.limit):
            return Retry(stop="No more retries left")
        return Retry(wait_s=max(0.0, last_finished + wait - now))


def _go_value(value: Any) -> str:
    """``fmt.Sprintf("%v", v)`` of a number as Argo's ``AnyStringPtr`` writes it."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _whole_seconds(duration: Any) -> str:
    """``Duration.Seconds`` of a pipeline-spec duration such as ``"30s"``; ``"0"`` if absent
    (the executor template's parameter default)."""
    if duration is None:
        return "0"
    return str(int(float(str(duration).rstrip("s") or 0)))


def _argo_int(text: str) -> int:
    """Argo's ``intstr.Int`` on a string value (``util/intstr/parametrizable.go``)."""
    try:
        return int(text)
    except ValueError:
        raise ArgoRetryError(f"value '{text}' cannot be resolved to an int") from None


def _parse_duration(text: str) -> float:
    """Argo's ``ParseStringToDuration`` for the whole seconds KFP writes."""
    try:
        return float(int(text))
    except ValueError:
        raise ArgoRetryError(f"unable to parse {text} as a duration") from None
