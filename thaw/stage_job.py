"""One training stage as a program of its own: what ``torchrun`` starts once per GPU, in the
step's pod (``gpus_per_node`` > 1) or on every node of a Kubeflow Trainer TrainJob
(``num_nodes`` > 1)::

    torchrun -m thaw.stage_job --stage partial --prepared s3://.../prepared \\
        --out s3://.../partial --init s3://.../probe --settings '{"epochs": 6}' ...

torchrun takes its flags from ``PET_*`` variables (``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``), which the Trainer's torch
runtime sets, so the same command serves one pod and many nodes. Its arguments are built
by ``thaw.torchrun.stage_arguments``; it imports the steps, never the other way round.

``--prepared`` and ``--init`` may be folders or ``s3://`` prefixes; an ``s3://`` one is
fetched once per node (by its first process) into ``$TMPDIR``. ``--out`` may be an
``s3://`` prefix: rank 0 uploads the stage's output folder there once the stage has
succeeded, so a failed stage leaves nothing there. Exit status 0 on success, 1 with the
reason on the log otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from thaw import storage
from thaw.errors import ThawError

if TYPE_CHECKING:  # importing it at run time would load torch for `--help`
    from thaw.training.distributed import Distributed

log = logging.getLogger("thaw.stage_job")


def main(argv: list[str] | None = None) -> int:
    from thaw.steps import train_step
    from thaw.training import distributed

    args = _parser().parse_args(argv)
    ranks = distributed.join_from_environment()
    logging.basicConfig(level=logging.INFO if ranks.is_main else logging.WARNING,
                        format=f"[rank {ranks.rank}] %(levelname)s %(name)s: %(message)s")
    try:
        node_dir = _node_dir(args)
        prepared = _on_this_node(args.prepared, node_dir / "prepared", ranks)
        init = _on_this_node(args.init, node_dir / "init", ranks) if args.init else None
        remote_out = storage.is_s3_uri(args.out)
        out = node_dir / "out" if remote_out else Path(args.out)
        train_step(prepared, out, stage=args.stage, settings=json.loads(args.settings),
                   arch=args.arch, weights=args.weights, init_dir=init,
                   experiment=args.experiment, pipeline_run_id=args.pipeline_run_id)
        if remote_out and ranks.is_main:
            storage.upload_dir(out, args.out)
            log.info("stage %s uploaded to %s", args.stage, args.out)
        ranks.barrier()
    except ThawError as err:
        log.error("stage %s failed: %s", args.stage, err)
        return 1
    finally:
        distributed.leave()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thaw.stage_job", description=__doc__.split("\n")[0])
    for name in ("stage", "prepared", "out", "arch", "weights", "experiment",
                 "pipeline-run-id"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--settings", default="{}", help="stage settings as a JSON object")
    parser.add_argument("--init", default=None, help="previous stage's output (warm start)")
    return parser


def _node_dir(args: argparse.Namespace) -> Path:
    """A folder every process of this node finds under the same name (they are separate
    processes: a ``TemporaryDirectory`` each would not be shared)."""
    key = hashlib.sha256(f"{args.pipeline_run_id}/{args.stage}/{args.out}".encode())
    return Path(tempfile.gettempdir()) / f"thaw-stage-{key.hexdigest()[:16]}"


def _on_this_node(uri: str, local: Path, ranks: Distributed) -> Path:
    """``uri`` itself when it is a folder; else its local copy, fetched by the node's first
    process while the others wait."""
    if not storage.is_s3_uri(uri):
        return Path(uri)
    if ranks.is_local_main and not local.exists():
        part = local.with_name(f"{local.name}.part-{os.getpid()}")
        storage.download_prefix(uri, part)
        try:
            part.rename(local)
        except OSError:  # a disk shared with another node, which got there first
            if not local.is_dir():
                raise
            shutil.rmtree(part)
    ranks.barrier()
    return local


if __name__ == "__main__":
    sys.exit(main())
