"""Started by torchrun in tests/distributed/test_rank_waits.py, once per rank: rank 0 works
alone for SECONDS (as while it downloads the prepared set), then every rank meets the others
in WAY ("barrier": ``Distributed.barrier``; "collective": a training collective) and sums
its rank over the group.

usage: torchrun wait_worker.py WAY SECONDS
"""

import sys
import time

import torch

from thaw.training import distributed


def main(way: str, seconds: str) -> None:
    ranks = distributed.join_from_environment()
    if ranks.is_main:
        time.sleep(float(seconds))
    if way == "barrier":
        ranks.barrier()
    total = int(ranks.sum(torch.tensor(ranks.rank)))
    print(f"rank {ranks.rank} sum {total}", flush=True)
    distributed.leave()


if __name__ == "__main__":
    main(*sys.argv[1:])
