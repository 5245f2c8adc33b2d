"""train.py's configuration: TrainConfig (the reference recipe's defaults), its presets, the command-line flag of
every field, and the rules a configuration must follow. bench.py's train mode takes the same flags."""
import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from checkpoint import (INIT_IGNORED_FIELDS, check_model_config, checkpoint_to_resume, list_checkpoints,
                        load_checkpoint)
from cli import UserError, check_writable_dir, locked_by_another
from dataloader import ShardDataset
from generate import REFERENCE_PROMPTS, encode_prompt
from hellaswag_eval import SAMPLE_FILE, load_examples
from model import ATTENTION_BACKENDS, PRESETS, GPTConfig, Sampling
from trackers import parse_trackers

# The TrainConfig field of each Sampling setting (TrainConfig.sampling)
DEFAULT_RUNS_DIR = "temp_data/runs"  # where a run without --out gets its folder, <config>-<time>
RUN_LOCK_FILE = "train.lock"  # in a run directory: locked by the run using it (train.RunDirLock)
# What train.py writes into a run directory; a non-empty --out holding none of them is another tool's folder
RUN_FILES = ("config.json", "train.log", "metrics.jsonl", "checkpoints", RUN_LOCK_FILE)
SAMPLE_FIELDS = {"max_new_tokens": "sample_tokens", "temperature": "sample_temperature", "top_k": "sample_top_k"}


@dataclass
class TrainConfig:
    """Defaults are the reference recipe (LF_LLM-269M on FineWeb-Edu sample-10BT, 8 GPUs)."""
    model: str = "lf_llm_269m"  # model preset (model.PRESETS)
    data: str = "temp_data/data/fineweb_edu_10bt"  # a data_prep.py output directory
    out: str = ""  # run directory; default DEFAULT_RUNS_DIR/<config>-<time>
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
    # them (DDP): each holds about 1/N of them; checkpoints become sharded folders (checkpoint.py).
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

    def problems(self) -> dict[str, str]:
        """Every value that cannot work, as {field: '--flag VALUE: rule'} (the first rule a field breaks), and every
        pair of flags that exclude each other: the values alone, without touching a file (input_problems does that).
        Keyed by field, so that a check reading some fields can tell whether their values hold."""
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
        if not found.keys() & {"min_lr", "max_lr"}:  # a pair rule reads two values that each hold
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
        need(not (self.resume and self.init_from), "init_from", "excludes --resume: resume continues this run, "
             "init-from starts a new one; leave one out")
        need(self.data != "", "data", "an empty path; give the folder data_prep.py wrote")
        need(self.out or not self.resume, "resume", "needs --out, the run directory to continue (without it each "
             "attempt makes a new, empty one)")
        for name in ("allow_fresh_start", "allow_token_batch_change"):
            need(self.resume or not getattr(self, name), name, "only applies with --resume; add it or leave this out")
        for setting, rule in self.sampling().errors().items():  # Sampling's rules, named by train.py's flags
            need(False, SAMPLE_FIELDS[setting], rule)
        try:
            parse_trackers(self.tracker)
        except UserError as e:
            found.setdefault("tracker", str(e))
        return found

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
    # `memory_estimate.py` about 42 GiB per GPU with it under DDP, 138 GiB without.
    "lf_llm_1b": TrainConfig(model="lf_llm_1b", activation_checkpointing=True),
    # Trains the tiny debug model on the embedded corpus (about 0.8 epoch) on 2 CPU cores in about 3 minutes.
    # Its micro-batch is auto: 8 sequences on one process, 4 each on two (CPU DDP), the same 1,024-token batch.
    "debug": TrainConfig(model="debug", data="temp_data/data/embedded", total_batch_tokens=1024, micro_batch="auto",
                         seq_len=128, max_steps=250, warmup_steps=25, max_lr=3e-3, min_lr=3e-4, compile=False,
                         log_every=10, eval_every=50, val_tokens=8192, final_val_tokens=0, hellaswag_every=125,
                         hellaswag_data=str(SAMPLE_FILE), sample_every=125,
                         sample_tokens=24, ckpt_every=125),
}



def input_problems(cfg: TrainConfig) -> list[str]:
    """What the configuration names that cannot be used, as problems() words them: --out a file, a --data that is
    no data_prep.py output (ShardDataset.open without the sha256 pass), an --init-from that names no usable
    checkpoint (missing, a folder without one, a file that is none: load_checkpoint's peek, which reads no tensor),
    and what is read only at the last step, after the whole run (the HellaSwag file, the sample prompts, which must
    fit the context once tokenized), read now. Found before the run directory is made: nothing is written."""
    found = {}
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        found["out"] = f"--out {cfg.out!r}: is a file; give a directory"
    elif cfg.out and (foreign := not_a_run_dir(Path(cfg.out))):
        found["out"] = (f"--out {cfg.out} {foreign}: train.py writes only into a new or empty folder or a run "
                        "directory of its own; choose another --out")
    else:  # (on every process: under torchrun a folder that only rank 0 found unwritable left the others waiting)
        try:
            check_writable_dir(cfg.out or DEFAULT_RUNS_DIR, "--out")
        except UserError as e:
            found["out"] = f"{e}; give a folder you can write to"
    pid = locked_by_another(Path(cfg.out) / RUN_LOCK_FILE) if cfg.out and Path(cfg.out).is_dir() else None
    if pid is not None:  # (its checkpoints are that run's to change: not judged for this one)
        found["out"] = in_use_message(Path(cfg.out), pid)
    elif cfg.out and not cfg.resume and (held := list_checkpoints(cfg.out)):  # (the run would refuse to start over it)
        found["resume"] = (f"--out {cfg.out} already holds checkpoints (the newest {held[-1].name}); add --resume to "
                           "continue that run, or choose a new --out")
    try:  # the manifest and every shard's header (the run checks their sha256 too: minutes for 10B tokens)
        if cfg.data:  # ("" is one of problems())
            ShardDataset.open(cfg.data)
    except UserError as e:
        found["data"] = f"--data {cfg.data!r}: {e}"
    if cfg.init_from and not Path(cfg.init_from).exists():
        found["init_from"] = (f"--init-from {cfg.init_from!r}: no such file or folder; give a checkpoint file or a run "
                              "directory")
    elif cfg.init_from:  # the checkpoint the run will load, looked at without reading its tensors
        try:
            state, path = load_checkpoint(cfg.init_from, peek=True)
            if cfg.model in PRESETS:
                check_model_config(cfg.model_config(), state, path, ignore=INIT_IGNORED_FIELDS)
        except UserError as e:
            found["init_from"] = f"--init-from {cfg.init_from!r}: {e}"
    if cfg.resume and cfg.out and pid is None and not list_checkpoints(cfg.out):  # (with checkpoints the run folder
        try:  # the run reads them; without any, this is cheap and the run would stop after making the folder)
            checkpoint_to_resume(cfg.out, cfg.max_steps, cfg.stop_at_step, cfg.allow_fresh_start)
        except UserError as e:
            found["resume"] = str(e)
    if cfg.hellaswag_data and not Path(cfg.hellaswag_data).is_file():
        what = "is a folder" if Path(cfg.hellaswag_data).is_dir() else "no such file"
        found["hellaswag_data"] = (f"--hellaswag-data {cfg.hellaswag_data!r}: {what}; give a HellaSwag .jsonl "
                                   f"file (e.g. {SAMPLE_FILE.relative_to(Path(__file__).parent)}), or leave it out for "
                                   "the official validation split")
    elif cfg.hellaswag_data:
        try:  # (every ending the run will score must fit the model's context: found now, not at the first evaluation)
            load_examples(cfg.hellaswag_data, limit=cfg.hellaswag_limit or None,
                          block_size=PRESETS[cfg.model].block_size if cfg.model in PRESETS else None)
        except UserError as e:
            found["hellaswag_data"] = str(e)
    if cfg.model in PRESETS:
        for number, prompt in enumerate(cfg.sample_prompts, start=1):
            try:
                encode_prompt(prompt, PRESETS[cfg.model].block_size)
            except UserError as e:  # (its message shows the prompt's start, not all of it: a prompt can be long)
                found.setdefault("sample_prompts", f"--sample-prompts, entry {number} of {len(cfg.sample_prompts)}: "
                                                   f"{e}")
    return list(found.values())


def in_use_message(run_dir: Path, pid: str) -> str:
    return f"--out {run_dir} is in use by another train.py run (pid {pid}); wait for it or choose another --out"


def not_a_run_dir(folder: Path) -> str | None:
    """What shows that an existing, non-empty `folder` is not a train.py run directory (None when it may be one):
    a config.json that is not train.py's (an export_hf.py output's Hugging Face config), or none of RUN_FILES (a
    data set, a folder of runs, anything else). The other tools that write into a run directory (plot_metrics.py's
    plots/, hellaswag_eval.py's results, the --tracker files) do so beside train.py's own files."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    config = folder / "config.json"
    if config.exists():
        try:
            saved = json.loads(config.read_bytes())
        except (OSError, ValueError):
            saved = None
        if not (isinstance(saved, dict) and {"train", "model"} <= saved.keys()):
            return "holds a config.json that train.py did not write"
    elif not any((folder / name).exists() for name in RUN_FILES):
        return f"holds files but none of a train.py run directory ({', '.join(RUN_FILES)})"
    return None


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
