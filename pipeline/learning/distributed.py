"""Process-group set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

No addresses in code: torchrun's rendezvous flags (``--nnodes``, ``--rdzv-endpoint``...) fill the
environment, and ``init_process_group`` reads it. nccl on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: str | None = None) -> torch.device:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); return this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but torch sees no GPU")
        dev = torch.device("cuda", local_rank if world > 1 else (torch.device(wanted).index or 0))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev
                                if dev.type == "cuda" else None)
    return dev


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears the rendezvous store down while another still uses it
        dist.destroy_process_group()
