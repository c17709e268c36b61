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

from search.core.choices import DEVICE_PATTERN, check_device_form
from search.core.errors import OptionError


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
    """``auto`` → cuda if available else cpu; a bad name or an absent GPU is an error naming the fix.

    Accepts ``auto``, ``cpu``, ``cuda`` and ``cuda:N``. Anything else would reach torch as a raw
    error (``cuda:abc``), or only fail at the first tensor moved there (``cuda:7`` on a 1-GPU machine).

    Raises:
        OptionError: the name is malformed, there is no GPU for ``cuda``, or N is not a GPU index here.
    """
    check_device_form(name)
    match = DEVICE_PATTERN.fullmatch(name)
    assert match is not None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("--device cuda asked for, but torch sees no GPU; use --device auto or cpu")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise OptionError(f"--device {name}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}; pick one of those or --device auto")
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
