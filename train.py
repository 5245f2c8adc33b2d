"""Pre-train a GPT: one process (CUDA, MPS or CPU) or torchrun DDP over GPUs and nodes, exactly resumable.

  python train.py --config debug --data temp_data/data/embedded --out temp_data/runs/debug
  torchrun --nproc_per_node=8 train.py --config lf_llm_269m --data temp_data/data/fineweb_edu_10bt --out RUN --resume

Every TrainConfig field is a --kebab-case flag (`--max-lr 1e-3`); `--config` picks the preset they override.
A run directory holds config.json, train.log, metrics.jsonl and checkpoints/step_NNNNNN.pt. A checkpoint holds
everything needed to continue exactly: model, optimizer, step, loader position and every rank's RNG states
(bit-for-bit on CPU; on CUDA up to the rounding of kernels that add in a varying order, as between any two GPU runs).
SIGTERM/SIGINT finish the current step, checkpoint and exit 0; `--resume` continues from the newest valid
checkpoint; under `torchrun --max-restarts=K ... --resume --allow-fresh-start` a crashed worker group restarts
from the last checkpoint.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (checkpoint_dir, checkpoint_path, list_checkpoints, load_checkpoint, newest_valid_checkpoint,
                        prune_checkpoints, quarantine_checkpoints, remove_orphaned_temp_files, save_checkpoint,
                        rng_state, seed_everything, set_aside, set_rng_state)
from cli import UserError, atomic_write, ensure_writable_dir, main_entry, run_header
from dataloader import ShardDataset, TrainLoader, val_batches
from devices import Dist, enable_tf32, init_distributed, mfu, peak_flops
from generate import REFERENCE_PROMPTS, generate_samples
from hellaswag_eval import SAMPLE_FILE, evaluate_hellaswag, load_examples
from model import GPT, PRESETS, GPTConfig
from plot_metrics import read_metrics
from trackers import Trackers, check_installed, open_trackers, parse_trackers

# ----------------------------------------------------------------------------------------------------------------
# Config

@dataclass
class TrainConfig:
    """Defaults are the reference recipe (LF_LLM-269M on FineWeb-Edu sample-10BT, 8 GPUs)."""
    model: str = "lf_llm_269m"  # model preset (model.PRESETS)
    data: str = "temp_data/data/fineweb_edu_10bt"  # a data_prep.py output directory
    out: str = ""  # run directory; default temp_data/runs/<config>-<time>
    # Batch: token batch per optimizer step = micro_batch x seq_len x world size x accumulation steps.
    total_batch_tokens: int = 524_288  # 2^19
    micro_batch: str = "16"  # sequences per GPU per forward pass, or "auto" (largest that fits the device)
    seq_len: int = 2048
    max_steps: int = 19_073  # int(10e9 / 524,288): 10B tokens
    # AdamW and the LR schedule: linear warmup, then cosine to min_lr at the last step.
    max_lr: float = 2.1e-3
    min_lr: float = 2.1e-4
    warmup_steps: int = 226  # 119M tokens
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # Model overrides (None: the preset's value).
    attn_dropout: float | None = None
    ffn_dropout: float | None = None
    pad_vocab_to: int | None = None
    # Speed.
    compile: bool = True  # torch.compile the model (off in the debug preset: on CPU it costs more than it saves)
    autocast: bool = True  # bf16 autocast on CUDA
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    peak_flops: float = 0.0  # device peak for MFU; 0 = look up the GPU name (A100, H100, H200)
    # Evaluation, logging and checkpoints (intervals in optimizer steps; 0 = only at the last step).
    log_every: int = 10
    eval_every: int = 100  # validation loss
    # Validation tokens per periodic evaluation: the reference's 30 batches of 16 x 2048 on 8 GPUs (7.9M), here
    # spread over the whole validation split instead of its first 8M tokens.
    val_tokens: int = 7_864_320
    final_val_tokens: int = 0  # validation tokens at the last step; 0 = the whole validation split
    hellaswag_every: int = 500
    hellaswag_data: str = ""  # jsonl file; "" = the official validation split (downloaded once)
    hellaswag_limit: int = 0  # examples per evaluation; 0 = all
    sample_every: int = 500
    sample_prompts: tuple[str, ...] = tuple(REFERENCE_PROMPTS)
    sample_tokens: int = 32
    sample_temperature: float = 1.0
    sample_top_k: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 3  # newest checkpoints kept; 0 = all
    # Live mirrors of metrics.jsonl on rank 0 (trackers.py): TensorBoard event files in the run directory, W&B.
    tracker: str = "none"  # none, tensorboard, wandb, or both comma-separated: tensorboard,wandb
    wandb_project: str = ""  # "" = $WANDB_PROJECT, else lf-llm
    wandb_run_name: str = ""  # "" = $WANDB_NAME, else the run directory's name
    # Control.
    seed: int = 1337
    device: str = ""  # cuda, mps, cpu; "" = the best available
    stop_at_step: int = 0  # checkpoint and exit after this step (the schedule still follows max_steps)
    resume: bool = False  # continue from the newest valid checkpoint in the run directory
    allow_fresh_start: bool = False  # with --resume: start from scratch when there is no checkpoint yet
    init_from: str = ""  # start a new run from this checkpoint's weights (file or run directory)
    verify_data: bool = True  # check every shard's sha256 against the manifest at start (about 1 min per 10B tokens)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in TRAIN_PRESETS:
            raise UserError(f"unknown --config {name!r}; valid configs: {', '.join(TRAIN_PRESETS)}")
        return dataclasses.replace(TRAIN_PRESETS[name], **overrides)

    def validate(self) -> None:
        """Refuse values that cannot work, naming the flag: one clear line now instead of a crash later."""
        def need(ok: bool, name: str, rule: str):
            if not ok:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: {rule}")
        for name in ("total_batch_tokens", "seq_len", "max_steps", "log_every", "sample_tokens"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("warmup_steps", "eval_every", "val_tokens", "final_val_tokens", "hellaswag_every",
                     "hellaswag_limit", "sample_every", "sample_top_k", "ckpt_every", "keep_checkpoints", "seed",
                     "stop_at_step", "min_lr", "weight_decay", "sample_temperature", "peak_flops"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("max_lr", "grad_clip", "eps"):
            need(getattr(self, name) > 0, name, "must be > 0")
        for name in ("beta1", "beta2", "attn_dropout", "ffn_dropout"):
            need(getattr(self, name) is None or 0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        need(self.pad_vocab_to is None or self.pad_vocab_to >= 1, "pad_vocab_to", "must be >= 1 (1 = no padding)")
        need(self.micro_batch == "auto" or (self.micro_batch.isdigit() and int(self.micro_batch) >= 1), "micro_batch",
             "give a positive integer or 'auto'")
        need(self.model in PRESETS, "model", f"valid model presets: {', '.join(PRESETS)}")
        need(self.seed < 2 ** 32, "seed", "must be < 2**32 (numpy's seed range)")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            need(not isinstance(value, float) or math.isfinite(value), field.name, "must be a finite number")
        check_installed(parse_trackers(self.tracker))  # a missing package stops every rank now, not rank 0 later

    def model_config(self) -> GPTConfig:
        overrides = {k: getattr(self, k) for k in ("attn_dropout", "ffn_dropout", "pad_vocab_to")
                     if getattr(self, k) is not None}
        return GPTConfig.from_preset(self.model, **overrides)


TRAIN_PRESETS = {
    "lf_llm_269m": TrainConfig(),
    # The reference recipe (10B tokens, 2^19 tokens per step, its schedule; the learning rate is not re-tuned for
    # this size) on the 1.18B model. Micro-batch 16 x 2048 per GPU needs activation checkpointing: per
    # `bench.py --mode memory` about 42 GiB per GPU with it under DDP, 138 GiB without.
    "lf_llm_1b": TrainConfig(model="lf_llm_1b", activation_checkpointing=True),
    # Trains the tiny debug model on the embedded corpus (about 0.8 epoch) on 2 CPU cores in about 3 minutes.
    "debug": TrainConfig(model="debug", data="temp_data/data/embedded", total_batch_tokens=1024, micro_batch="8",
                         seq_len=128, max_steps=250, warmup_steps=25, max_lr=3e-3, min_lr=3e-4, compile=False,
                         log_every=10, eval_every=50, val_tokens=8192, final_val_tokens=0, hellaswag_every=125,
                         hellaswag_data=str(SAMPLE_FILE), sample_every=125,
                         sample_tokens=24, ckpt_every=125),
}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to max_lr over warmup_steps, then cosine decay reaching min_lr exactly at the last step."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


def due_at(step: int, every: int) -> bool:
    """Whether a periodic action (every N steps; 0 = never) falls on `step`."""
    return every > 0 and step % every == 0


def grad_accum_steps(total_batch_tokens: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step, so that micro-batches of all ranks add up to exactly the token batch."""
    per_pass = micro_batch * seq_len * world_size
    if total_batch_tokens % per_pass:
        raise UserError(f"--total-batch-tokens {total_batch_tokens} is not a multiple of micro-batch {micro_batch} x "
                        f"seq-len {seq_len} x {world_size} processes = {per_pass}; change one of them")
    steps = total_batch_tokens // per_pass
    assert steps * per_pass == total_batch_tokens
    return steps


CPU_AUTO_MICRO_BATCH = 16  # without a GPU memory limit to probe, `--micro-batch auto` takes at most this
AUTO_HEADROOM = 0.05  # share of GPU memory `--micro-batch auto` leaves free (fragmentation, evaluation shapes)


def micro_batch_candidates(total_batch_tokens: int, seq_len: int, world_size: int) -> list[int]:
    """Micro-batches that keep the token batch exact through accumulation, largest first."""
    per_rank, rest = divmod(total_batch_tokens, seq_len * world_size)
    if rest or per_rank == 0:
        raise UserError(f"--total-batch-tokens {total_batch_tokens} is not a multiple of seq-len {seq_len} x "
                        f"{world_size} processes; change one of them")
    return [b for b in range(per_rank, 0, -1) if per_rank % b == 0]


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


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load the saved moments and step counts under this run's hyperparameters: the config's betas, eps and weight
    decay, and the fused/foreach choice of this device (a run saved on CPU and resumed on CUDA gets fused AdamW,
    with its step counts moved to the GPU by load_state_dict). The LR is set every step anyway."""
    groups = optimizer.state_dict()["param_groups"]
    if len(groups) != len(saved["param_groups"]):
        raise UserError(f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, this model's "
                        f"{len(groups)}; resume with the code that wrote it")
    groups = [{**ours, "params": theirs["params"]} for ours, theirs in zip(groups, saved["param_groups"])]
    optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})


# ----------------------------------------------------------------------------------------------------------------
# Command line: every config field is a flag

def _flag_type(annotation):
    """argparse type for a field annotation (int, float, str, bool, X | None, tuple[str, ...])."""
    args = typing.get_args(annotation)
    if type(None) in args:
        return next(a for a in args if a is not type(None))
    return annotation


def add_config_flags(parser: argparse.ArgumentParser, default_preset: str = "lf_llm_269m") -> None:
    """--config PRESET plus one flag per TrainConfig field (default None: the preset's value). bench.py's train mode
    reuses them, so a benchmark takes exactly the flags a training run takes."""
    parser.add_argument("--config", default=default_preset,
                        help=f"preset: {', '.join(TRAIN_PRESETS)} (default %(default)s)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), _flag_type(hints[f.name])
        default = f"preset's (reference: {f.default!r})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=default)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, nargs="*", default=None, metavar="TEXT", help=default)
        else:
            parser.add_argument(flag, type=kind, default=None, help=default)


def config_from_flags(args: dict) -> tuple[TrainConfig, str]:
    """(config, preset name) from add_config_flags' parsed values: the preset's values, overridden by the flags
    given. Keys that are not TrainConfig fields (another script's own flags) are ignored."""
    preset = args["config"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items()
                 if k in fields and v is not None}
    return TrainConfig.from_preset(preset, **overrides), preset


def parse_config(argv=None) -> tuple[TrainConfig, str]:
    """(config, preset name) from the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser)
    return config_from_flags(vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------------------
# Logging

class RunLog:
    """Rank 0's readable log (stdout + train.log) and metrics.jsonl; other ranks stay quiet."""

    def __init__(self, run_dir: Path, active: bool):
        self.active = active
        self.log_file = open(run_dir / "train.log", "a") if active else None
        self.metrics_path = run_dir / "metrics.jsonl"
        self.trackers = Trackers()  # none until Trainer.run opens the chosen ones

    def info(self, line: str = "") -> None:
        if self.active:
            tqdm.write(line)
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def metrics(self, event: dict) -> None:
        if self.active:  # opened per event: a resume may have rewritten the file (drop_metrics_after)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(event) + "\n")
            self.trackers.log(event)


def drop_metrics_after(run_dir: Path, step: int) -> None:
    """On resume from a checkpoint taken after `step` steps, forget events the lost segment logged past it."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = [e for e in read_metrics(path) if e["step"] < step or (e["step"] == step and "loss" not in e)]
    with atomic_write(path, "w") as f:
        f.write("".join(json.dumps(event) + "\n" for event in kept))


# ----------------------------------------------------------------------------------------------------------------
# Trainer

class NonFiniteLoss(Exception):
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig, preset: str, d: Dist, device: torch.device):
        cfg.validate()
        self.cfg, self.d, self.device = cfg, d, device
        self.on_cuda = device.type == "cuda"
        self.run_dir = self._resolve_run_dir(preset)
        self.log = RunLog(self.run_dir, d.is_main)
        if d.is_main:
            self._remove_orphaned_saves()
        # One process per node checks every shard's sha256 against the manifest (a corrupt shard is refused).
        self.dataset = ShardDataset.open(cfg.data, verify_sha256=cfg.verify_data and d.local_rank == 0)
        self.model_config = cfg.model_config()
        if cfg.seq_len > self.model_config.block_size:
            raise UserError(f"--seq-len {cfg.seq_len} is longer than model {cfg.model}'s context "
                            f"({self.model_config.block_size}); lower it")
        self.model = GPT(self.model_config, seed=cfg.seed).to(device)
        if cfg.activation_checkpointing:
            self.model.enable_activation_checkpointing()
        resume = self._checkpoint_to_resume()
        self.micro_batch = self._resolve_micro_batch(resume)
        self.accum = grad_accum_steps(cfg.total_batch_tokens, self.micro_batch, cfg.seq_len, d.world_size)
        self.optimizer = self.model.configure_optimizer(cfg.max_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
        self.loader = TrainLoader(self.dataset, self.micro_batch, cfg.seq_len, rank=d.rank, world_size=d.world_size,
                                  seed=cfg.seed, device=device, log=self.log.info)
        self.step = 0
        self.flops_per_token = self.model.flops_per_token(cfg.seq_len)
        self.peak = cfg.peak_flops or (peak_flops(torch.cuda.get_device_name(device)) if self.on_cuda else None)
        self.stop_requested = False
        self.hellaswag = None  # examples, loaded at the first HellaSwag evaluation
        seed_everything(cfg.seed + d.rank)  # ranks draw different dropout masks
        if resume:
            self._load_training_state(*resume)
        else:
            self._start_fresh()
        self.resumed = resume is not None
        self._check_ranks_agree_on_step()
        self.forward_model = self._wrap_model()

    # --- setup ---

    def _resolve_run_dir(self, preset: str) -> Path:
        out = self.cfg.out
        if not out:  # one name for all ranks: rank 0 picks it
            names = [f"temp_data/runs/{preset}-{time.strftime('%Y%m%d-%H%M%S')}"]
            if self.d.world_size > 1:
                dist.broadcast_object_list(names, src=0, group=self.d.control)
            out = names[0]
        run_dir = Path(out)
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"--out {run_dir} is a file; give a directory")
        if self.d.is_main:  # its checkpoint folder must be writable now, not after the first hours of training
            ensure_writable_dir(checkpoint_dir(run_dir), "--out")
        self._barrier()
        return run_dir

    def _resolve_micro_batch(self, resume) -> int:
        value = self.cfg.micro_batch
        if value != "auto":
            return int(value)
        if resume:  # keep the resumed run's choice: the loader state depends on it
            return resume[0]["micro_batch"]
        candidates = micro_batch_candidates(self.cfg.total_batch_tokens, self.cfg.seq_len, self.d.world_size)
        fits = self._cuda_memory_probe() if self.on_cuda else (lambda b: b <= CPU_AUTO_MICRO_BATCH)
        batch = min(self._gather(largest_fitting(candidates, fits)))  # every rank must use the same micro-batch
        if batch == 0:  # raised on every rank at once, so none waits for the others
            raise UserError("even a micro-batch of 1 sequence does not fit in device memory; "
                            "try --activation-checkpointing or a shorter --seq-len")
        self.log.info(f"micro-batch auto: {batch} sequences of {self.cfg.seq_len} tokens")
        return batch

    def _cuda_memory_probe(self):
        headroom = int(AUTO_HEADROOM * torch.cuda.get_device_properties(self.device).total_memory)
        return memory_probe(self.model, self.cfg.seq_len, self.device, self.autocast,
                            stand_in_copies=2 + (self.d.world_size > 1), headroom_bytes=headroom)

    def _checkpoint_to_resume(self):
        """(state, path) of the newest valid checkpoint when --resume, else None. Damaged checkpoints newer than it
        are moved aside (renamed *.pt.damaged, never deleted): no later resume or pruning counts them. When every
        checkpoint is damaged, only --allow-fresh-start starts again from step 0; without it nothing is touched."""
        cfg = self.cfg
        if not cfg.resume:
            return None
        if cfg.init_from:
            raise UserError("--resume and --init-from exclude each other: resume continues this run, "
                            "init-from starts a new one")
        if not self.d.is_main:  # rank 0 decides and moves damaged files first: then every rank finds the same
            self._barrier()
        try:
            state, path, damaged = newest_valid_checkpoint(self.run_dir, map_location="cpu")
            if state is None and damaged and not cfg.allow_fresh_start:
                raise UserError(f"--resume: every checkpoint in {checkpoint_dir(self.run_dir)} is damaged ("
                                + "; ".join(damaged.values()) + "). Nothing was changed: add --allow-fresh-start to "
                                "move them aside (renamed *.damaged) and train again from step 0")
            if damaged and self.d.is_main:
                moved = set_aside(list(damaged), ".damaged")
                for error, new in zip(damaged.values(), moved):
                    self.log.info(f"resume: WARNING: moved a damaged checkpoint aside to {new}: {error}")
        finally:
            if self.d.is_main:
                self._barrier()
        if state is None:
            if not cfg.allow_fresh_start:
                raise UserError(f"--resume: no checkpoint in {checkpoint_dir(self.run_dir)}; add --allow-fresh-start "
                                "to start from scratch when there is none")
            self.log.info(f"resume: WARNING: no valid checkpoint in {checkpoint_dir(self.run_dir)}, training starts "
                          "from step 0" + (" (every checkpoint was damaged)" if damaged else ""))
            return None
        missing = sorted({"optimizer", "loader", "rng", "step", "train_config", "micro_batch"} - state.keys())
        if missing:
            raise UserError(f"checkpoint {path} holds no training state ({', '.join(missing)} missing); start a new "
                            f"run from its weights with --init-from {path}")
        return state, path

    def _start_fresh(self) -> None:
        if self.cfg.init_from:
            state, path = load_checkpoint(self.cfg.init_from, map_location="cpu")
            self._check_model_config(state, path, ignore=("attn_dropout", "ffn_dropout"))
            self.model.load_state_dict(state["model"])
            self.log.info(f"init: weights from {path}")
        if list_checkpoints(self.run_dir):
            raise UserError(f"{self.run_dir} already holds checkpoints; add --resume to continue that run, "
                            "or choose a new --out")
        if self.d.is_main:
            (self.run_dir / "metrics.jsonl").write_text("")  # events of an attempt that never checkpointed

    def _check_ranks_agree_on_step(self) -> None:
        if len(set(self._gather(self.step))) > 1:
            raise UserError(f"the processes found different checkpoints in {self.run_dir}; on several nodes the run "
                            "directory must be on a filesystem that every node shares")

    def _check_model_config(self, state: dict, path: Path, ignore=()) -> None:
        ours, theirs = dataclasses.asdict(self.model_config), state["model_config"]
        diff = {k: (v, theirs.get(k)) for k, v in ours.items() if theirs.get(k) != v and k not in ignore}
        if diff:
            raise UserError(f"checkpoint {path} is from a different model config (field: (ours, checkpoint's)): {diff}")

    def _load_training_state(self, state: dict, path: Path) -> None:
        self._check_model_config(state, path)
        if state.get("world_size") != self.d.world_size:
            raise UserError(f"checkpoint {path} was written by {state.get('world_size')} processes; resume with "
                            f"the same number (this run has {self.d.world_size}) for an exact continuation")
        changed = {k for k, v in dataclasses.asdict(self.cfg).items()
                   if state["train_config"].get(k) != v and k not in ("resume", "allow_fresh_start", "stop_at_step")}
        if changed:
            self.log.info(f"resume: these settings differ from the checkpoint's run: {sorted(changed)}")
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.loader.load_state_dict(state["loader"][self.d.rank])
        set_rng_state(state["rng"][self.d.rank])
        self.step = state["step"]
        if self.d.is_main:
            drop_metrics_after(self.run_dir, self.step)
        self.log.info(f"resume: continuing after step {self.step} from {path}")

    def _wrap_model(self):
        model = self.model
        if self.cfg.compile:
            model = torch.compile(model)
        if self.d.world_size > 1:
            # no buffer broadcast: the only buffers, the RoPE tables, are computed identically on every rank
            model = DDP(model, device_ids=[self.device.index] if self.on_cuda else None, broadcast_buffers=False)
        return model

    # --- the loop ---

    def autocast(self):
        if self.on_cuda and self.cfg.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over the token batch. Returns (mean loss over micro-steps, pre-clip grad norm) as
        device tensors: nothing here waits for the GPU."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y = self.loader.next_batch()
            last = micro == self.accum - 1
            # DDP all-reduces gradients only on the last micro-step; earlier ones just accumulate locally.
            sync = contextlib.nullcontext() if last or self.d.world_size == 1 else self.forward_model.no_sync()
            with sync:
                with self.autocast():
                    # only the loss is kept: the (B, T, V) bf16 logits are freed now instead of living through
                    # backward (which needs only the float32 log-softmax saved by the loss)
                    loss = self.forward_model(x, y)[1]
                (loss / self.accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / self.accum, grad_norm

    def run(self) -> int:
        cfg = self.cfg
        header, config = self._log_header()
        with self._open_trackers(header, config):  # closed on any exit; an error marks the W&B run failed
            last_step = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step else cfg.max_steps
            if not self.resumed:  # a resumed run evaluated this step before its checkpoint
                self.evaluate(self.step, self.due_evaluations(self.step))
            with tqdm(total=last_step, initial=self.step, desc="train", unit="step", disable=not self.d.is_main,
                      dynamic_ncols=True) as bar:  # closed on any exit, so an error starts on its own line
                self._train_until(last_step, bar)
            self.log.info(f"done: {self.step} steps, {self.step * cfg.total_batch_tokens:,} tokens, "
                          f"run directory {self.run_dir}")
        return 0

    def _train_until(self, last_step: int, bar) -> None:
        """Optimizer steps up to last_step (or a stop signal), with logs, evaluations and checkpoints when due."""
        cfg = self.cfg
        bad_step = torch.full((), -1, device=self.device, dtype=torch.long)  # first step with a NaN/inf loss
        window_start, window_steps, paused = time.perf_counter(), 0, 0.0  # step time excludes evals and saves
        first_step = self.step
        self._install_signal_handlers()
        while self.step < last_step:
            loss, grad_norm = self.train_step()
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            bad_step = torch.where((bad_step < 0) & ~finite, self.step, bad_step)
            self.step += 1
            window_steps += 1
            bar.update(1)
            done = self.step == last_step
            stop = self._agree_to_stop()
            if self.step % cfg.log_every == 0 or done or stop:
                self._check_finite(bad_step)
                elapsed = self._elapsed(window_start) - paused
                self._log_train(loss, grad_norm, elapsed / window_steps)
                window_start, window_steps, paused = time.perf_counter(), 0, 0.0
            elif self.step == first_step + 1:
                # this process's first step compiles the model (tens of seconds): it is timed on its own (when it
                # is a log step) and never averaged into a later window
                self._elapsed(window_start)
                window_start, window_steps, paused = time.perf_counter(), 0, 0.0
            evaluations = self.due_evaluations(self.step)
            if evaluations:
                paused += self._duration(self.evaluate, self.step, evaluations)
            if due_at(self.step, cfg.ckpt_every) or done or stop:
                self._check_finite(bad_step)
                paused += self._duration(self.save)
            if stop:
                self.log.info(f"stopped by signal after step {self.step}; checkpoint written. "
                              f"Continue with the same command plus --resume")
                break

    def _elapsed(self, since: float) -> float:
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - since

    def _duration(self, fn, *args) -> float:
        """Seconds fn takes, the GPU drained first so that queued training work is not counted."""
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        fn(*args)
        return self._elapsed(start)

    def _check_finite(self, bad_step: torch.Tensor) -> None:
        step = int(bad_step.item())
        if self.d.world_size > 1:  # any rank's NaN stops every rank
            flag = torch.tensor([step], dtype=torch.long)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.d.control)
            step = int(flag.item())
        if step >= 0:
            if self.d.is_main:  # weights saved at or after that step produced it: --resume must not pick them
                quarantine_checkpoints(self.run_dir, from_step=step)
            good = list_checkpoints(self.run_dir)
            raise NonFiniteLoss(f"loss or gradient became NaN/inf at step {step}; "
                                + (f"the last good checkpoint is {good[-1]}" if good else "no checkpoint before it")
                                + " (try a lower --max-lr, then --resume)")

    def _log_train(self, loss: torch.Tensor, grad_norm: torch.Tensor, step_s: float) -> None:
        loss = self._mean_over_ranks(loss)
        tokens_per_s = self.cfg.total_batch_tokens / step_s
        util = mfu(self.flops_per_token, tokens_per_s / self.d.world_size, self.peak)
        event = {"step": self.step - 1, "loss": loss.item(), "lr": lr_at(self.step - 1, self.cfg),
                 "grad_norm": grad_norm.item(), "step_ms": step_s * 1000, "tokens_per_s": tokens_per_s,
                 "mfu": util, "tokens": self.step * self.cfg.total_batch_tokens}
        self.log.metrics(event)
        self.log.info(f"step {event['step']:6d} | loss {event['loss']:.4f} | lr {event['lr']:.2e} | "
                      f"norm {event['grad_norm']:.3f} | {event['step_ms']:.0f} ms | {tokens_per_s:,.0f} tok/s"
                      + (f" | mfu {util:.1%}" if util is not None else ""))

    # --- evaluation ---

    def due_evaluations(self, step: int) -> list:
        """Validation loss, HellaSwag and samples, each when its interval falls on `step`; all at the last step."""
        final = step == self.cfg.max_steps
        return [run for every, run in ((self.cfg.eval_every, self._eval_val_loss),
                                       (self.cfg.hellaswag_every, self._eval_hellaswag),
                                       (self.cfg.sample_every, self._eval_samples)) if final or due_at(step, every)]

    def evaluate(self, step: int, evaluations: list) -> None:
        """Run them on forked RNG streams; each restores the model's mode, so training continues exactly as
        without them."""
        with torch.random.fork_rng(devices=[self.device] if self.on_cuda else []):
            for run in evaluations:
                run(step)

    @torch.no_grad()
    def _eval_val_loss(self, step: int) -> None:
        max_tokens = self.cfg.final_val_tokens if step == self.cfg.max_steps else self.cfg.val_tokens
        was_training = self.model.training
        self.model.eval()
        total, batches = torch.zeros((), device=self.device), 0
        for x, y in val_batches(self.dataset, self.micro_batch, self.cfg.seq_len, self.d.rank, self.d.world_size,
                                max_tokens=max_tokens or None, device=self.device):
            with self.autocast():
                loss = self.model(x, y)[1]
            total += loss
            batches += 1
        self.model.train(was_training)
        val = self._mean_over_ranks(total / max(1, batches))
        self.log.metrics({"step": step, "val_loss": val.item()})
        self.log.info(f"step {step:6d} | val loss {val.item():.4f} ({batches * self.d.world_size} batches)")

    def _hellaswag_examples(self) -> list[dict]:
        """Loaded once per run; rank 0 downloads the official split (if needed) before the others read it."""
        if self.hellaswag is None:
            if not self.d.is_main:
                self._barrier()  # wait for rank 0's download
            self.hellaswag = load_examples(self.cfg.hellaswag_data or None, limit=self.cfg.hellaswag_limit or None)
            if self.d.is_main:
                self._barrier()
        return self.hellaswag

    def _eval_hellaswag(self, step: int) -> None:
        examples = self._hellaswag_examples()
        result = evaluate_hellaswag(self.model, examples, self.device, batch_size=self.micro_batch,
                                    rank=self.d.rank, world_size=self.d.world_size)
        self.log.metrics({"step": step, "hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"]})
        self.log.info(f"step {step:6d} | hellaswag acc_norm {result['acc_norm']:.4f} acc {result['acc']:.4f} "
                      f"({result['total']} examples)")

    def _eval_samples(self, step: int) -> None:
        if not self.cfg.sample_prompts or not self.d.is_main:
            return
        texts = generate_samples(self.model, list(self.cfg.sample_prompts), self.cfg.sample_tokens,
                                 self.cfg.sample_temperature, self.cfg.sample_top_k or None, None, self.cfg.seed,
                                 self.device)
        self.log.metrics({"step": step, "samples": [{"prompt": p, "text": t}
                                                    for p, t in zip(self.cfg.sample_prompts, texts)]})
        for prompt, text in zip(self.cfg.sample_prompts, texts):
            self.log.info(f"step {step:6d} | sample | {prompt!r} -> {text!r}")

    # --- checkpoints and signals ---

    def save(self) -> None:
        rng, loader = self._gather(rng_state()), self._gather(self.loader.state_dict())
        if self.d.is_main:
            self._remove_orphaned_saves()  # before writing: their space may be what this save needs
            path = checkpoint_path(self.run_dir, self.step)
            save_checkpoint({
                "model_config": dataclasses.asdict(self.model_config),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "train_config": dataclasses.asdict(self.cfg),
                "step": self.step,
                "tokens_seen": self.step * self.cfg.total_batch_tokens,
                "world_size": self.d.world_size,
                "micro_batch": self.micro_batch,
                "loader": loader,
                "rng": rng,
            }, path)
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
            self.log.info(f"step {self.step:6d} | checkpoint {path}")
        self._barrier()

    def _remove_orphaned_saves(self) -> None:
        for path in remove_orphaned_temp_files(self.run_dir):
            self.log.info(f"removed {path}, the temporary file of a save that was killed")

    def _mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.d.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)  # (gloo has no AVG)
            value = value / self.d.world_size
        return value

    def _gather(self, obj) -> list:
        """[rank 0's obj, rank 1's, ...] (host-side, over the control group)."""
        if self.d.world_size == 1:
            return [obj]
        out = [None] * self.d.world_size
        dist.all_gather_object(out, obj, group=self.d.control)
        return out

    def _barrier(self) -> None:
        if self.d.world_size > 1:
            dist.barrier(group=self.d.control)

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True
            signal.signal(signum, signal.SIG_DFL)  # a second signal stops the process at once
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def _agree_to_stop(self) -> bool:
        """True on every rank when any rank got SIGTERM/SIGINT (a host-side all-reduce: no GPU sync)."""
        if self.d.world_size == 1:
            return self.stop_requested
        flag = torch.tensor([int(self.stop_requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.d.control)
        return bool(flag.item())

    def _log_header(self) -> tuple[list[str], dict]:
        """Log the run header and the config (also written to config.json); both are returned for the trackers."""
        header = [*run_header(self.device),
                  f"processes: {self.d.world_size}, micro-batch {self.micro_batch} x {self.cfg.seq_len}, "
                  f"{self.accum} accumulation steps, {self.cfg.total_batch_tokens:,} tokens per step",
                  f"model {self.cfg.model}: {self.model.num_params():,} parameters "
                  f"({self.model.num_params(include_embedding=False):,} without the embedding), "
                  f"{self.flops_per_token / 1e9:.2f} GFLOP per token",
                  f"data {self.cfg.data}: {self.dataset.train_tokens:,} train / {self.dataset.val_tokens:,} val tokens"]
        for line in header:
            self.log.info(line)
        config = {"train": dataclasses.asdict(self.cfg), "model": dataclasses.asdict(self.model_config)}
        self.log.info("config: " + json.dumps(config))
        if self.d.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return header, config

    def _open_trackers(self, header: list[str], config: dict) -> Trackers:
        """Rank 0 starts the --tracker mirrors, which then get every metrics event; other ranks get none. A tracker
        that cannot start stops every rank together (the others would otherwise wait in the first collective)."""
        error = None
        if self.d.is_main:
            try:
                self.log.trackers = open_trackers(parse_trackers(self.cfg.tracker), self.run_dir, self.step,
                                                  self.resumed, config, header, self.cfg.wandb_project,
                                                  self.cfg.wandb_run_name, warn=self.log.info)
            except UserError as e:
                error = str(e)
        error = self._gather(error)[0]
        if error:
            raise UserError(error)
        return self.log.trackers


@main_entry(memory_hint="try --micro-batch auto (the largest that fits), a lower --micro-batch (accumulation keeps the "
                        "token batch) or --activation-checkpointing")
def main(argv=None) -> int:
    cfg, preset = parse_config(argv)
    d, device = init_distributed(cfg.device)
    try:
        enable_tf32(device)
        return Trainer(cfg, preset, d, device).run()
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
