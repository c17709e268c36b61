"""Where training runs: device choice, mixed precision, and data parallelism under torchrun.

``--device auto`` picks CUDA when there is one (with bf16 autocast) and the CPU otherwise. Under
torchrun (WORLD_SIZE > 1) every rank joins one process group, NCCL on GPU and gloo on CPU; each
rank takes its share of every global batch, and DistributedDataParallel averages the gradients,
so a run on R ranks follows the same trajectory as one process on the whole batch.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """The device and the process group a training loop runs in."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA; nothing on the CPU, where fp32 keeps the search exact."""
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch (every rank gets the same count)."""
        if len(indices) % self.world_size:
            raise ValueError(f"global batch {len(indices)} does not split over {self.world_size} ranks")
        return indices[self.rank :: self.world_size]


@contextlib.contextmanager
def on_device(runtime: Runtime, *modules: torch.nn.Module) -> Iterator[None]:
    """Run a stage with ``modules`` on the runtime's device, and hand them back on the CPU.

    Every stage that computes on the device goes through this, so stages meet on the CPU: the next
    stage, the export and the parity check never see a module left on a GPU, whatever ran before.
    """
    for module in modules:
        module.to(runtime.device)
    try:
        yield
    finally:
        for module in modules:
            module.cpu()


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available else cpu; ``cuda`` without a GPU is an error naming the fix."""
    from search.errors import UserError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no GPU; use --device auto or cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got '{name}'")
    return torch.device(name)


@contextlib.contextmanager
def runtime(device: str = "auto") -> Iterator[Runtime]:
    """The runtime of this process: joins torchrun's process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        yield Runtime(dev)
        return
    rank = int(os.environ["RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield Runtime(dev, rank, world)
    finally:
        if owns_group:
            dist.destroy_process_group()
