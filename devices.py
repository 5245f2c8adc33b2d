"""Devices and processes, shared by the scripts: pick CUDA / MPS / CPU, and join torchrun's process group."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cli import UserError


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    control: object = None  # a gloo group for host-side agreement (stop flag, RNG gathering): no GPU syncs

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_flag: str) -> tuple[Dist, torch.device]:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE (global rank across nodes, local rank on this node)."""
    if "RANK" not in os.environ:
        return Dist(), pick_device(device_flag)
    d = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    device = pick_device(device_flag, d.local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=attempt_store(d),
                            rank=d.rank, world_size=d.world_size, device_id=device if device.type == "cuda" else None)
    d.control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return d, device


def attempt_store(d: Dist):
    """The rendezvous store torchrun announces (MASTER_ADDR/PORT), under a prefix of its own for each restart
    (TORCHELASTIC_RESTART_COUNT). The agent's store outlives a worker-group restart, so without the prefix a restarted
    rank can read the dead group's addresses and fail to connect."""
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), d.world_size,
                          is_master=not hosted_by_agent and d.rank == 0)
    return dist.PrefixStore(f"lf-llm/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def pick_device(flag: str | None, local_rank: int = 0) -> torch.device:
    """--device value (cuda, cuda:N, mps, cpu; empty = the best available) -> torch.device; plain cuda under
    torchrun means this process's GPU, cuda:LOCAL_RANK. A CUDA device becomes the current one, so that calls without
    a device (CUDA RNG state, new streams) act on it rather than on GPU 0."""
    if flag and flag not in ("cuda", "mps", "cpu") and not flag.startswith("cuda:"):
        raise UserError(f"--device {flag!r}: use cuda, mps or cpu")
    kind = flag or ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    if kind.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    try:
        device = torch.device("cuda", local_rank) if kind == "cuda" else torch.device(kind)
    except RuntimeError:
        raise UserError(f"--device {flag!r}: use cuda, cuda:N (N a GPU number), mps or cpu") from None
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
        torch.cuda.set_device(device)
    return device


def enable_tf32(device: torch.device) -> None:
    """TF32 tensor cores for the float32 matmuls and convolutions left outside bf16 autocast (CUDA only)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ----------------------------------------------------------------------------------------------------------------
# Model FLOPs utilization

PEAK_BF16_FLOPS = {  # dense bf16 tensor-core peaks from the vendors' data sheets
    "A100": 312e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
}


def peak_flops(device_name: str) -> float | None:
    """The bf16 peak for a CUDA device name ('NVIDIA H100 80GB HBM3' -> H100 SXM), or None when unknown."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # 'H100 PCIe' before 'H100'
        if all(part in device_name for part in key.split()):
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(flops_per_token: int, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved training FLOP/s over the device's peak (None without a peak)."""
    return flops_per_token * tokens_per_s / peak if peak else None
