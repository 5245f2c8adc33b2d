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
import cli
import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (checkpoint_dir, checkpoint_path, checkpoint_step, end_step, is_sharded_checkpoint,
                        list_checkpoints, load_checkpoint, newest_valid_checkpoint, prune_checkpoints,
                        quarantine_checkpoints, remove_orphaned_temp_files, rng_state, save_checkpoint,
                        seed_everything, set_aside, set_rng_state, steps_left)
from cli import UserError, atomic_write, ensure_writable_dir, fail, main_entry, positive_int, run_header, write_json
from dataloader import ShardDataset, TrainLoader, val_batches
from devices import (Dist, cuda_memory_probe, enable_tf32, exit_with, init_distributed, largest_fitting, mfu,
                     peak_flops, pick_device)
from generate import REFERENCE_PROMPTS, encode_prompt, generate_samples
from hellaswag_eval import SAMPLE_FILE, evaluate_hellaswag, load_examples
from model import ATTENTION_BACKENDS, GPT, PRESETS, GPTConfig, Sampling, evaluating
from plot_metrics import read_metrics
from sharding import (clip_grad_norm, load_training_state, load_weights, require_fsdp, save_sharded_checkpoint,
                      shard_model, training_state_bytes, whole_model)
from trackers import Trackers, check_installed, open_trackers, parse_trackers

# ----------------------------------------------------------------------------------------------------------------
# Config

# The TrainConfig field of each Sampling setting (TrainConfig.sampling)
SAMPLE_FIELDS = {"max_new_tokens": "sample_tokens", "temperature": "sample_temperature", "top_k": "sample_top_k"}


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
    attn_backend: str = "auto"  # SDPA kernel of attention: auto (SDPA's pick), flash, cudnn, efficient (CUDA), math
    loss_chunk_rows: int = 0  # > 0: head + loss this many rows at a time, never all (B*T, V) float32 logits
    fp8: bool = False  # fp8 matmuls in the Linear layers: torchao's float8 training (CUDA sm89+, pip install torchao)
    # Under torchrun: shard weights, gradients and AdamW state over the processes (FSDP2) instead of replicating
    # them (DDP): each holds about 1/N of them; checkpoints become sharded folders (sharding.py).
    fsdp: bool = False
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
    # With --resume: accept a --total-batch-tokens other than the checkpoint's. The data continues at the next
    # window and the step count and LR schedule at the saved step, now with steps of the new size.
    allow_token_batch_change: bool = False
    init_from: str = ""  # start a new run from this checkpoint's weights (file or run directory)
    verify_data: bool = True  # check every shard's sha256 against the manifest at start (about 1 min per 10B tokens)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in TRAIN_PRESETS:
            raise UserError(f"unknown --config {name!r}; valid configs: {', '.join(TRAIN_PRESETS)}")
        return dataclasses.replace(TRAIN_PRESETS[name], **overrides)

    def problems(self) -> list[str]:
        """Every value that cannot work, as '--flag VALUE: rule' (the first rule a field breaks), and every pair of
        flags that exclude each other: all found at once, before any work starts."""
        found = {}

        def need(ok: bool, name: str, rule: str):
            if not ok and name not in found:
                found[name] = f"--{name.replace('_', '-')} {getattr(self, name)!r}: {rule}"
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            need(not isinstance(value, float) or math.isfinite(value), field.name, "must be a finite number")
        for name in ("total_batch_tokens", "seq_len", "max_steps", "log_every"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("warmup_steps", "eval_every", "val_tokens", "final_val_tokens", "hellaswag_every",
                     "hellaswag_limit", "sample_every", "ckpt_every", "keep_checkpoints", "seed", "stop_at_step",
                     "min_lr", "weight_decay", "peak_flops"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("max_lr", "grad_clip", "eps"):
            need(getattr(self, name) > 0, name, "must be > 0")
        need(self.min_lr <= self.max_lr, "min_lr", f"above --max-lr {self.max_lr!r}; the schedule decays to it")
        for name in ("beta1", "beta2", "attn_dropout", "ffn_dropout"):
            need(getattr(self, name) is None or 0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        need(self.pad_vocab_to is None or self.pad_vocab_to >= 1, "pad_vocab_to", "must be >= 1 (1 = no padding)")
        need(self.attn_backend in ("auto", *ATTENTION_BACKENDS), "attn_backend",
             f"choose auto, {', '.join(ATTENTION_BACKENDS)}")
        need(self.loss_chunk_rows >= 0, "loss_chunk_rows", "must be >= 0 (0 = the plain loss)")
        need(self.micro_batch == "auto" or (self.micro_batch.isdigit() and int(self.micro_batch) >= 1), "micro_batch",
             "give a positive integer or 'auto'")
        need(self.seed < 2 ** 32, "seed", "must be < 2**32 (numpy's seed range)")
        need(self.model in PRESETS, "model", f"valid model presets: {', '.join(PRESETS)}")
        if self.model in PRESETS:
            context = PRESETS[self.model].block_size
            need(self.seq_len <= context, "seq_len", f"longer than model {self.model}'s context ({context}); lower it")
            for prompt in self.sample_prompts:  # sampled at the last step: an unusable prompt is found now
                try:
                    encode_prompt(prompt, context)
                except UserError as e:
                    need(False, "sample_prompts", str(e))
        need(not Path(self.out).exists() or Path(self.out).is_dir(), "out", "is a file; give a directory")
        need(not self.init_from or Path(self.init_from).exists(), "init_from",
             "no such file or folder; give a checkpoint file or a run directory")
        need(not (self.resume and self.init_from), "init_from", "excludes --resume: resume continues this run, "
             "init-from starts a new one; leave one out")
        for name in ("allow_fresh_start", "allow_token_batch_change"):
            need(self.resume or not getattr(self, name), name, "only applies with --resume; add it or leave this out")
        # HellaSwag is evaluated at the last step, after the whole run: its file is read now
        need(not self.hellaswag_data or Path(self.hellaswag_data).is_file(), "hellaswag_data",
             f"no such file; give a HellaSwag jsonl file (e.g. {SAMPLE_FILE.relative_to(Path(__file__).parent)}), "
             "or leave it out for the official validation split")
        for setting, rule in self.sampling().errors().items():  # Sampling's rules, named by train.py's flags
            need(False, SAMPLE_FIELDS[setting], rule)
        checks = {"hellaswag_data": lambda: self.hellaswag_data and load_examples(self.hellaswag_data),
                  "tracker": lambda: check_installed(parse_trackers(self.tracker))}  # every rank stops now
        for name, check in checks.items():
            try:
                check()
            except UserError as e:
                found.setdefault(name, str(e))
        return list(found.values())

    def validate(self) -> None:
        """Refuse values that cannot work: every problem in one clear line now instead of a crash later."""
        problems = self.problems()
        if problems:
            raise UserError("; ".join(problems))

    def sampling(self) -> Sampling:
        return Sampling(self.sample_tokens, self.sample_temperature, self.sample_top_k)

    def model_config(self) -> GPTConfig:
        overrides = {k: getattr(self, k) for k in ("attn_dropout", "ffn_dropout", "pad_vocab_to")
                     if getattr(self, k) is not None}
        return GPTConfig.from_preset(self.model, **overrides)


TRAIN_PRESETS = {
    "lf_llm_269m": TrainConfig(),
    # The reference recipe (10B tokens, 2^19 tokens per step, its schedule; the learning rate is not re-tuned for
    # this size) on the 1.18B model. Micro-batch 16 x 2048 per GPU needs activation checkpointing: per
    # `bench.py memory` about 42 GiB per GPU with it under DDP, 138 GiB without.
    "lf_llm_1b": TrainConfig(model="lf_llm_1b", activation_checkpointing=True),
    # Trains the tiny debug model on the embedded corpus (about 0.8 epoch) on 2 CPU cores in about 3 minutes.
    # Its micro-batch is auto: 8 sequences on one process, 4 each on two (CPU DDP), the same 1,024-token batch.
    "debug": TrainConfig(model="debug", data="temp_data/data/embedded", total_batch_tokens=1024, micro_batch="auto",
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


def sequences_per_rank(total_batch_tokens: int, seq_len: int, world_size: int) -> int:
    """Sequences each process handles per optimizer step: the token batch split over the processes."""
    per_rank, rest = divmod(total_batch_tokens, seq_len * world_size)
    if rest or per_rank == 0:
        raise UserError(f"--total-batch-tokens {total_batch_tokens} is not a multiple of seq-len {seq_len} x "
                        f"{world_size} processes = {seq_len * world_size}; change one of them")
    return per_rank


def grad_accum_steps(total_batch_tokens: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step, so that micro-batches of all ranks add up to exactly the token batch."""
    per_rank = sequences_per_rank(total_batch_tokens, seq_len, world_size)
    if per_rank % micro_batch:
        raise UserError(f"--micro-batch {micro_batch} does not divide the {per_rank} sequences of {seq_len} tokens "
                        f"each of the {world_size} processes gets per step (--total-batch-tokens "
                        f"{total_batch_tokens}); use a divisor of {per_rank} or --micro-batch auto")
    return per_rank // micro_batch


CPU_AUTO_MICRO_BATCH = 16  # without a GPU memory limit to probe, `--micro-batch auto` takes at most this


def micro_batch_candidates(total_batch_tokens: int, seq_len: int, world_size: int) -> list[int]:
    """Micro-batches that keep the token batch exact through accumulation, largest first."""
    per_rank = sequences_per_rank(total_batch_tokens, seq_len, world_size)
    return [b for b in range(per_rank, 0, -1) if per_rank % b == 0]


def check_device_levers(cfg: TrainConfig, device: torch.device) -> None:
    """Speed flags this device (or this environment) cannot run, refused before any work."""
    if cfg.attn_backend in ("cudnn", "efficient") and device.type != "cuda":
        raise UserError(f"--attn-backend {cfg.attn_backend} is a CUDA kernel; on {device.type} use auto, flash or math")
    if cfg.fp8:
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise UserError(f"--fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                            f"this run is on {device.type}"
                            + (f" (capability {torch.cuda.get_device_capability(device)})" if device.type == "cuda"
                               else ""))
        try:
            import torchao.float8  # noqa: F401
        except ImportError as e:
            raise UserError(f"--fp8 needs torchao (pip install torchao, a version built for torch "
                            f"{torch.__version__.split('+')[0]}): {e}") from None


def convert_to_fp8(model: GPT) -> None:
    """torchao's float8 training (tensorwise scaling) for every Linear whose sides are multiples of 16; the tied
    head (F.linear on the embedding) and everything else stay in autocast's bf16."""
    from torchao.float8 import convert_to_float8_training
    convert_to_float8_training(model, module_filter_fn=lambda module, name: isinstance(module, torch.nn.Linear)
                               and module.in_features % 16 == 0 and module.out_features % 16 == 0)


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


def parse_command_line(argv=None) -> argparse.Namespace:
    """Every TrainConfig flag, --config, and --check."""
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser)
    parser.add_argument("--check", type=positive_int, nargs="?", const=1, metavar="PROCESSES",
                        help="only check the configuration for a run on PROCESSES processes (default 1) and exit: "
                             "0 when it would start, else the one-line error; writes nothing (a launcher runs it "
                             "before torchrun, whose restarts cannot fix a configuration)")
    return parser.parse_args(argv)


def parse_config(argv=None) -> tuple[TrainConfig, str]:
    """(config, preset name) from the command line."""
    return config_from_flags(vars(parse_command_line(argv)))


def check_config(cfg: TrainConfig, processes: int) -> None:
    """--check: what a run of `cfg` on `processes` processes refuses at its start, found without writing anything
    or starting processes: every flag's rule, the device, the split of the token batch, the data directory."""
    cfg.validate()
    check_device_levers(cfg, pick_device(cfg.device))
    if cfg.micro_batch == "auto":
        micro_batch_candidates(cfg.total_batch_tokens, cfg.seq_len, processes)
    else:
        grad_accum_steps(cfg.total_batch_tokens, int(cfg.micro_batch), cfg.seq_len, processes)
    ShardDataset.open(cfg.data)
    if cfg.resume and cfg.out:  # the checkpoint the run would resume from: none, damaged, past the last step
        checkpoint_to_resume(cfg, cfg.out)
    if cfg.init_from:  # the checkpoint the run would start from, resolved as the run does (read, nothing moved)
        load_checkpoint(cfg.init_from, map_location="cpu")


RESUME_STATE_KEYS = ("model_config", "model", "optimizer", "train_config", "step", "tokens_seen", "world_size",
                     "micro_batch", "loader", "rng")  # a checkpoint's entries, in the order a save writes them


def checkpoint_to_resume(cfg: TrainConfig, run_dir) -> tuple[dict | None, Path | None, dict[Path, str], int]:
    """--resume's choice, read-only (the run and --check both use it): (state, path, damaged, steps left) of the
    newest valid checkpoint of `run_dir` ({path: what is wrong} of newer damaged ones). Refused (UserError): a
    checkpoint without training state (a weights-only file), one past the run's last step (steps_left), and, without
    --allow-fresh-start, a run directory whose checkpoints are all damaged or that has none. Nothing is moved."""
    folder = checkpoint_dir(run_dir)
    # a sharded checkpoint's weights stay on disk: load_state_dict reads them straight into this run's layout
    state, path, damaged = newest_valid_checkpoint(run_dir, map_location="cpu", weights=False)
    if state is not None:
        in_shard_files = ("model", "optimizer") if is_sharded_checkpoint(path) else ()
        missing = [key for key in RESUME_STATE_KEYS if key not in state and key not in in_shard_files]
        if missing:  # a weights-only file (export_hf --from-hf) is refused before anything is touched
            raise UserError(f"checkpoint {path} holds no training state ({', '.join(missing)} missing); start a new "
                            f"run from its weights with --init-from {path}")
        return state, path, damaged, steps_left(state["step"], path, cfg.max_steps, cfg.stop_at_step)
    if damaged and not cfg.allow_fresh_start:
        raise UserError(f"--resume: every checkpoint in {folder} is damaged (" + "; ".join(damaged.values())
                        + "). Nothing was changed: add --allow-fresh-start to move them aside (renamed "
                        "*.damaged) and train again from step 0")
    if not cfg.allow_fresh_start:
        raise UserError(f"--resume: no checkpoint in {folder}; add --allow-fresh-start to start from scratch "
                        "when there is none")
    return None, None, damaged, 0


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


class StepTimer:
    """Seconds per optimizer step over a logging window, with evaluations and saves (timed in `paused`) left out.
    On CUDA each reading drains the GPU first, so queued work counts where it ran; readings happen only at log
    steps and around evaluations, never in a plain step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start, self.steps, self.paused_s = self.now(), 0, 0.0

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        start = self.now()
        yield
        self.paused_s += self.now() - start

    def step_done(self) -> None:
        self.steps += 1

    def lap(self) -> float:
        """Mean seconds per step since the last lap; starts the next window."""
        end = self.now()
        per_step = (end - self.start - self.paused_s) / max(1, self.steps)
        self.start, self.steps, self.paused_s = end, 0, 0.0
        return per_step


class Trainer:
    """One process's share of a training run: model, optimizer, loader and step, the loop (run) and the state a
    checkpoint holds (state_dict / load_state_dict)."""

    def __init__(self, cfg: TrainConfig, preset: str, d: Dist, device: torch.device):
        cfg.validate()
        check_device_levers(cfg, device)
        if cfg.fsdp:
            require_fsdp()
            if not dist.is_initialized():
                raise UserError("--fsdp shards the model over torchrun's processes: run it under torchrun "
                                "(torchrun --nproc_per_node=N train.py ... --fsdp; N=1 works), or leave --fsdp out")
        self.cfg, self.d, self.device = cfg, d, device
        self.on_cuda = device.type == "cuda"
        self.run_dir = self._make_run_dir(preset)
        self.log = RunLog(self.run_dir, d.is_main)
        if d.is_main:
            self._remove_orphaned_saves()
        # One process per node checks every shard's sha256 against the manifest (a corrupt shard is refused).
        self.dataset = ShardDataset.open(cfg.data, verify_sha256=cfg.verify_data and d.local_rank == 0)
        self.model_config = cfg.model_config()
        self.model = GPT(self.model_config, seed=cfg.seed).to(device)
        if cfg.activation_checkpointing:
            self.model.enable_activation_checkpointing()
        self.model.set_attention_backend(cfg.attn_backend)
        if cfg.loss_chunk_rows:
            self.model.enable_chunked_loss(cfg.loss_chunk_rows)
        if cfg.fp8:
            convert_to_fp8(self.model)
        resume = self._checkpoint_to_resume()
        self.micro_batch = self._choose_micro_batch(resume and resume[0])
        self.accum = grad_accum_steps(cfg.total_batch_tokens, self.micro_batch, cfg.seq_len, d.world_size)
        if cfg.fsdp:  # before the optimizer is made: it must hold the shards
            shard_model(self.model, mixed_precision=self.on_cuda and cfg.autocast)
        self.optimizer = self.model.configure_optimizer(cfg.max_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
        self.loader = TrainLoader(self.dataset, self.micro_batch, cfg.seq_len, rank=d.rank, world_size=d.world_size,
                                  seed=cfg.seed, device=device, log=self.log.info)
        self.step = 0  # optimizer steps done
        self.flops_per_token = self.model.flops_per_token(cfg.seq_len)
        self.peak = cfg.peak_flops or (peak_flops(torch.cuda.get_device_name(device)) if self.on_cuda else None)
        self.stop_requested = False  # set by SIGTERM/SIGINT
        self.hellaswag = None  # examples, loaded at the first HellaSwag evaluation
        seed_everything(cfg.seed + d.rank)  # ranks draw different dropout masks
        if resume:
            self.load_state_dict(*resume)
        else:
            self._start_fresh()
        self.resumed = resume is not None
        if len(set(d.gather(self.step))) > 1:
            raise UserError(f"the processes found different checkpoints in {self.run_dir}; on several nodes the run "
                            "directory must be on a filesystem that every node shares")
        self.forward_model = self._wrap_model()

    # --- setup ---

    def _make_run_dir(self, preset: str) -> Path:
        """--out, or temp_data/runs/<preset>-<time> named by rank 0; its checkpoint folder is made writable now, not
        found unwritable after the first hours of training."""
        run_dir = Path(self.cfg.out or self.d.gather(f"temp_data/runs/{preset}-{time.strftime('%Y%m%d-%H%M%S')}")[0])
        if self.d.is_main:
            ensure_writable_dir(checkpoint_dir(run_dir), "--out")
        self.d.barrier()
        return run_dir

    def _choose_micro_batch(self, resumed: dict | None) -> int:
        """--micro-batch, or for auto the largest divisor of this process's share that fits in memory (on every
        rank the same). A resume in the layout that saved keeps that layout's choice: a bit-exact continuation."""
        cfg = self.cfg
        if cfg.micro_batch != "auto":
            return int(cfg.micro_batch)
        candidates = micro_batch_candidates(cfg.total_batch_tokens, cfg.seq_len, self.d.world_size)
        if resumed and resumed["world_size"] == self.d.world_size and resumed["micro_batch"] in candidates:
            return resumed["micro_batch"]
        if self.on_cuda:
            fits = cuda_memory_probe(self.model, cfg.seq_len, self.device, self.autocast,
                                     stand_in_copies=2 + (self.d.world_size > 1))  # AdamW moments (+ DDP buckets)
        else:
            fits = lambda batch: batch <= CPU_AUTO_MICRO_BATCH  # noqa: E731
        batch = min(self.d.gather(largest_fitting(candidates, fits)))
        if batch == 0:  # raised on every rank at once, so none waits for the others
            raise UserError("even a micro-batch of 1 sequence does not fit in device memory; "
                            "try --activation-checkpointing or a shorter --seq-len")
        self.log.info(f"micro-batch auto: {batch} sequences of {cfg.seq_len} tokens")
        return batch

    def _checkpoint_to_resume(self) -> tuple[dict, Path] | None:
        """(state, path) of the newest valid checkpoint when --resume, else None. Damaged checkpoints newer than it
        are moved aside (renamed *.damaged, never deleted) and the steps they held are named as lost. When every
        checkpoint is damaged, only --allow-fresh-start starts again from step 0; without it nothing is touched."""
        cfg, folder = self.cfg, checkpoint_dir(self.run_dir)
        if not cfg.resume:
            return None
        if not self.d.is_main:  # rank 0 decides and moves damaged files first: then every rank finds the same
            self.d.barrier()
        try:
            state, path, damaged, left = checkpoint_to_resume(cfg, self.run_dir)
            if state is not None and left == 0:
                if self.d.is_main:  # (steps_left refuses a checkpoint past the last step)
                    for candidate, error in damaged.items():  # named, though left in place: nothing is touched
                        print(f"warning: skipping {candidate}: {error}", file=sys.stderr)
                    print(f"resume: {path} is at step {state['step']}, this run's last step: nothing to train, "
                          "nothing changed")
                raise SystemExit(0)
            if damaged and self.d.is_main:
                for error, new in zip(damaged.values(), set_aside(list(damaged), ".damaged")):
                    self.log.info(f"resume: WARNING: moved a damaged checkpoint aside to {new}: {error}")
                lost = max(checkpoint_step(p) for p in damaged)
                self.log.info(f"resume: WARNING: steps {state['step'] + 1 if state else 1}-{lost} are lost and will "
                              f"be trained again: the newest good checkpoint is "
                              + (f"step {state['step']}" if state else "none"))
        finally:
            if self.d.is_main:
                self.d.barrier()
        if state is None:  # (checkpoint_to_resume refused this without --allow-fresh-start)
            self.log.info(f"resume: WARNING: no valid checkpoint in {folder}, training starts from step 0"
                          + (" (every checkpoint was damaged)" if damaged else ""))
            return None
        return state, path

    def _start_fresh(self) -> None:
        if self.cfg.init_from:
            state, path = load_checkpoint(self.cfg.init_from, map_location="cpu")
            self._check_model_config(state, path, ignore=("attn_dropout", "ffn_dropout"))
            load_weights(self.model, state["model"])
            self.log.info(f"init: weights from {path}")
        if list_checkpoints(self.run_dir):
            raise UserError(f"{self.run_dir} already holds checkpoints; add --resume to continue that run, "
                            "or choose a new --out")
        if self.d.is_main:
            (self.run_dir / "metrics.jsonl").write_text("")  # events of an attempt that never checkpointed

    def _check_model_config(self, state: dict, path: Path, ignore=()) -> None:
        ours, theirs = dataclasses.asdict(self.model_config), state["model_config"]
        diff = {k: (v, theirs.get(k)) for k, v in ours.items() if theirs.get(k) != v and k not in ignore}
        if diff:
            raise UserError(f"checkpoint {path} is from a different model config (field: (ours, checkpoint's)): {diff}")

    def _wrap_model(self):
        model = self.model
        if self.cfg.compile:
            model = torch.compile(model)
        if self.d.world_size > 1 and not self.cfg.fsdp:
            # no buffer broadcast: the only buffers, the RoPE tables, are computed identically on every rank
            model = DDP(model, device_ids=[self.device.index] if self.on_cuda else None, broadcast_buffers=False)
        return model

    # --- the training state: what a checkpoint holds, and how it is restored ---

    STATE_KEYS = RESUME_STATE_KEYS

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly. Every rank calls it: it gathers each rank's RNG state.
        Under --fsdp the model and optimizer entries are this process's shards: save() writes them with DCP."""
        state = {
            "model_config": dataclasses.asdict(self.model_config),  # the architecture, for every reader of the file
            "model": self.model.state_dict(),  # the plain module's: no compile or DDP prefixes
            "optimizer": self.optimizer.state_dict(),  # AdamW moments and step counts
            "train_config": dataclasses.asdict(self.cfg),  # the recipe, for the record and the resume checks
            "step": self.step,  # optimizer steps done: the LR schedule's position
            "tokens_seen": self.loader.state_dict()["window"] * self.cfg.seq_len,
            "world_size": self.d.world_size,  # the layout that wrote it (a resume may use another)
            "micro_batch": self.micro_batch,
            "loader": self.loader.state_dict(),  # the data stream's position: the same on every rank
            "rng": self.d.gather(rng_state()),  # every rank's generators: its dropout masks
        }
        assert tuple(state) == self.STATE_KEYS
        return state

    def load_state_dict(self, state: dict, path: Path) -> None:
        """Continue from state_dict()'s output. Weights, optimizer state, step and data position are restored
        exactly under any process count and micro-batch that keep the token batch; the RNG streams only in the
        layout that saved them (elsewhere dropout draws from fresh streams)."""
        cfg, saved_cfg = self.cfg, state["train_config"]
        self._check_model_config(state, path)
        if saved_cfg["total_batch_tokens"] != cfg.total_batch_tokens and not cfg.allow_token_batch_change:
            raise UserError(f"checkpoint {path} was trained with --total-batch-tokens {saved_cfg['total_batch_tokens']}"
                            f", this run asks for {cfg.total_batch_tokens}: resume with the checkpoint's value (the "
                            "process count and micro-batch may change), or add --allow-token-batch-change to continue "
                            "the data where it stopped with steps of the new size")
        # (a field that did not exist when the checkpoint was written is no change)
        changed = {k for k, v in dataclasses.asdict(cfg).items() if k in saved_cfg and saved_cfg[k] != v
                   and k not in ("resume", "allow_fresh_start", "stop_at_step", "allow_token_batch_change")}
        if changed:
            self.log.info(f"resume: these settings differ from the checkpoint's run: {sorted(changed)}")
        load_training_state(self.model, self.optimizer, state, path, group=self.d.control)  # .pt or sharded, any layout
        loader = state["loader"]
        self.loader.load_state_dict(loader[0] if isinstance(loader, list) else loader)  # (a list: one per rank, v1)
        self.step = state["step"]
        saved_layout = (state["world_size"], state["micro_batch"])
        if saved_layout == (self.d.world_size, self.micro_batch):
            set_rng_state(state["rng"][self.d.rank])
        else:
            self._log_layout_change(*saved_layout, saved_cfg)
        if self.d.is_main:
            drop_metrics_after(self.run_dir, self.step)
        self.log.info(f"resume: continuing after step {self.step} from {path}")

    def _log_layout_change(self, world_size: int, micro_batch: int, saved_cfg: dict) -> None:
        seed_everything(hash((self.cfg.seed, self.d.rank, self.step)) % 2 ** 32)  # new streams, still reproducible
        # the saved layout's own token batch and seq-len (--allow-token-batch-change may have changed them)
        saved_accum = saved_cfg["total_batch_tokens"] // (saved_cfg["seq_len"] * world_size * micro_batch)
        self.log.info(f"resume: layout changed: {world_size} processes x micro-batch {micro_batch} x {saved_accum} "
                      f"accumulation steps -> {self.d.world_size} x {self.micro_batch} x {self.accum}. Weights, "
                      "optimizer state, step and data position continue exactly; not bit for bit: dropout masks "
                      "(fresh RNG streams per rank) and the order in which gradients are summed")
        self.log.metrics({"step": self.step, "world_size": self.d.world_size, "micro_batch": self.micro_batch,
                          "previous_world_size": world_size, "previous_micro_batch": micro_batch})

    def save(self) -> None:
        """A .pt file written by rank 0, or under --fsdp a sharded folder every process writes its shards into."""
        state = self.state_dict()
        path = checkpoint_path(self.run_dir, self.step, sharded=self.cfg.fsdp)
        if self.d.is_main:
            self._remove_orphaned_saves()  # before writing: their space may be what this save needs
        if self.cfg.fsdp:
            extra = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
            save_sharded_checkpoint(path, self.model, self.optimizer, extra, group=self.d.control)
        elif self.d.is_main:
            save_checkpoint(state, path)
        if self.d.is_main:
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints, saved=path)
            self.log.info(f"step {self.step:6d} | checkpoint {path}")
        self.d.barrier()

    def _remove_orphaned_saves(self) -> None:
        for path in remove_orphaned_temp_files(self.run_dir):
            self.log.info(f"removed {path}, the temporary file of a save that was killed")

    # --- the loop ---

    def autocast(self):
        if self.on_cuda and self.cfg.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Optimizer step number self.step over one token batch. Returns (mean loss over micro-steps, pre-clip grad
        norm) as device tensors: nothing here waits for the GPU."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y = self.loader.next_batch()
            last = micro == self.accum - 1
            with self._gradient_sync(last):
                with self.autocast():
                    # only the loss is kept: the (B, T, V) bf16 logits are freed now instead of living through
                    # backward (which needs only the float32 log-softmax saved by the loss)
                    loss = self.forward_model(x, y)[1]
                (loss / self.accum).backward()
            loss_sum += loss.detach()
        grad_norm = clip_grad_norm(self.model.parameters(), self.cfg.grad_clip)  # the global norm, also over shards
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / self.accum, grad_norm

    def _gradient_sync(self, last: bool):
        """DDP all-reduces gradients only on a step's last micro-step; earlier ones accumulate locally. FSDP
        reduce-scatters on every micro-step instead, so its gradients stay sharded: accumulating them unsharded
        (set_requires_gradient_sync(False)) would hold the whole model's fp32 gradients on every process."""
        if last or self.d.world_size == 1 or self.cfg.fsdp:
            return contextlib.nullcontext()
        return self.forward_model.no_sync()

    def run(self) -> int:
        """Train to max_steps (or --stop-at-step, or a signal). Steps are counted in optimizer updates done: the
        evaluations and the checkpoint "at step S" see the weights after S updates, and the train event of step S
        is update S itself (0-based), the one that takes the weights from step S to S + 1."""
        cfg, d = self.cfg, self.d
        header, config = self._log_header()
        last_step = end_step(cfg.max_steps, cfg.stop_at_step)
        first_step, stop = self.step, False
        timer = StepTimer(self.device)
        bad_step = torch.full((), -1, device=self.device, dtype=torch.long)  # first update with a NaN/inf loss
        self._install_signal_handlers()
        with self._open_trackers(header, config), tqdm(total=last_step, initial=self.step, desc="train", unit="step",
                                                       disable=not d.is_main, dynamic_ncols=True) as bar:
            while True:
                step = self.step
                # Evaluations and the checkpoint at step S (all evaluations at the final step). A resumed run
                # evaluated its first step before it saved that checkpoint.
                evaluate = step > first_step or not self.resumed
                final = step == cfg.max_steps
                due_val = evaluate and (final or due_at(step, cfg.eval_every))
                due_hellaswag = evaluate and (final or due_at(step, cfg.hellaswag_every))
                due_samples = evaluate and (final or due_at(step, cfg.sample_every))
                due_save = step > first_step and (due_at(step, cfg.ckpt_every) or step == last_step or stop)
                if due_val or due_hellaswag or due_samples or due_save:
                    with timer.paused():
                        # forked RNG streams: evaluations leave the training's random state as they found it
                        with torch.random.fork_rng(devices=[self.device] if self.on_cuda else []), \
                                self._whole_model_evaluated(due_val or due_hellaswag or due_samples):
                            if due_val:
                                self.eval_val_loss(step)
                            if due_hellaswag:
                                self.eval_hellaswag(step)
                            if due_samples:
                                self.eval_samples(step)
                        if due_save:
                            self._check_finite(bad_step)  # weights after a NaN must not become a checkpoint
                            self.save()
                if step == last_step or stop:
                    break

                loss, grad_norm = self.train_step()
                finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
                bad_step = torch.where((bad_step < 0) & ~finite, step, bad_step)  # on the device: no sync
                self.step += 1
                timer.step_done()
                bar.update(1)
                stop = d.any(self.stop_requested)  # every rank stops after the same step
                if due_at(self.step, cfg.log_every) or self.step == last_step or stop:
                    self._check_finite(bad_step)
                    self._log_train(step, loss, grad_norm, timer.lap())
                elif step == first_step:
                    timer.lap()  # this process's first step compiles the model: never averaged into a window
                if step == first_step:
                    self._log_state_bytes()
        if stop:
            self.log.info(f"stopped by signal after step {self.step}; checkpoint written. "
                          f"Continue with the same command plus --resume")
        self.log.info(f"done: {self.step} steps, {self.loader.state_dict()['window'] * cfg.seq_len:,} tokens, "
                      f"run directory {self.run_dir}")
        return 0

    @contextlib.contextmanager
    def _whole_model_evaluated(self, evaluating: bool):
        """Under --fsdp, self.model is a whole plain copy while evaluations run (sharding.whole_model), the sharded
        model again afterwards; without --fsdp the model itself is evaluated."""
        if not (self.cfg.fsdp and evaluating):
            yield
            return
        sharded, self.model = self.model, whole_model(self.model, self.device)
        try:
            yield
        finally:
            self.model = sharded

    def _log_state_bytes(self) -> None:
        """Rank 0's measured parameter and AdamW state bytes (after the first step: AdamW makes its state then)."""
        params, moments = training_state_bytes(self.model, self.optimizer)
        self.log.info(f"memory: parameters {params:,} bytes + optimizer state {moments:,} bytes on this process"
                      + (f" (its shards, of {self.d.world_size})" if self.cfg.fsdp else ""))

    def _check_finite(self, bad_step: torch.Tensor) -> None:
        """Stop every rank when any rank saw a NaN/inf loss or gradient (the first such step is kept on the
        device and read only here, at log and save steps)."""
        step = max(self.d.gather(int(bad_step.item())))
        if step >= 0:
            if self.d.is_main:  # weights saved at or after that step produced it: --resume must not pick them
                quarantine_checkpoints(self.run_dir, from_step=step)
            good = list_checkpoints(self.run_dir)
            raise NonFiniteLoss(f"loss or gradient became NaN/inf at step {step}; "
                                + (f"the last good checkpoint is {good[-1]}" if good else "no checkpoint before it")
                                + " (try a lower --max-lr, then --resume)")

    def _log_train(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, step_s: float) -> None:
        tokens_per_s = self.cfg.total_batch_tokens / step_s
        util = mfu(self.flops_per_token, tokens_per_s / self.d.world_size, self.peak)
        event = {"step": step, "loss": self.d.mean(loss).item(), "lr": lr_at(step, self.cfg),
                 "grad_norm": grad_norm.item(), "step_ms": step_s * 1000, "tokens_per_s": tokens_per_s,
                 "mfu": util, "tokens": self.loader.state_dict()["window"] * self.cfg.seq_len}
        self.log.metrics(event)
        self.log.info(f"step {step:6d} | loss {event['loss']:.4f} | lr {event['lr']:.2e} | "
                      f"norm {event['grad_norm']:.3f} | {event['step_ms']:.0f} ms | {tokens_per_s:,.0f} tok/s"
                      + (f" | mfu {util:.1%}" if util is not None else ""))

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True
            signal.signal(signum, signal.SIG_DFL)  # a second signal stops the process at once
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    # --- evaluations (each restores the model's train/eval mode) ---

    @torch.no_grad()
    def eval_val_loss(self, step: int) -> None:
        max_tokens = self.cfg.final_val_tokens if step == self.cfg.max_steps else self.cfg.val_tokens
        total, batches = torch.zeros((), device=self.device), 0
        with evaluating(self.model):
            for x, y in val_batches(self.dataset, self.micro_batch, self.cfg.seq_len, self.d.rank, self.d.world_size,
                                    max_tokens=max_tokens or None, device=self.device):
                with self.autocast():
                    total += self.model(x, y)[1]
                batches += 1
        val = self.d.mean(total / max(1, batches))
        self.log.metrics({"step": step, "val_loss": val.item()})
        self.log.info(f"step {step:6d} | val loss {val.item():.4f} ({batches * self.d.world_size} batches)")

    def eval_hellaswag(self, step: int) -> None:
        if self.hellaswag is None:  # loaded once per run; rank 0 downloads the official split (if needed) first
            if not self.d.is_main:
                self.d.barrier()
            self.hellaswag = load_examples(self.cfg.hellaswag_data or None, limit=self.cfg.hellaswag_limit or None)
            if self.d.is_main:
                self.d.barrier()
        result = evaluate_hellaswag(self.model, self.hellaswag, self.device, batch_size=self.micro_batch,
                                    rank=self.d.rank, world_size=self.d.world_size)
        self.log.metrics({"step": step, "hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"]})
        self.log.info(f"step {step:6d} | hellaswag acc_norm {result['acc_norm']:.4f} acc {result['acc']:.4f} "
                      f"({result['total']} examples)")

    def eval_samples(self, step: int) -> None:
        if not self.cfg.sample_prompts or not self.d.is_main:
            return
        texts = generate_samples(self.model, list(self.cfg.sample_prompts), self.cfg.sampling(), self.cfg.seed,
                                 self.device)
        self.log.metrics({"step": step, "samples": [{"prompt": p, "text": t}
                                                    for p, t in zip(self.cfg.sample_prompts, texts)]})
        for prompt, text in zip(self.cfg.sample_prompts, texts):
            self.log.info(f"step {step:6d} | sample | {prompt!r} -> {text!r}")

    # --- the run's record ---

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
            write_json(self.run_dir / "config.json", config)
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
        error = self.d.gather(error)[0]
        if error:
            raise UserError(error)
        return self.log.trackers


@main_entry(memory_hint="try --micro-batch auto (the largest that fits), a lower --micro-batch (accumulation keeps the "
                        "token batch) or --activation-checkpointing")
def main(argv=None) -> int:
    args = parse_command_line(argv)
    cfg, preset = config_from_flags(vars(args))
    if args.check:
        check_config(cfg, args.check)
        print(f"train.py --check: the configuration holds for {args.check} process(es)")
        return 0
    d, device = init_distributed(cfg.device)
    try:
        enable_tf32(device)
        return Trainer(cfg, preset, d, device).run()
    except NonFiniteLoss as e:
        fail(str(e), status=3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    exit_with(main)
