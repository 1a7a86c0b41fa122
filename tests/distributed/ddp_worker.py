"""Started by torchrun in tests/distributed/test_ddp.py, once per rank: trains two stages with
the library's DDP path and saves what the test compares (this file's own writes, per rank).

usage: torchrun ddp_worker.py PREPARED OUT DUMP SETTINGS_JSON
"""

import sys
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from worker_setup import epoch_shares, start_worker

from thaw.config import stage_config
from thaw.training import distributed, train_stage


def main(prepared: str, out: str, dump: str, settings: str) -> None:
    """partial, then full on the same model (what run_stage does through checkpoints)."""
    ranks, data, settings, model = start_worker(prepared, settings)
    # Dropout draws masks for each process's share of a batch: with it, no two ways of
    # splitting a batch compute the same update. Off, so that what differs is DDP alone.
    model.drop_rate = 0.0
    record = {"rank": ranks.rank, "world_size": ranks.world_size}
    for stage in ("partial", "full"):
        cfg = stage_config(stage, **settings)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        result = train_stage(model, data, cfg, Path(out) / stage)
        record[stage] = {
            "state": {k: v.clone() for k, v in model.state_dict().items()}, "start": start,
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            "frozen_bn": _frozen_batchnorm(model), "history": result.history}
    record["seen"] = [[i for batch in batches for i in batch]
                      for batches in epoch_shares(data, settings, ranks)]
    torch.save(record, Path(dump) / f"rank{ranks.rank}.pt")
    distributed.leave()


def _frozen_batchnorm(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in module.state_dict().items()}
            for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and not any(
                p.requires_grad for p in module.parameters(recurse=False))}

if __name__ == "__main__":
    main(*sys.argv[1:])
