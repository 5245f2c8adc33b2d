"""FSDP2 for `train.py --fsdp`, and the training state (weights + AdamW moments) that either kind of run saves and
loads.

Under FSDP every process keeps only its 1/N slice (dim 0) of each parameter, of its gradient and of its AdamW
moments: fully_shard on each transformer block (one all-gather before its forward, one reduce-scatter of its
gradients after its backward) and on the root, which holds the tied embedding/head and the final norm. Its
checkpoints are sharded the same way: RUN/checkpoints/step_NNNNNN/ holds torch.distributed.checkpoint (DCP) files of
{"model", "optimizer"}, keyed by parameter name, plus train_state.pt with the rest (checkpoint.py reads the folder).
DCP reshards on load, so one function, load_training_state, continues any checkpoint in any layout: a sharded one on
another process count, under DDP or on one process, and a DDP run's .pt file under FSDP.
"""
import dataclasses
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint import FORMAT, STATE_FILE, model_from_state, no_room_error, tensor_bytes
from cli import UserError, atomic_write, fsync_dir

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


# ----------------------------------------------------------------------------------------------------------------
# Saving a sharded checkpoint

def save_sharded_checkpoint(path, model, optimizer, extra: dict, group=None) -> None:
    """Write the checkpoint folder `path` (checkpoint.checkpoint_path(..., sharded=True)); every process calls this.
    Each writes its shards into a temporary sibling folder .step_NNNNNN.tmpPID (PID: rank 0's), rank 0 adds
    train_state.pt ({"format", **extra}), then renames the complete folder to `path`: a kill at any point leaves the
    earlier checkpoints as they were and at most the temporary folder (checkpoint.remove_orphaned_temp_files); a
    failure removes the temporary folder (a full disk: one line with the sizes, as for a .pt file).
    `group`: the process group for DCP's host-side coordination (gloo), None for the default one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    path = Path(path)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tmp = path.with_name(f".{path.name}.tmp{_rank0_value(os.getpid(), group)}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    error = None
    try:
        _dcp_call(dcp.save, state, tmp, group, path)
        if rank0:  # every shard and DCP's index are written (dcp.save returns after rank 0 wrote the index)
            with atomic_write(tmp / STATE_FILE) as f:
                torch.save({"format": FORMAT, **extra}, f)
            fsync_dir(tmp)
            tmp.rename(path)
            fsync_dir(path.parent)
    except BaseException as e:
        error = e
    failed = _rank0_value(f"{type(error).__name__}: {error}" if error and rank0 else None, group)
    if error is not None and rank0:  # every process is done with the folder (a collective failed on all)
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(error, OSError):
        raise no_room_error(error, path, tensor_bytes(state)) from error
    if error is not None:
        raise error
    if failed:  # rank 0 failed after the shards were written: every process stops with it
        raise UserError(f"checkpoint {path} was not written: rank 0 failed ({failed})")


def _rank0_value(value, group):
    """Rank 0's `value`, on every process (host objects over `group`)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _dcp_call(function, state: dict, folder: Path, group, what: Path) -> None:
    """dcp.save or dcp.load of `state` in `folder`. A file system fault on any process (DCP collects every
    process's errors into one CheckpointException, which is no Exception) becomes one line naming it."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        function(state, checkpoint_id=folder, process_group=group)
    except CheckpointException as e:
        failures = [failure[0] for failure in e.failures.values()]
        os_error = next((f for f in failures if isinstance(f, OSError)), None)
        if os_error is not None:
            raise os_error
        first = failures[0] if failures else e
        raise RuntimeError(f"checkpoint {what}: {type(first).__name__}: {first}") from first


# ----------------------------------------------------------------------------------------------------------------
# Loading into any layout

def load_training_state(model, optimizer, state: dict, path, group=None) -> None:
    """Put a checkpoint's weights and AdamW moments (and step counts) into this run's model and optimizer; every
    process calls this. `path` is a sharded checkpoint folder (read with DCP: each process reads just its shards,
    or full tensors for a plain model) or a .pt file whose loaded dict is `state` (full tensors: each process keeps
    its slice). `model` is FSDP-sharded or plain (one process, or the module DDP will wrap). The optimizer keeps
    this run's settings (betas, eps, weight decay, fused/foreach): only moments and step counts are loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    # torch's helpers build the AdamW state to load into (a step at lr 0) only while no gradient is held: without
    # this, held gradients would leave that state empty and the checkpoint's moments unloaded
    optimizer.zero_grad(set_to_none=True)
    names = _param_names(model, optimizer)
    path = Path(path)
    if path.is_dir():
        saved = {"model": get_model_state_dict(model),  # this run's tensors (shards or full), filled in place
                 "optimizer": {"state": get_optimizer_state_dict(model, optimizer)["state"]}}
        _dcp_call(dcp.load, saved, path, group, path)
        options = StateDictOptions()
    else:
        saved = {"model": state["model"], "optimizer": {"state": _state_by_name(names, state["optimizer"])}}
        options = StateDictOptions(full_state_dict=True)  # full tensors: each process keeps its slice
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": group_names}
              for group, group_names in zip(optimizer.param_groups, names)]  # this run's settings, by name
    set_model_state_dict(model, saved["model"], options=options)
    set_optimizer_state_dict(model, optimizer, {"state": saved["optimizer"]["state"], "param_groups": groups},
                             options=options)


def _param_names(model, optimizer) -> list[list[str]]:
    """The parameter names of each of the optimizer's groups, in the optimizer's order."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _state_by_name(names: list[list[str]], saved: dict) -> dict:
    """A torch optimizer state_dict's per-parameter state, keyed by position in its param groups, keyed by
    parameter name instead. Positions follow model.configure_optimizer's groups, which built this run's optimizer
    (`names`) too."""
    shape = [len(g["params"]) for g in saved["param_groups"]]
    if shape != [len(group) for group in names]:
        raise UserError(f"the checkpoint's optimizer has parameter groups of {shape} tensors, this model's "
                        f"{[len(group) for group in names]}; resume with the code that wrote it")
    flat_names = [name for group in names for name in group]
    positions = [i for g in saved["param_groups"] for i in g["params"]]
    return {name: saved["state"][i] for name, i in zip(flat_names, positions) if i in saved["state"]}
