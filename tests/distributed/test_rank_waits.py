"""One process working alone (the node's first process downloading the prepared set) for
longer than a training collective may wait: the others wait for it in
``Distributed.barrier`` (a gloo ``monitored_barrier`` with ``THAW_RANK_WAIT_TIMEOUT_S``),
whereas in a training collective they fail after ``THAW_COLLECTIVE_TIMEOUT_S``, the
``timeout`` thaw gives ``init_process_group`` (torch 2.15.0,
``torch/distributed/distributed_c10d.py``; NCCL's watchdog enforces the same timeout,
``ProcessGroupNCCL.hpp``). Three gloo processes under torchrun, shortened timeouts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.distributed.launch import finish, free_port, pod_environment, torchrun

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("wait_worker.py")
PROCESSES = 3
COLLECTIVE_TIMEOUT_S = 3
ALONE_S = 4 * COLLECTIVE_TIMEOUT_S


def _start(way: str):
    env = {**pod_environment(1, PROCESSES, 0, free_port()),
           "THAW_COLLECTIVE_TIMEOUT_S": str(COLLECTIVE_TIMEOUT_S)}
    return torchrun([str(WORKER), way, str(ALONE_S)], env)


@pytest.mark.nightly  # three processes waiting out timeouts
def test_the_others_wait_out_a_slow_download_in_the_barrier():
    output = finish(_start("barrier"))
    # The processes share one pipe, and print writes a line and its newline separately, so
    # lines of different ranks can run together: find the reports, not whole lines.
    assert sorted(re.findall(r"rank \d+ sum \d+", output)) == [
        f"rank {rank} sum {sum(range(PROCESSES))}" for rank in range(PROCESSES)]


@pytest.mark.nightly
def test_a_training_collective_gives_up_after_the_collective_timeout():
    """The same wait in a training collective fails, after the configured timeout, not
    torch's default (30 minutes for gloo, 10 for NCCL): the barrier above is what held."""
    process = _start("collective")
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert f"{COLLECTIVE_TIMEOUT_S * 1000}ms" in output, output[-3000:]


def test_a_timeout_that_is_not_a_positive_number_is_refused(monkeypatch):
    from thaw.errors import ThawError
    from thaw.training.distributed import COLLECTIVE_TIMEOUT_ENV, collective_timeout

    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, "ten minutes")
    with pytest.raises(ThawError, match="THAW_COLLECTIVE_TIMEOUT_S='ten minutes'"):
        collective_timeout()
    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, "600")
    assert collective_timeout().total_seconds() == 600
