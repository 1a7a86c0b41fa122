"""A training step on several nodes, end to end except for Kubernetes itself: the launcher
(`thaw.cluster.launcher.train_on_trainjob`) posts its TrainJob to the Kubernetes API stand-in, which
runs the posted container command as the nodes would (one torchrun per node, its rendezvous
from the PET_* variables the torch runtime sets) and reports the job Complete or Failed as
they exit. The nodes read the prepared data from S3 and write through the embedded stack;
the launcher must hand their model on from S3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from k8s_standin import JOBSET_COMPLETED, JOBSET_FAILED, Frame, K8sStandin, write_kubeconfig
from test_trainjob import kubeconfig_at  # noqa: F401 - a fixture

from tests.distributed.test_ddp import free_port, pod_environment
from thaw import storage
from thaw.cluster.launcher import train_on_trainjob
from thaw.errors import ThawError

pytestmark = pytest.mark.slow
JOB = {"image": "registry.example.com/thaw:1.2", "num_nodes": 2.0, "gpus_per_node": 0.0,
       "cpu": "1", "memory": "4G", "env": [], "start_timeout_s": 120, "timeout_s": 600,
       "poll_s": 0.2}


class NodesStandin(K8sStandin):
    """The stand-in whose TrainJobs really run: each node is a local process."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.nodes: dict[str, list[subprocess.Popen]] = {}
        self.node_env: dict[str, str] = {}
        self.logs: Path | None = None  # node-0's output goes there, and is its pod log

    def _create(self, request, body):
        answer = super()._create(request, body)
        trainer = body["spec"]["trainer"]
        command = trainer["command"]
        assert command[:3] == ["torchrun", "-m", "thaw.stage_job"]
        port = free_port()
        self.nodes[body["metadata"]["name"]] = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *command[1:]],
            env={**pod_environment(trainer["numNodes"], trainer["numProcPerNode"], rank, port),
                 **self.node_env, "TMPDIR": str(self._disk(rank))},
            stdout=(self.logs / f"node-{rank}.log").open("w"), stderr=subprocess.STDOUT)
            for rank in range(trainer["numNodes"])]
        return answer

    def _disk(self, rank: int) -> Path:
        """Each node's own scratch disk."""
        disk = self.logs / f"node-{rank}-tmp"
        disk.mkdir(exist_ok=True)
        return disk

    def _log(self, request, body, pod):
        self.node0_log = (self.logs / "node-0.log").read_text()
        return super()._log(request, body, pod)

    def _frame(self, name, *, advance):
        nodes = self.nodes.get(name, [])
        if any(node.poll() is None for node in nodes):
            return Frame("Running")
        codes = [node.returncode for node in nodes]
        if codes and not any(codes):
            return Frame("Succeeded", JOBSET_COMPLETED)
        return Frame("Failed", JOBSET_FAILED)

    def stop(self) -> None:
        for node in (n for nodes in self.nodes.values() for n in nodes):
            node.kill()
        super().stop()


@pytest.fixture
def cluster(stack, tmp_path, kubeconfig_at, monkeypatch):  # noqa: F811
    standin = NodesStandin().start()
    write_kubeconfig(tmp_path / "kubeconfig", standin)
    kubeconfig_at(tmp_path / "kubeconfig")
    monkeypatch.setenv("THAW_CHECKPOINT_URI", f"s3://{stack.bucket}/checkpoints")
    standin.node_env = {"THAW_CHECKPOINT_URI": os.environ["THAW_CHECKPOINT_URI"]}
    standin.logs = tmp_path
    yield standin
    standin.stop()


def _launch(cluster, prepared_uri: str, out: Path, run_id: str) -> dict:
    return train_on_trainjob(
        prepared_uri=prepared_uri, init_uri=None, out_dir=out, job=JOB, stage="partial",
        settings={"epochs": 1, "batch_size": 16}, arch="efficientnet_lite0",
        weights="packaged", experiment="thaw-trainjob-test", pipeline_run_id=run_id)


def test_the_stage_trains_on_two_nodes_and_its_model_is_handed_on(cluster, stack,
                                                                   prepared_sample, tmp_path):
    prepared_uri = f"minio://{stack.bucket}/pipeline-root/prepared"  # as KFP names it
    storage.upload_dir(prepared_sample.root, "s3://" + prepared_uri.removeprefix("minio://"))

    summary = _launch(cluster, prepared_uri, tmp_path / "model", "trainjob-ok")

    assert summary["stage"] == "partial" and summary["best_epoch"] >= 0
    assert {"best.pt", "last.pt", "result.json", "stage_run.json"} <= {
        p.name for p in (tmp_path / "model").iterdir()}
    assert cluster.deleted == list(cluster.nodes)  # the job was deleted after it completed
    posted = cluster.posted["spec"]["trainer"]["command"]
    assert posted[posted.index("--stage") + 1] == "partial"
    assert posted[posted.index("--prepared") + 1] == "s3://" + prepared_uri.removeprefix(
        "minio://")
    assert "stage partial uploaded to s3://" in (tmp_path / "node-0.log").read_text()


def test_a_failed_stage_fails_the_step_and_hands_on_nothing(cluster, tmp_path):
    out = tmp_path / "model"
    with pytest.raises(ThawError, match="failed"):
        _launch(cluster, str(tmp_path / "no-such-prepared"), out, "trainjob-bad")
    assert not out.exists() or not any(out.iterdir())
    assert cluster.deleted == list(cluster.nodes)
