"""Started by torchrun in tests/distributed/test_ddp.py, once per rank: trains two stages with
the library's DDP path and saves what the test compares (this file's own writes, per rank).

usage: torchrun ddp_worker.py PREPARED OUT DUMP SETTINGS_JSON
"""

import json
import sys
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from thaw.backbones import create_backbone
from thaw.config import stage_config
from thaw.data.prepared import ImageSplit, open_prepared
from thaw.training import distributed, train_stage
from thaw.training.feeds import GlobalBatches


def main(prepared: str, out: str, dump: str, settings: str) -> None:
    """partial, then full on the same model (what run_stage does through checkpoints)."""
    ranks = distributed.join_from_environment()
    data = open_prepared(prepared)
    settings = json.loads(settings)
    torch.manual_seed(settings["seed"])
    model = create_backbone("efficientnet_lite0", len(data.manifest.classes), "packaged")
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
    train = ImageSplit(data, "train")  # the order the feed's sampler asked it for
    batches = GlobalBatches(lambda epoch: train.epoch_order(settings["seed"], epoch),
                            len(train), settings["batch_size"], ranks)
    record["seen"] = []
    for epoch in range(settings["epochs"]):
        batches.epoch = epoch
        record["seen"].append([i for batch in batches for i in batch])
    torch.save(record, Path(dump) / f"rank{ranks.rank}.pt")
    distributed.leave()


def _frozen_batchnorm(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in module.state_dict().items()}
            for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and not any(
                p.requires_grad for p in module.parameters(recurse=False))}

if __name__ == "__main__":
    main(*sys.argv[1:])
