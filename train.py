"""Pre-train a GPT: one process (CUDA, MPS or CPU) or torchrun DDP over GPUs and nodes, exactly resumable.

  python train.py --config debug --data temp_data/data/embedded --out temp_data/runs/debug
  torchrun --nproc_per_node=8 train.py --config lf_llm_269m --data temp_data/data/fineweb_edu_10bt --out RUN --resume

Every TrainConfig field is a --kebab-case flag (`--max-lr 1e-3`); `--config` picks the preset they override.
A run directory holds config.json, train.log, metrics.jsonl, checkpoints/step_NNNNNN.pt and train.lock (locked by
the run using it). A checkpoint holds everything needed to continue exactly: model, optimizer, step, loader position
and every rank's RNG states
(bit-for-bit on CPU; on CUDA up to the rounding of kernels that add in a varying order, as between any two GPU runs).
SIGTERM/SIGINT finish the current step, checkpoint and exit 0; `--resume` continues from the newest valid
checkpoint; under `torchrun --max-restarts=K ... --resume --allow-fresh-start` a crashed worker group restarts
from the last checkpoint.
"""
import argparse
import cli
import contextlib
import dataclasses
import math
import os
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import (INIT_IGNORED_FIELDS, RESUME_STATE_KEYS, RunCheckpoints, check_model_config, checkpoint_dir,
                        checkpoint_to_resume, end_step, human_size, list_checkpoints, load_checkpoint,
                        load_training_state, quarantine_checkpoints, rng_state, seed_everything, set_rng_state)
from cli import (UserError, ensure_writable_dir, fail, lock_exclusively, lock_holder, main_entry, positive_int,
                 raise_all, run_header)
from config import (DEFAULT_RUNS_DIR, RUN_LOCK_FILE, TrainConfig, add_config_flags, config_from_flags, in_use_message,
                    input_problems)
from dataloader import (ShardDataset, TrainLoader, check_train_batch, check_val_batch, largest_train_batch,
                        largest_val_batch, val_batches)
from devices import (Dist, checked_device, cuda_memory_probe, enable_tf32, exit_with, init_distributed,
                     largest_fitting, launched_by_torchrun, memory_bytes, mfu, peak_flops)
from generate import generate_samples
from hellaswag_eval import evaluate_hellaswag, load_examples
from model import GPT, evaluating
from sharding import clip_grad_norm, evaluated, is_sharded, load_weights, parallelize, require_fsdp, \
    training_state_bytes
from plot_metrics import scan_metrics
from trackers import RunLog, drop_metrics_after, missing_packages, parse_trackers

# ----------------------------------------------------------------------------------------------------------------
# The schedule, the batch split, and the checks before a run

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


def choose_micro_batch(cfg: TrainConfig, d: Dist, dataset: ShardDataset, model: GPT, device: torch.device, autocast,
                       resumed: dict | None, log) -> int:
    """--micro-batch, or for auto the largest divisor of this process's share that the data holds and that fits in
    memory (on every rank the same). A resume in the layout that saved keeps that layout's choice: a bit-exact
    continuation."""
    if cfg.micro_batch != "auto":
        return int(cfg.micro_batch)
    held = largest_micro_batch_in_data(cfg, dataset, d.world_size)  # (check_run found it 1 or more)
    candidates = [b for b in micro_batch_candidates(cfg.total_batch_tokens, cfg.seq_len, d.world_size) if b <= held]
    if resumed and resumed["world_size"] == d.world_size and resumed["micro_batch"] in candidates:
        return resumed["micro_batch"]
    if device.type == "cuda":
        fits = cuda_memory_probe(model, cfg.seq_len, device, autocast,
                                 stand_in_copies=2 + (d.world_size > 1))  # AdamW moments (+ DDP buckets)
    else:
        fits = lambda batch: batch <= CPU_AUTO_MICRO_BATCH  # noqa: E731
    batch = min(d.gather(largest_fitting(candidates, fits)))
    if batch == 0:  # raised on every rank at once, so none waits for the others
        raise UserError("even a micro-batch of 1 sequence does not fit in device memory; "
                        "try --activation-checkpointing or a shorter --seq-len")
    log(f"micro-batch auto: {batch} sequences of {cfg.seq_len} tokens")
    return batch


def check_run(cfg: TrainConfig, under_torchrun: bool, processes: int, device: torch.device | None = None
              ) -> torch.device:
    """Everything a run on `processes` processes refuses before it starts (before its run directory is made),
    checked here once and named in one line: every flag value and pair of flags (TrainConfig.problems, no I/O), what
    the flags name on disk (input_problems), the chosen tracker packages (imported now: every rank stops before the
    first collective), the device (`device`, the one the run was given, or else the one --device names), and, each
    once the values it reads hold, the split of the token batch over the processes and what the batch needs of the
    data. Then what this device and launch cannot run. Returns the device."""
    flagged = cfg.problems()

    def holding(*fields) -> bool:  # the values a later check reads are valid: it is judged beside the problems
        return not flagged.keys() & set(fields)
    _, run_device, *_ = raise_all(
        lambda: check_flags_and_inputs(cfg, flagged),
        lambda: device if device is not None else checked_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0))),
        lambda: holding("total_batch_tokens", "seq_len", "micro_batch") and check_batch_split(cfg, processes),
        lambda: holding("seq_len", "micro_batch", "eval_every", "val_tokens", "final_val_tokens")
        and check_data_holds_a_micro_batch(cfg, processes))
    check_device_levers(cfg, run_device, under_torchrun)
    check_samples_fit(cfg, run_device)
    return run_device


def check_flags_and_inputs(cfg: TrainConfig, flagged: dict[str, str]) -> None:
    """The flags' values (`flagged`: cfg.problems()), what they name on disk and the tracker packages, in one line."""
    problems = [*flagged.values(), *input_problems(cfg)]
    with contextlib.suppress(UserError):  # (an unknown tracker name is one of cfg.problems())
        problems += missing_packages(parse_trackers(cfg.tracker))
    if problems:
        raise UserError("; ".join(problems))


def val_token_limit(cfg: TrainConfig) -> tuple[str, int | None]:
    """The flag and value of the fewest validation tokens an evaluation of this run reads (None: the whole split):
    --final-val-tokens at the last step, which always evaluates, and --val-tokens at the periodic evaluations
    (--eval-every above 0); 0 means the whole split."""
    limits = [(flag, tokens) for flag, tokens in (("--final-val-tokens", cfg.final_val_tokens),
                                                  ("--val-tokens", cfg.val_tokens if cfg.eval_every else 0)) if tokens]
    return min(limits, key=lambda limit: limit[1], default=("", None))


def largest_micro_batch_in_data(cfg: TrainConfig, dataset: ShardDataset, processes: int) -> int:
    """The largest micro-batch the data holds: the windows of one train shard (TrainLoader), and on each process a
    validation batch under the run's fewest validation tokens (val_batches)."""
    return min(largest_train_batch(dataset, cfg.seq_len),
               largest_val_batch(dataset, cfg.seq_len, processes, val_token_limit(cfg)[1]))


def check_data_holds_a_micro_batch(cfg: TrainConfig, processes: int) -> None:
    """The train shards hold a micro-batch, and the val split a validation batch for each process under the run's
    fewest validation tokens (for --micro-batch auto: of 1, the least it chooses); found now, not by the loaders after
    the run directory is made. The manifest and shard headers only (the run checks their sha256)."""
    try:
        dataset = ShardDataset.open(cfg.data)
    except UserError:  # (input_problems names it)
        return
    batch = 1 if cfg.micro_batch == "auto" else int(cfg.micro_batch)
    flag, limit = val_token_limit(cfg)
    raise_all(lambda: check_train_batch(dataset, batch, cfg.seq_len),
              lambda: check_val_batch(dataset, batch, cfg.seq_len, processes, limit, flag))


def check_batch_split(cfg: TrainConfig, processes: int) -> None:
    """The token batch splits into whole micro-batches on every process (with --micro-batch N: N divides the share)."""
    if cfg.micro_batch == "auto":
        micro_batch_candidates(cfg.total_batch_tokens, cfg.seq_len, processes)
    else:
        grad_accum_steps(cfg.total_batch_tokens, int(cfg.micro_batch), cfg.seq_len, processes)


def check_device_levers(cfg: TrainConfig, device: torch.device, under_torchrun: bool) -> None:
    """Speed and parallelism flags this device (or this launch) cannot run, refused before any work."""
    if cfg.fsdp:
        require_fsdp()
        if not under_torchrun:
            raise UserError("--fsdp shards the model over torchrun's processes: run it under torchrun "
                            "(torchrun --nproc_per_node=N train.py ... --fsdp; N=1 works), or leave --fsdp out")
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


SAMPLE_BYTES_PER_TOKEN = 16  # generate's int64 token ids: its output buffer, and the copy it returns


def check_samples_fit(cfg: TrainConfig, device: torch.device) -> None:
    """The samples' token ids fit in the memory of `device` (--sample-tokens 10**12 ran out of it at the last step,
    after the whole run). Only what sampling allocates per token is judged here: any length that passes can still
    take long to generate."""
    if not cfg.sample_prompts:
        return
    needed, held = cfg.sample_tokens * SAMPLE_BYTES_PER_TOKEN, memory_bytes(device)
    if needed > held:
        raise UserError(f"--sample-tokens {cfg.sample_tokens}: a sample that long needs {human_size(needed)} of "
                        f"{device.type} memory for its token ids alone, more than the {human_size(held)} there; "
                        "lower --sample-tokens")


def check_resumable(cfg: TrainConfig, state: dict, path: Path, loader: TrainLoader) -> None:
    """What checkpoint `path` (its `state`) cannot continue under this run's settings, named in one line: another
    model, another token batch (unless --allow-token-batch-change), and what its data position holds only with (the
    data, --seq-len, --seed): `loader` takes that position, by its own rule. A run applies it before it moves a
    damaged newer checkpoint aside, and again when it loads the state (into its loader); --check applies it too."""
    saved_cfg, saved_loader = state["train_config"], state["loader"]

    def same_token_batch():
        if saved_cfg["total_batch_tokens"] != cfg.total_batch_tokens and not cfg.allow_token_batch_change:
            raise UserError(f"checkpoint {path} was trained with --total-batch-tokens {saved_cfg['total_batch_tokens']}"
                            f", this run asks for {cfg.total_batch_tokens}: resume with the checkpoint's value (the "
                            "process count and micro-batch may change), or add --allow-token-batch-change to continue "
                            "the data where it stopped with steps of the new size")

    def data_position():
        try:  # (a list: one per rank, v1)
            loader.load_state_dict(saved_loader[0] if isinstance(saved_loader, list) else saved_loader)
        except UserError as e:
            raise UserError(f"checkpoint {path}: {e}") from None
    raise_all(lambda: check_model_config(cfg.model_config(), state, path), same_token_batch, data_position)


def missing_final_evaluations(run_dir: Path, cfg: TrainConfig) -> set[str]:
    """The evaluations of the last step (the metrics.jsonl keys they log) that the run's metrics.jsonl lacks (read
    where a resume finds the run at its last step: else they all run anyway)."""
    expected = {"val_loss", "hellaswag_acc", *(["samples"] if cfg.sample_prompts else [])}
    events = scan_metrics(run_dir)[1] if (run_dir / "metrics.jsonl").is_file() else []
    return expected - set().union(*(event.keys() for event in events if event["step"] == cfg.max_steps))


def position_checker(cfg: TrainConfig) -> TrainLoader:
    """A loader of this run's data, seq-len and seed for check_resumable to try a saved position on, before the run
    has its own (a micro-batch of 1 on one process: the stream's position is the same in every layout)."""
    return TrainLoader(ShardDataset.open(cfg.data), 1, cfg.seq_len, seed=cfg.seed)


def convert_to_fp8(model: GPT) -> None:
    """torchao's float8 training (tensorwise scaling) for every Linear whose sides are multiples of 16; the tied
    head (F.linear on the embedding) and everything else stay in autocast's bf16."""
    from torchao.float8 import convert_to_float8_training
    convert_to_float8_training(model, module_filter_fn=lambda module, name: isinstance(module, torch.nn.Linear)
                               and module.in_features % 16 == 0 and module.out_features % 16 == 0)


# ----------------------------------------------------------------------------------------------------------------
# Command line: every config field is a flag

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
    or starting processes: check_run's checks, and the checkpoints the run would read, read."""
    check_run(cfg, under_torchrun=True, processes=processes)  # (as torchrun's processes)
    if cfg.resume:  # the checkpoint the run would resume from: none, damaged, past the last step, other settings
        state, path, *_ = checkpoint_to_resume(cfg.out, cfg.max_steps, cfg.stop_at_step, cfg.allow_fresh_start)
        if state is not None:
            check_resumable(cfg, state, path, position_checker(cfg))
    if cfg.init_from:  # the checkpoint the run would start from, resolved as the run does (read, nothing moved)
        load_checkpoint(cfg.init_from, map_location="cpu")
    if not cfg.hellaswag_data:  # the official split the last step scores: downloaded now, if not yet (offline: named)
        load_examples(limit=1)


# ----------------------------------------------------------------------------------------------------------------
# The run directory

class RunDirLock:
    """An exclusive lock on a run directory (cli.lock_exclusively of its RUN_LOCK_FILE, an empty file: a run that
    changes nothing leaves every file as it was), taken by rank 0 of the run using it and held for the run's life: a
    second train.py on the same folder is refused instead of interleaving its metrics and overwriting the first one's
    checkpoints. The kernel releases it when the process ends, however it ends: no stale lock outlives a run, and a
    torchrun restart's new rank 0 takes it once the old worker group has died."""

    def __init__(self, run_dir: Path):
        self.file = lock_exclusively(run_dir / RUN_LOCK_FILE)
        if self.file is None:
            raise UserError(in_use_message(run_dir, lock_holder(run_dir / RUN_LOCK_FILE)))

    def release(self) -> None:
        self.file.close()


def make_run_dir(cfg: TrainConfig, d: Dist, preset: str) -> tuple[Path, RunDirLock | None]:
    """(--out, or DEFAULT_RUNS_DIR/<preset>-<time> named by rank 0; rank 0's lock on it, RunDirLock). Its checkpoint
    folder is made writable now, not found unwritable after the first hours of training. Rank 0's outcome is
    gathered: every rank raises its error together (a rank raising alone leaves the others waiting at a collective)."""
    run_dir = Path(cfg.out or d.gather(f"{DEFAULT_RUNS_DIR}/{preset}-{time.strftime('%Y%m%d-%H%M%S')}")[0])
    lock, error = None, None
    if d.is_main:
        try:
            ensure_writable_dir(checkpoint_dir(run_dir), "--out")
            lock = RunDirLock(run_dir)
        except UserError as e:
            error = str(e)
    error = d.gather(error)[0]
    if error:
        raise UserError(error)
    return run_dir, lock


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


class StopSignals:
    """SIGTERM/SIGINT ask the run to stop after the current step (`requested`); a second signal stops the process at
    once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self.request)
        signal.signal(signal.SIGINT, self.request)

    def request(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signum, signal.SIG_DFL)


class Trainer:
    """One process's share of a training run: model, optimizer, loader and step, the loop (run) and the state a
    checkpoint holds (state_dict / load_state_dict)."""

    STATE_KEYS = RESUME_STATE_KEYS

    def __init__(self, cfg: TrainConfig, preset: str, d: Dist, device: torch.device):
        check_run(cfg, under_torchrun=torch.distributed.is_initialized(), processes=d.world_size, device=device)
        self.cfg, self.d, self.device = cfg, d, device
        self.on_cuda = device.type == "cuda"
        self.run_dir, self.run_lock = make_run_dir(cfg, d, preset)
        try:
            self._set_up()
        except BaseException:  # (a refused start in a process that goes on, as in tests, leaves the folder free)
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory (rank 0's lock on it); run() does this when it ends."""
        if self.run_lock is not None:
            self.run_lock.release()

    def _set_up(self) -> None:
        cfg, d, device = self.cfg, self.d, self.device
        self.log = RunLog(self.run_dir, d.is_main)
        self.checkpoints = RunCheckpoints(self.run_dir, d, self.log.info, sharded=cfg.fsdp, keep=cfg.keep_checkpoints)
        self.checkpoints.remove_orphans()
        # the checkpoint to continue, refused now if this run's settings cannot take it (before any damaged newer
        # one is moved aside, the shards are hashed or the model is built)
        # (and the last step's evaluations a resume runs when they are not all in metrics.jsonl: its checkpoint is
        # saved before them, so one that failed there, out of memory say, left the run at its last step without them)
        self.final_missing = d.gather(missing_final_evaluations(self.run_dir, cfg) if d.is_main and cfg.resume
                                      else set())[0]
        resume = cfg.resume and self.checkpoints.to_resume(
            cfg.max_steps, cfg.stop_at_step, cfg.allow_fresh_start,
            accept=lambda state, path: check_resumable(cfg, state, path, position_checker(cfg)),
            finished=not self.final_missing)
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
        self.micro_batch = choose_micro_batch(cfg, d, self.dataset, self.model, device, self.autocast,
                                              resume and resume[0], self.log.info)
        self.accum = grad_accum_steps(cfg.total_batch_tokens, self.micro_batch, cfg.seq_len, d.world_size)
        # the layout (before the optimizer is made: under FSDP it must hold the shards)
        self.forward_model, self.no_sync = parallelize(self.model, d.world_size, device, fsdp=cfg.fsdp,
                                                       compile=cfg.compile,
                                                       mixed_precision=self.on_cuda and cfg.autocast)
        self.optimizer = self.model.configure_optimizer(cfg.max_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
        self.loader = TrainLoader(self.dataset, self.micro_batch, cfg.seq_len, rank=d.rank, world_size=d.world_size,
                                  seed=cfg.seed, device=device, log=self.log.info)
        self.step = 0  # optimizer steps done
        self.flops_per_token = self.model.flops_per_token(cfg.seq_len)
        self.peak = cfg.peak_flops or (peak_flops(torch.cuda.get_device_name(device)) if self.on_cuda else None)
        self.hellaswag = None  # examples, loaded at the first HellaSwag evaluation
        seed_everything(cfg.seed + d.rank)  # ranks draw different dropout masks
        if resume:
            self.load_state_dict(*resume)
        else:
            self._start_fresh()
        self.resumed = bool(resume)
        if len(set(d.gather(self.step))) > 1:
            raise UserError(f"the processes found different checkpoints in {self.run_dir}; on several nodes the run "
                            "directory must be on a filesystem that every node shares")

    def _start_fresh(self) -> None:
        if self.cfg.init_from:
            state, path = load_checkpoint(self.cfg.init_from, map_location="cpu")
            check_model_config(self.model_config, state, path, ignore=INIT_IGNORED_FIELDS)
            load_weights(self.model, state["model"])
            self.log.info(f"init: weights from {path}")
        if self.d.is_main:
            (self.run_dir / "metrics.jsonl").write_text("")  # events of an attempt that never checkpointed

    # --- the training state: what a checkpoint holds, and how it is restored ---

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly. Every rank calls it: it gathers each rank's RNG state.
        Under --fsdp the model and optimizer entries are this process's shards: RunCheckpoints.save writes them
        with DCP."""
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
        check_resumable(cfg, state, path, self.loader)  # (the loader takes the saved data position here)
        # (a field that did not exist when the checkpoint was written is no change)
        changed = {k for k, v in dataclasses.asdict(cfg).items() if k in saved_cfg and saved_cfg[k] != v
                   and k not in ("resume", "allow_fresh_start", "stop_at_step", "allow_token_batch_change")}
        if changed:
            self.log.info(f"resume: these settings differ from the checkpoint's run: {sorted(changed)}")
        load_training_state(self.model, self.optimizer, state, path, group=self.d.control)  # .pt or sharded, any layout
        self.step = state["step"]
        saved_layout = (state["world_size"], state["micro_batch"])
        if saved_layout == (self.d.world_size, self.micro_batch):
            set_rng_state(state["rng"][self.d.rank])
        else:
            self._log_layout_change(*saved_layout, saved_cfg)
        if self.d.is_main:
            unreadable = drop_metrics_after(self.run_dir, self.step)
            if unreadable:
                (number, problem), *more = unreadable
                self.log.info(f"resume: WARNING: {len(unreadable)} line(s) of metrics.jsonl are no events train.py can "
                              f"read (line {number}: {problem}" + (f"; lines {', '.join(str(n) for n, _ in more)}"
                                                                   if more else "") + "); kept as they are")
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
            # gradients are synchronized over the processes on the last micro-step only (parallelize: DDP's no_sync;
            # FSDP and one process sync every time)
            with contextlib.nullcontext() if micro == self.accum - 1 else self.no_sync():
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

    def run(self) -> int:
        """Train to max_steps (or --stop-at-step, or a signal), then release the run directory. Steps are counted in
        optimizer updates done: the evaluations and the checkpoint "at step S" see the weights after S updates, and
        the train event of step S is update S itself (0-based), the one that takes the weights from step S to S + 1."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> int:
        cfg, d = self.cfg, self.d
        header, config = self._header()
        self.log.header(header, config)
        last_step = end_step(cfg.max_steps, cfg.stop_at_step)
        first_step, stop = self.step, False
        timer, signals = StepTimer(self.device), StopSignals()
        bad_step = torch.full((), -1, device=self.device, dtype=torch.long)  # first update with a NaN/inf loss
        with self.log.open_trackers(cfg, d, self.step, self.resumed, header, config), \
                tqdm(total=last_step, initial=self.step, desc="train", unit="step", disable=not d.is_main,
                     dynamic_ncols=True) as bar:
            while True:
                step = self.step
                with timer.paused():
                    self._evaluate_and_save(step, first_step, last_step, stop, bad_step)
                if step == last_step or stop:
                    break

                loss, grad_norm = self.train_step()
                finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
                bad_step = torch.where((bad_step < 0) & ~finite, step, bad_step)  # on the device: no sync
                self.step += 1
                timer.step_done()
                bar.update(1)
                stop = d.any(signals.requested)  # every rank stops after the same step
                logged = due_at(self.step, cfg.log_every) or self.step == last_step or stop
                if logged:
                    self._check_finite(bad_step)
                    self._log_train(step, loss, grad_norm, timer.lap())
                if step == first_step:
                    self._after_first_step(timer, logged)
        if stop:
            self.log.info(f"stopped by signal after step {self.step}; checkpoint written. "
                          f"Continue with the same command plus --resume")
        self.log.info(f"done: {self.step} steps, {self.loader.state_dict()['window'] * cfg.seq_len:,} tokens, "
                      f"run directory {self.run_dir}")
        return 0

    def _evaluate_and_save(self, step: int, first_step: int, last_step: int, stop: bool,
                           bad_step: torch.Tensor) -> None:
        """The evaluations and the checkpoint due at step S (every evaluation at the final step). A resumed run
        evaluated its first step before it saved that checkpoint (or, the final one, has nothing left to run)."""
        cfg = self.cfg
        final, evaluate = step == cfg.max_steps, step > first_step or not self.resumed
        evaluations = [evaluation for evaluation, every, logged in ((self.eval_val_loss, cfg.eval_every, "val_loss"),
                                                                    (self.eval_hellaswag, cfg.hellaswag_every,
                                                                     "hellaswag_acc"),
                                                                    (self.eval_samples, cfg.sample_every, "samples"))
                       if (evaluate or (final and logged in self.final_missing)) and (final or due_at(step, every))]
        saving = step > first_step and (due_at(step, cfg.ckpt_every) or step == last_step or stop)
        # The last step's checkpoint comes before its evaluations: one failing there (out of memory) must not take
        # the run's training with it, and a resume from it has nothing left to train. Any other checkpoint comes
        # after its step's evaluations, which a resume from it does not repeat.
        if saving and final:
            self._save(bad_step)
        if evaluations:
            # forked RNG streams: evaluations leave the training's random state as they found it
            with torch.random.fork_rng(devices=[self.device] if self.on_cuda else []), \
                    evaluated(self.model, self.device) as model:
                for evaluation in evaluations:
                    evaluation(step, model)
        if saving and not final:
            self._save(bad_step)

    def _save(self, bad_step: torch.Tensor) -> None:
        self._check_finite(bad_step)  # weights after a NaN must not become a checkpoint
        self.checkpoints.save(self.state_dict(), self.model, self.optimizer)

    def _after_first_step(self, timer: StepTimer, logged: bool) -> None:
        if not logged:
            timer.lap()  # this process's first step compiles the model: never averaged into a window
        params, moments = training_state_bytes(self.model, self.optimizer)  # AdamW made its state in that step
        self.log.info(f"memory: parameters {params:,} bytes + optimizer state {moments:,} bytes on this process"
                      + (f" (its shards, of {self.d.world_size})" if is_sharded(self.model) else ""))

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

    # --- evaluations, of `model` (the trained model, or a sharded one's whole copy); each restores its mode ---

    @torch.no_grad()
    def eval_val_loss(self, step: int, model: GPT) -> None:
        max_tokens = self.cfg.final_val_tokens if step == self.cfg.max_steps else self.cfg.val_tokens
        total, batches = torch.zeros((), device=self.device), 0
        with evaluating(model):
            for x, y in val_batches(self.dataset, self.micro_batch, self.cfg.seq_len, self.d.rank, self.d.world_size,
                                    max_tokens=max_tokens or None, device=self.device):
                with self.autocast():
                    total += model(x, y)[1]
                batches += 1
        val = self.d.mean(total / max(1, batches))
        self.log.metrics({"step": step, "val_loss": val.item()})
        self.log.info(f"step {step:6d} | val loss {val.item():.4f} ({batches * self.d.world_size} batches)")

    def eval_hellaswag(self, step: int, model: GPT) -> None:
        if self.hellaswag is None:  # loaded once per run; rank 0 downloads the official split (if needed) first
            if not self.d.is_main:
                self.d.barrier()
            self.hellaswag = load_examples(self.cfg.hellaswag_data or None, limit=self.cfg.hellaswag_limit or None)
            if self.d.is_main:
                self.d.barrier()
        result = evaluate_hellaswag(model, self.hellaswag, self.device, batch_size=self.micro_batch,
                                    rank=self.d.rank, world_size=self.d.world_size)
        self.log.metrics({"step": step, "hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"]})
        self.log.info(f"step {step:6d} | hellaswag acc_norm {result['acc_norm']:.4f} acc {result['acc']:.4f} "
                      f"({result['total']} examples)")

    def eval_samples(self, step: int, model: GPT) -> None:
        if not self.cfg.sample_prompts or not self.d.is_main:
            return
        texts = generate_samples(model, list(self.cfg.sample_prompts), self.cfg.sampling(), self.cfg.seed,
                                 self.device)
        self.log.metrics({"step": step, "samples": [{"prompt": p, "text": t}
                                                    for p, t in zip(self.cfg.sample_prompts, texts)]})
        for prompt, text in zip(self.cfg.sample_prompts, texts):
            self.log.info(f"step {step:6d} | sample | {prompt!r} -> {text!r}")

    def _header(self) -> tuple[list[str], dict]:
        """The run's header lines (commit, versions, hardware, layout, model, data) and its config."""
        header = [*run_header(self.device),
                  f"processes: {self.d.world_size}, micro-batch {self.micro_batch} x {self.cfg.seq_len}, "
                  f"{self.accum} accumulation steps, {self.cfg.total_batch_tokens:,} tokens per step",
                  f"model {self.cfg.model}: {self.model.num_params():,} parameters "
                  f"({self.model.num_params(include_embedding=False):,} without the embedding), "
                  f"{self.flops_per_token / 1e9:.2f} GFLOP per token",
                  f"data {self.cfg.data}: {self.dataset.train_tokens:,} train / {self.dataset.val_tokens:,} val tokens"]
        return header, {"train": dataclasses.asdict(self.cfg), "model": dataclasses.asdict(self.model_config)}


@main_entry(memory_hint="try --micro-batch auto (the largest that fits), a lower --micro-batch (accumulation keeps the "
                        "token batch) or --activation-checkpointing")
def main(argv=None) -> int:
    args = parse_command_line(argv)
    cfg, preset = config_from_flags(vars(args))
    if args.check:
        check_config(cfg, args.check)
        print(f"train.py --check: the configuration holds for {args.check} process(es)")
        return 0
    try:
        d, device = init_distributed(cfg.device)
    except UserError:  # a --device this process cannot use: named in one line with the run's other problems
        check_run(cfg, under_torchrun=launched_by_torchrun(), processes=int(os.environ.get("WORLD_SIZE", 1)))
        raise
    try:
        enable_tf32(device)
        return Trainer(cfg, preset, d, device).run()
    except NonFiniteLoss as e:
        fail(str(e), status=3)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    exit_with(main)
