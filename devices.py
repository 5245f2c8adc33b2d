"""Devices and processes, shared by the scripts: pick CUDA / MPS / CPU, and join torchrun's process group."""
import atexit
import os
import sys
import threading
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

    # Collectives. Host-side ones go over the gloo control group: no GPU sync, and any rank may call them at a time
    # when the GPU still has queued work. With one process each is the identity.

    def gather(self, obj) -> list:
        """[rank 0's obj, rank 1's, ...] on every rank (picklable host objects)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.control)

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (one int all-reduce: cheap enough for every step)."""
        if self.world_size == 1:
            return bool(flag)
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a device tensor (over the default group: NCCL on GPUs, no host round trip)."""
        if self.world_size == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # (gloo has no AVG)
        return value / self.world_size


def launched_by_torchrun() -> bool:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE (global rank across nodes, local rank on this node)."""
    return "RANK" in os.environ


def init_distributed(device_flag: str) -> tuple[Dist, torch.device]:
    """This process's place in torchrun's process group (joined here), or a single process."""
    if not launched_by_torchrun():
        return Dist(), pick_device(device_flag)
    d = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    device = pick_device(device_flag, d.local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=attempt_store(d),
                            rank=d.rank, world_size=d.world_size, device_id=device if device.type == "cuda" else None)
    d.control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return d, device


def exit_with(main) -> None:
    """`sys.exit(main())` for a script torchrun may start. A torchrun worker (RANK set) ends with os._exit once its
    threads, atexit handlers and output are done, skipping Python's finalization: a gloo worker thread can still be
    releasing the tensors of the last collective then (the process group outlives destroy_process_group while a
    DeviceMesh or DDP holds it), and a thread taking the GIL during finalization aborts the process ("terminate
    called without an active exception", exit -6) after a run that succeeded."""
    try:
        status = main()
    except SystemExit as e:
        status = e.code
    if not launched_by_torchrun():
        sys.exit(status)
    if status is not None and not isinstance(status, int):
        print(status, file=sys.stderr)  # as sys.exit shows a message
        status = 1
    threading._shutdown()  # what Python's own exit does first: threading's exit hooks (a ThreadPoolExecutor's, which
    # end its idle workers: inductor keeps one), then every non-daemon thread joined
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)


def attempt_store(d: Dist):
    """The rendezvous store torchrun announces (MASTER_ADDR/PORT), under a prefix of its own for each restart
    (TORCHELASTIC_RESTART_COUNT). The agent's store outlives a worker-group restart, so without the prefix a restarted
    rank can read the dead group's addresses and fail to connect."""
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), d.world_size,
                          is_master=not hosted_by_agent and d.rank == 0)
    return dist.PrefixStore(f"lf-llm/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def pick_device(flag: str | None, local_rank: int = 0) -> torch.device:
    """The device of --device (checked_device), made the current one when it is a GPU, so that calls without a
    device (CUDA RNG state, new streams) act on it rather than on GPU 0."""
    device = checked_device(flag, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def checked_device(flag: str | None, local_rank: int = 0) -> torch.device:
    """--device value (cuda, cuda:N, mps, cpu; empty = the best available) -> torch.device, or a UserError when this
    machine has no such device; plain cuda under torchrun means this process's GPU, cuda:LOCAL_RANK. Starts no CUDA
    context."""
    if flag and flag not in ("cuda", "mps", "cpu") and not flag.startswith("cuda:"):
        raise UserError(f"--device {flag!r}: use cuda, mps or cpu")
    kind = flag or ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    if kind.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {flag}: no CUDA device is available; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: no Apple MPS device is available (macOS on Apple silicon); use --device cpu")
    try:
        device = torch.device("cuda", local_rank) if kind == "cuda" else torch.device(kind)
    except RuntimeError:
        raise UserError(f"--device {flag!r}: use cuda, cuda:N (N a GPU number), mps or cpu") from None
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return device


def memory_bytes(device: torch.device) -> int:
    """The memory of `device`: a GPU's own, else the machine's (the CPU's, and Apple silicon's shared memory)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def enable_tf32(device: torch.device) -> None:
    """TF32 tensor cores for the float32 matmuls and convolutions left outside bf16 autocast (CUDA only)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ----------------------------------------------------------------------------------------------------------------
# Device memory: what `--micro-batch auto` probes

AUTO_HEADROOM = 0.05  # share of GPU memory `--micro-batch auto` leaves free (fragmentation, evaluation shapes)


def largest_fitting(candidates: list[int], fits) -> int:
    """The first (largest) candidate that fits, or 0 when none does."""
    return next((batch for batch in candidates if fits(batch)), 0)


def memory_probe(model, seq_len: int, device, autocast, stand_in_copies: int, headroom_bytes: int):
    """fits(b): whether training on micro-batches of b sequences fits in device memory. Two forward + backward
    passes run (the second with the first's gradients held, as in accumulation) next to stand-ins for what training
    adds: `stand_in_copies` of the parameters (AdamW's two moments; DDP's gradient buckets) and `headroom_bytes` kept
    free against fragmentation. The weights and the optimizer stay untouched. Eager mode: compiled steps need less."""
    def fits(batch: int) -> bool:
        reserve = []
        try:
            reserve = [torch.empty_like(p) for p in model.parameters() for _ in range(stand_in_copies)]
            reserve.append(torch.empty(headroom_bytes, dtype=torch.uint8, device=device))
            x = torch.zeros((batch, seq_len), dtype=torch.long, device=device)
            for _ in range(2):
                with autocast():
                    loss = model(x, x)[1]
                loss.backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del reserve
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return fits


def cuda_memory_probe(model, seq_len: int, device, autocast, stand_in_copies: int):
    """memory_probe with AUTO_HEADROOM of this GPU's memory kept free."""
    headroom = int(AUTO_HEADROOM * torch.cuda.get_device_properties(device).total_memory)
    return memory_probe(model, seq_len, device, autocast, stand_in_copies, headroom)


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
