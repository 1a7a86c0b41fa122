"""The fidelity runner's retries are Argo's, as a KFP backend configures them.

KFP's Argo compiler (``backend/src/v2/compiler/argocompiler/container.go`` at 2.14.0, 2.15.0,
2.16.0, 2.17.0: ``getTaskRetryParametersWithValues``, ``getTaskRetryStrategyFromInput``)
writes the retry policy's durations as whole seconds, the factor with Go's ``%v`` and no
``retryPolicy`` (so Argo's OnFailure). Argo's ``processNodeRetries``
(``workflow/controller/operator.go`` at v3.6.7, v3.7.3, v3.7.8, v4.0.5) counts
``backoff.maxDuration`` from the first attempt's start (kubeflow/pipelines#13452, #14245).
"""

import pytest

from thawctl.argo_retry import ArgoRetry, ArgoRetryError, Retry

HOUR = 3600
# What the SDK compiles for set_retry(num_retries=2, backoff_duration="60s") (thaw's train).
TRAIN = {"maxRetryCount": 2, "backoffDuration": "60s", "backoffFactor": 2.0,
         "backoffMaxDuration": "3600s"}


def test_the_policy_becomes_argos_strings():
    assert ArgoRetry.from_policy(TRAIN) == ArgoRetry(limit="2", duration="60", factor="2",
                                                     max_duration="3600")
    assert ArgoRetry.from_policy({"backoffFactor": 1.5}).factor == "1.5"
    assert ArgoRetry.from_policy({}) is None


def test_a_step_that_fails_after_the_window_is_not_retried():
    retry = ArgoRetry.from_policy(TRAIN)
    failed_at = HOUR + 60  # a training step that ran for an hour and a minute
    assert retry.after_failure(1, 0.0, failed_at, failed_at) == Retry(
        stop="Max duration limit exceeded")


def test_waits_grow_by_the_factor_and_must_end_inside_the_window():
    retry = ArgoRetry.from_policy(TRAIN)
    assert retry.after_failure(1, 0.0, 100.0, 100.0) == Retry(wait_s=60.0)
    assert retry.after_failure(2, 0.0, 200.0, 230.0) == Retry(wait_s=90.0)  # 120 s after 200
    assert retry.after_failure(2, 0.0, HOUR - 100, HOUR - 100) == Retry(
        stop="Backoff would exceed max duration limit")
    assert retry.after_failure(3, 0.0, 500.0, 500.0) == Retry(stop="No more retries left")


def test_every_retry_ends_at_the_window_counted_from_the_first_start():
    assert ArgoRetry.from_policy(TRAIN).window_end(1000.0) == 1000.0 + HOUR


def test_a_policy_without_max_duration_gets_the_template_default_and_no_retry():
    retry = ArgoRetry.from_policy({"maxRetryCount": 3, "backoffDuration": "0s"})
    assert retry.after_failure(1, 0.0, 1.0, 1.0) == Retry(stop="Max duration limit exceeded")


def test_a_fractional_factor_fails_the_retry_as_argo_does():
    retry = ArgoRetry.from_policy({**TRAIN, "backoffFactor": 1.5})
    with pytest.raises(ArgoRetryError, match="value '1.5' cannot be resolved to an int"):
        retry.after_failure(1, 0.0, 10.0, 10.0)
