"""The parallel layout of a training run, decided in one call (parallelize): one process, DDP, or FSDP2.

Under FSDP every process keeps only its 1/N slice (dim 0) of each parameter, of its gradient and of its AdamW
moments: fully_shard on each transformer block (one all-gather before its forward, one reduce-scatter of its
gradients after its backward) and on the root, which holds the tied embedding/head and the final norm. Its
checkpoints are sharded the same way (checkpoint.py writes and reads them, resharding on load). Evaluations run on a
whole plain copy of a sharded model (evaluated).

torch.distributed's fsdp, tensor and checkpoint modules are imported where used, by runs that shard (and by
clip_grad_norm only for its isinstance test): a one-process or DDP run never pays for their import.
"""
import contextlib
import dataclasses
import warnings

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import model_from_state
from cli import UserError

FSDP_TORCH = "2.6"  # the first torch with FSDP2 as torch.distributed.fsdp.fully_shard (public API)


def fsdp_available() -> bool:
    try:
        import torch.distributed.fsdp as fsdp
    except ImportError:  # a build without torch.distributed
        return False
    return hasattr(fsdp, "fully_shard")


def require_fsdp() -> None:
    if not fsdp_available():
        raise UserError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard), in torch {FSDP_TORCH} or newer; "
                        f"this is torch {torch.__version__}: upgrade torch, or train without --fsdp (DDP)")


def shard_model(model, mixed_precision: bool):
    """Shard a GPT in place over the default process group (every process calls this, before the optimizer is made:
    the optimizer must hold the sharded parameters). mixed_precision: blocks compute and all-gather in bf16 while
    the sharded fp32 parameters stay the optimizer's master weights and gradients are reduce-scattered in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision else None,
                                  reduce_dtype=torch.float32 if mixed_precision else None)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the rest: wte (embedding and tied head), norm_f
    # The root returns the logits as a view (the padded vocabulary rows sliced off); FSDP warns that an in-place op
    # on such a view would skip its backward hook. Nothing here writes into the logits.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    return model


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ that also takes FSDP's sharded gradients: their norm is a DTensor over all shards (the global
    norm, the one the clipping used); it is returned as a plain tensor, the same on every process."""
    from torch.distributed.tensor import DTensor
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def whole_model(model, device):
    """A plain copy of a sharded GPT, whole on this process, in eval mode; every process calls this (each parameter
    is all-gathered). Evaluations run on it: their work may differ between processes (HellaSwag's uneven split,
    samples on rank 0 only), which the collectives of a sharded model's every forward pass do not allow."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return model_from_state({"model_config": dataclasses.asdict(model.config), "model": weights}, "the FSDP model",
                            device)


def load_weights(model, weights: dict) -> None:
    """A full state_dict (a checkpoint's "model") into a sharded or a plain model: each process keeps its slice."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def local_bytes(tensors) -> int:
    """Bytes this process holds of `tensors` (of a sharded DTensor, only its local shard)."""
    from torch.distributed.tensor import DTensor
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def training_state_bytes(model, optimizer) -> tuple[int, int]:
    """(parameter bytes, optimizer state bytes) held by this process: under FSDP about 1/N of a DDP process's."""
    moments = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return local_bytes(model.parameters()), local_bytes(moments)


def parallelize(model, world_size: int, device, *, fsdp: bool, compile: bool, mixed_precision: bool):
    """The parallel layout of a run, decided here once; every process calls this before its optimizer is made.
    Returns (the model to call forward on, a context for micro-steps that only accumulate gradients).
    - FSDP (--fsdp): `model` itself is sharded in place (the optimizer must hold the shards); gradients are
      reduce-scattered on every micro-step, so they stay sharded (accumulating them unsharded would hold the whole
      model's fp32 gradients on every process).
    - DDP (several processes): gradients are all-reduced only on a step's last micro-step; earlier ones accumulate
      locally (DDP's no_sync). No buffer broadcast: the only buffers, the RoPE tables, are the same on every rank.
    - One process: the model itself.
    `compile` wraps the forward in torch.compile; checkpoints and evaluations use `model`, never the wrapper."""
    if fsdp:
        shard_model(model, mixed_precision)
    forward = torch.compile(model) if compile else model
    if world_size > 1 and not fsdp:
        forward = DDP(forward, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        return forward, forward.no_sync
    return forward, contextlib.nullcontext


def is_sharded(model) -> bool:
    if not fsdp_available():
        return False
    from torch.distributed.fsdp import FSDPModule  # (a torch build without FSDP2 has no such module)
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def evaluated(model, device):
    """The model evaluations run on: a sharded model's whole plain copy (whole_model) while the block runs, a plain
    model itself. Every process enters it (gathering the copy is a collective)."""
    yield whole_model(model, device) if is_sharded(model) else model
