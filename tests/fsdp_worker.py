"""Under `torchrun --nproc_per_node=2` (gloo, CPU), for tests/test_fsdp.py:

  python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_worker.py units OUT
      sharding.py and sharded checkpoints on the debug model: each check writes what the test asserts into OUT
      (rank 0's, unless per rank)
  python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_worker.py kill-at-save STEP TRAIN_ARGS
      train.py TRAIN_ARGS --fsdp, with rank 0 SIGKILLed while it saves step STEP: after every process wrote its
      shards, in the middle of writing train_state.pt
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoint  # noqa: E402
import sharding  # noqa: E402
from checkpoint import checkpoint_path, checkpoint_step, load_checkpoint_file  # noqa: E402
from devices import exit_with  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# The debug model with a small vocabulary (quick to save and compare); an odd row count, as GPT-2's 50257, so the
# embedding splits unevenly over 2 processes (FSDP pads the last shard).
CONFIG = GPTConfig.from_preset("debug", vocab_size=1001, attn_dropout=0.0, ffn_dropout=0.0)
BATCH, SEQ, ACCUM, STEPS = 4, 16, 2, 3  # 4 sequences per step: each of 2 processes takes 1 per micro-step


def make(fsdp: bool, seed: int = 1):
    model = GPT(CONFIG, seed=seed)
    if fsdp:
        sharding.shard_model(model, mixed_precision=False)
    return model, model.configure_optimizer(1e-3, 0.1)


def batches(step: int):
    """The step's token batch (BATCH, SEQ): inputs and targets, the same on every process."""
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def train_fsdp(model, optimizer, rank: int, world: int) -> list[float]:
    """STEPS optimizer steps, ACCUM micro-steps each (gradients reduce-scattered on each, as train.py does).
    Returns the (global, clipped-by) grad norms."""
    norms = []
    for step in range(STEPS):
        x, y = batches(step)
        for micro in range(ACCUM):
            row = micro * world + rank  # one sequence per process and micro-step
            (model(x[row:row + 1], y[row:row + 1])[1] / ACCUM).backward()
        norms.append(sharding.clip_grad_norm(model.parameters(), 0.5).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def train_plain(model, optimizer) -> list[float]:
    """The same steps on one process: the whole token batch, one sequence per micro-step."""
    norms = []
    for step in range(STEPS):
        x, y = batches(step)
        for i in range(BATCH):
            (model(x[i:i + 1], y[i:i + 1])[1] / BATCH).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def full_state(model, optimizer) -> dict:
    """Model and optimizer state as full tensors keyed by name, on every process (a plain model: its own)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    return {"model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options)["state"]}


def units(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    # 1. FSDP on 2 processes vs one process accumulating the same token batch.
    model, optimizer = make(fsdp=True)
    norms = train_fsdp(model, optimizer, rank, world)
    params, moments = sharding.training_state_bytes(model, optimizer)
    plain, plain_optimizer = make(fsdp=False)
    plain_norms = train_plain(plain, plain_optimizer)
    plain_params, plain_moments = sharding.training_state_bytes(plain, plain_optimizer)
    trained = full_state(model, optimizer)
    (out / f"bytes_rank{rank}.json").write_text(json.dumps({"fsdp": {"params": params, "optimizer": moments},
                                                            "plain": {"params": plain_params,
                                                                      "optimizer": plain_moments}}))
    if rank == 0:
        (out / "grad_norms.json").write_text(json.dumps({"fsdp": norms, "plain": plain_norms}))

    # 2. A sharded checkpoint at step 3, loaded back into a fresh FSDP model and into a plain one.
    run = out / "run"
    extra = {"model_config": CONFIG.__dict__, "step": STEPS, "tokens_seen": 12345}  # tokens_seen: opaque to the sharded save
    checkpoint.save_sharded_checkpoint(checkpoint_path(run, STEPS, sharded=True), model, optimizer, extra)
    folder = checkpoint_path(run, STEPS, sharded=True)
    state = load_checkpoint_file(folder, weights=False)
    results = {}
    for name, fsdp in (("fsdp_from_sharded", True), ("plain_from_sharded", False)):
        fresh, fresh_optimizer = make(fsdp, seed=9)
        checkpoint.load_training_state(fresh, fresh_optimizer, state, folder)
        results[name] = full_state(fresh, fresh_optimizer)
    # 3. A plain (DDP-style) .pt checkpoint into FSDP: optimizer state keyed by position, as torch saves it.
    pt = {"model": plain.state_dict(), "optimizer": plain_optimizer.state_dict()}
    fresh, fresh_optimizer = make(fsdp=True, seed=9)
    checkpoint.load_training_state(fresh, fresh_optimizer, pt, out / "plain.pt")
    results["fsdp_from_pt"] = full_state(fresh, fresh_optimizer)
    results["fsdp_from_pt_settings"] = [{k: g[k] for k in ("weight_decay", "betas", "eps")}
                                        for g in fresh_optimizer.param_groups]
    if rank == 0:
        torch.save({"trained": trained, "plain": full_state(plain, plain_optimizer), **results}, out / "loaded.pt")
    dist.destroy_process_group()


def kill_at_save(step: int, train_args: list[str]) -> int:
    import train

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    save = checkpoint.save_sharded_checkpoint

    def save_or_die(path, *args, **kwargs):
        if checkpoint_step(path) == step and dist.get_rank() == 0:
            checkpoint.atomic_write = killed  # train_state.pt is written last, after the shards
        return save(path, *args, **kwargs)
    checkpoint.save_sharded_checkpoint = save_or_die
    return train.main([*train_args, "--fsdp"])


if __name__ == "__main__":
    if sys.argv[1] == "units":
        exit_with(lambda: units(Path(sys.argv[2])))
    else:
        exit_with(lambda: kill_at_save(int(sys.argv[2]), sys.argv[3:]))
