"""Starting processes the way a pod of Kubeflow Trainer's torch runtime starts them: torchrun,
its flags from the PET_* variables, one process per rank, gloo on CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pod_environment(nodes: int, per_node: int, node_rank: int, port: int) -> dict[str, str]:
    """The variables Kubeflow Trainer's torch runtime sets; torchrun reads them as flags."""
    return {**os.environ, "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(per_node),
            "PET_NODE_RANK": str(node_rank), "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def torchrun(args: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    """The output of ``process`` once it has succeeded (the test fails otherwise)."""
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output
