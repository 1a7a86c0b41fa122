"""Started by torchrun in tests/distributed/test_uneven_shares.py, once per rank: trains the
partial stage on a split whose last global batch is shorter than the number of processes,
with rank 0 reporting each epoch to an MLflow server that never answers, and saves what the
test compares (this file's own writes, per rank).

usage: torchrun uneven_worker.py PREPARED OUT DUMP SETTINGS_JSON
"""

import sys
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from worker_setup import epoch_shares, start_worker

from thaw.config import stage_config
from thaw.tracking import epoch_logger
from thaw.training import distributed, train_stage


class HostValues(TorchFunctionMode):
    """Records where a tensor is made from Python values (``torch.tensor``, ``as_tensor``,
    ``scalar_tensor``, ``Tensor.new_tensor``): on a GPU each is a copy from the host, which
    waits for the device. Each call is named by the first caller outside torch
    ("file.py:function")."""

    FROM_HOST = {"tensor", "as_tensor", "scalar_tensor", "new_tensor"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.FROM_HOST:
            data = args[1] if func.__name__ == "new_tensor" else (args or [None])[0]
            if not isinstance(data, torch.Tensor):
                frame = sys._getframe(1)
                while frame.f_back and "/torch/" in frame.f_code.co_filename:
                    frame = frame.f_back
                self.calls.append(f"{Path(frame.f_code.co_filename).name}:"
                                  f"{frame.f_code.co_name}")
        return func(*args, **kwargs)


def main(prepared: str, out: str, dump: str, settings: str) -> None:
    ranks, data, settings, model = start_worker(prepared, settings)
    cfg = stage_config("partial", **settings)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    watch = HostValues()
    with watch:
        result = train_stage(model, data, cfg, Path(out), on_epoch_end=epoch_logger("unheard"))
    shares = epoch_shares(data, settings, ranks)
    torch.save({"rank": ranks.rank, "world_size": ranks.world_size, "history": result.history,
                "start": start, "state": model.state_dict(), "shares": shares,
                "batchnorm_updated": sorted(
                    name for name, module in model.named_modules()
                    if isinstance(module, _BatchNorm)
                    and any(p.requires_grad for p in module.parameters(recurse=False))),
                "host_values": watch.calls},
               Path(dump) / f"rank{ranks.rank}.pt")
    distributed.leave()


if __name__ == "__main__":
    main(*sys.argv[1:])
