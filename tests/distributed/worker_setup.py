"""What every torchrun worker of tests/distributed does first and last (imported by the
worker scripts as a module beside them: torchrun puts the script's folder on sys.path)."""

from __future__ import annotations

import json

import torch
from torch import nn

from thaw.backbones import create_backbone
from thaw.data.prepared import ImageSplit, PreparedDataset, open_prepared
from thaw.training import distributed
from thaw.training.distributed import Distributed
from thaw.training.feeds import GlobalBatches


def start_worker(prepared: str, settings_json: str
                 ) -> tuple[Distributed, PreparedDataset, dict, nn.Module]:
    """Join the process group, open the prepared data and build the seeded model."""
    ranks = distributed.join_from_environment()
    data = open_prepared(prepared)
    settings = json.loads(settings_json)
    torch.manual_seed(settings["seed"])
    model = create_backbone("efficientnet_lite0", len(data.manifest.classes), "packaged")
    return ranks, data, settings, model


def epoch_shares(data: PreparedDataset, settings: dict, ranks: Distributed
                 ) -> list[list[list[int]]]:
    """Per epoch, this rank's batches of training indices: the order the feed's sampler
    asked the split for."""
    train = ImageSplit(data, "train")
    batches = GlobalBatches(lambda epoch: train.epoch_order(settings["seed"], epoch),
                            len(train), settings["batch_size"], ranks)
    shares = []
    for epoch in range(settings["epochs"]):
        batches.epoch = epoch
        shares.append(list(batches))
    return shares
