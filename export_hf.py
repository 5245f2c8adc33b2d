"""Export a checkpoint of this repo to a Hugging Face `transformers` directory, and import such a directory back.

The model (pre-norm RMSNorm, rotate-half RoPE, SwiGLU, biases on every attention and FFN projection, tied embedding)
is exactly what `LlamaForCausalLM` computes with attention_bias=True, mlp_bias=True, tie_word_embeddings=True and
num_key_value_heads = num_attention_heads, so the export re-maps weights and loses nothing:

    ours (model.py)                          transformers (LlamaForCausalLM)
    wte.weight (padded V, C)                 model.embed_tokens.weight (V, C); lm_head is tied to it, not saved
    blocks.i.norm1 / norm2                   model.layers.i.input_layernorm / post_attention_layernorm
    blocks.i.attn.qkv (3C, C) = [q; k; v]    model.layers.i.self_attn.q_proj / k_proj / v_proj (C, C) each
    blocks.i.attn.proj                       model.layers.i.self_attn.o_proj
    blocks.i.ffn.fc (2H, C) = [value; gate]  model.layers.i.mlp.up_proj / gate_proj (H, C) each: value * silu(gate)
                                             is Llama's up_proj(x) * act(gate_proj(x))
    blocks.i.ffn.proj                        model.layers.i.mlp.down_proj
    norm_f                                   model.norm

Both use rotate-half RoPE on (i, i + D/2) pairs, so q/k need no permutation (Meta's interleaved checkpoints do).

    python export_hf.py --checkpoint runs/x/checkpoints/step_019073.pt --out exports/x [--dtype bfloat16]
    python export_hf.py --from-hf exports/x --out runs/y/checkpoints/step_000000.pt
"""
import argparse
import cli
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

import tokenizer
from checkpoint import CheckpointDamaged, list_checkpoints, load_checkpoint, model_from_state, save_checkpoint
from cli import (UserError, atomic_write, check_writable_dir, is_result_of, main_entry, path_arg, raise_all,
                 write_json)
from model import GPT, GPTConfig
from plot_metrics import latest_values, read_metrics
from shards import file_sha256

ARCHITECTURE = "LlamaForCausalLM"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS_FILE = "model.safetensors"
# config.json key for the GPTConfig fields Llama has no place for (training-only dropouts, the vocab padding knob),
# so an import restores the exact config. transformers keeps unknown keys as plain attributes and ignores them.
EXTRA_CONFIG_KEY = "lf_llm"
EXTRA_FIELDS = ("attn_dropout", "ffn_dropout", "pad_vocab_to")
# The mark of an export: {"written_by": "export_hf.py", "files": {name: sha256}} of every file it wrote. --force
# replaces only a folder holding it and nothing but those files, unchanged (a fine-tuned model saved over an export's
# weights, a note added beside them, a user's own Llama folder: all refused). transformers never reads it.
MARKER_FILE = "export_hf.json"
WRITTEN_BY = "export_hf.py"


# ----------------------------------------------------------------------------------------------------------------
# Config and weight mapping (shared by export and import)

def hf_config(config: GPTConfig, dtype_name: str) -> dict:
    """config.json for LlamaForCausalLM, every field from our config. Written for transformers 4.x and 5.x alike:
    4.x reads `rope_theta` / `rope_scaling` (null = default RoPE), 5.x reads `rope_parameters` (and still accepts
    the legacy keys), both read `torch_dtype`."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": config.vocab_size,  # logical vocab: padded rows are dropped on export
        "hidden_size": config.n_embd,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,  # plain multi-head attention
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": True,
        "attention_dropout": 0.0,  # Llama's is on attention probabilities, which our model has none of
        "initializer_range": math.sqrt(2 / (5 * config.n_embd)),  # our init std for embedding / QKV / FFN-in
        "bos_token_id": tokenizer.EOT_ID,
        "eos_token_id": tokenizer.EOT_ID,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype_name,
        EXTRA_CONFIG_KEY: {name: getattr(config, name) for name in EXTRA_FIELDS},
    }


def weight_name_map(config: GPTConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(our tensor name, its transformers names). A fused tensor of ours is its parts concatenated along dim 0, in
    the listed order. The embedding is listed without vocab padding (handled by the callers)."""
    pairs = [("wte.weight", ("model.embed_tokens.weight",))]
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [(f"{ours}norm1.weight", (f"{hf}input_layernorm.weight",)),
                  (f"{ours}norm2.weight", (f"{hf}post_attention_layernorm.weight",))]
        for kind in ("weight", "bias"):
            pairs += [
                (f"{ours}attn.qkv.{kind}", tuple(f"{hf}self_attn.{x}_proj.{kind}" for x in "qkv")),
                (f"{ours}attn.proj.{kind}", (f"{hf}self_attn.o_proj.{kind}",)),
                (f"{ours}ffn.fc.{kind}", (f"{hf}mlp.up_proj.{kind}", f"{hf}mlp.gate_proj.{kind}")),
                (f"{ours}ffn.proj.{kind}", (f"{hf}mlp.down_proj.{kind}",)),
            ]
    pairs.append(("norm_f.weight", ("model.norm.weight",)))
    return pairs


def to_hf_state_dict(model: GPT, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, fused tensors split, padded vocab rows dropped; each tensor its own
    contiguous copy in `dtype` (safetensors refuses tensors that share memory)."""
    state = model.state_dict()
    state["wte.weight"] = state["wte.weight"][:model.config.vocab_size]  # (V, C)
    out = {}
    for ours, theirs in weight_name_map(model.config):
        for name, part in zip(theirs, state[ours].chunk(len(theirs), dim=0)):
            out[name] = part.to(dtype, copy=True).contiguous()
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], config: GPTConfig, source: Path) -> dict[str, torch.Tensor]:
    """Our float32 state_dict from transformers' tensors (the inverse of to_hf_state_dict); vocab padding rows, if
    the config asks for them, come back as zeros."""
    hf_state = dict(hf_state)
    hf_state.pop("lm_head.weight", None)  # tied: transformers ignores a saved copy too
    mapping = weight_name_map(config)
    expected = {name for _, theirs in mapping for name in theirs}
    missing, unexpected = sorted(expected - set(hf_state)), sorted(set(hf_state) - expected)
    if missing or unexpected:
        raise UserError(f"{source} does not have the tensors of this model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); it cannot be imported")
    state = {ours: torch.cat([hf_state[name] for name in theirs], dim=0).float() for ours, theirs in mapping}
    embedding = state["wte.weight"]  # (V, C)
    padding = embedding.new_zeros(config.padded_vocab_size - config.vocab_size, config.n_embd)
    state["wte.weight"] = torch.cat([embedding, padding], dim=0)  # (padded V, C)
    return state


# ----------------------------------------------------------------------------------------------------------------
# Export

def export_model(model: GPT, out_dir, dtype_name: str = "float32", model_card: str = "", force: bool = False) -> Path:
    """Write `model` as a transformers directory at out_dir (config, safetensors weights, generation config,
    tokenizer files, model card). Everything goes to a temporary folder first, renamed into place at the end."""
    out_dir = Path(out_dir)
    check_dtype(dtype_name)
    check_output_dir(out_dir, force)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_json(tmp / "config.json", hf_config(model.config, dtype_name))
        write_json(tmp / "generation_config.json",
                   {"bos_token_id": tokenizer.EOT_ID, "eos_token_id": tokenizer.EOT_ID})
        # serialized in memory and written by atomic_write: a full disk is then an OSError naming the file
        # (safetensors' own writer reports it as a SafetensorError without one)
        with atomic_write(tmp / WEIGHTS_FILE) as f:
            f.write(save(to_hf_state_dict(model, DTYPES[dtype_name]), metadata={"format": "pt"}))
        write_tokenizer_files(tmp, model.config.block_size)
        (tmp / "README.md").write_text(model_card or model_card_text(model, dtype_name, None, {}))
        write_json(tmp / MARKER_FILE, {"files": {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}},
                   written_by=WRITTEN_BY)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_dtype(dtype_name: str) -> None:
    if dtype_name not in DTYPES:
        raise UserError(f"--dtype {dtype_name!r} is not supported; use one of {', '.join(DTYPES)}")


def check_output_dir(out_dir: Path, force: bool) -> None:
    """An existing, non-empty --out is only replaced with --force, and only when it holds an earlier export of this
    tool, unchanged (export_problem), so `--out . --force` or a user's own model folder is never wiped. A symbolic
    link is refused: replacing it would put a folder where the link was and leave the export it pointed to."""
    if out_dir.is_symlink():
        raise UserError(f"--out {out_dir} is a symbolic link (to {os.readlink(out_dir)}); give the folder itself "
                        "or a new path: an export replaces a folder, never a link")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a directory path")
    check_writable_dir(out_dir.parent, "--out's folder")  # the export is written beside --out, then renamed
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not force:
        raise UserError(f"--out {out_dir} exists and is not empty; pass --force to replace it, or choose a new path")
    problem = export_problem(out_dir)
    if problem is not None:
        raise UserError(f"--out {out_dir} is not empty and is not an unchanged export of {WRITTEN_BY} ({problem}); "
                        f"--force only replaces those: choose a new or empty directory, or remove it yourself")


def export_problem(path: Path) -> str | None:
    """Why the folder `path` is not an export this tool wrote, unchanged since (None: it is): its MARKER_FILE is
    missing or not this tool's, it holds a name the export did not write, or a file's sha256 differs."""
    marker = path / MARKER_FILE
    if not is_result_of(marker, WRITTEN_BY):
        return f"no {MARKER_FILE} of {WRITTEN_BY}"
    files = json.loads(marker.read_bytes()).get("files")
    if not isinstance(files, dict):
        return f"{MARKER_FILE} lists no files"
    others = sorted(p.name for p in path.iterdir() if p.name not in files and p.name != MARKER_FILE)
    if others:
        return f"it holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, which no export writes"
    for name, sha256 in files.items():
        try:
            if (path / name).exists() and file_sha256(path / name) != sha256:
                return f"{name} changed since the export"
        except OSError:  # a folder under a file's name, an unreadable file
            return f"{name} cannot be read as the export wrote it"
    return None


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder `new` to `target`, replacing an existing (empty or --force) target."""
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def write_tokenizer_files(out_dir: Path, max_length: int) -> None:
    """GPT-2's BPE files under the names AutoTokenizer looks for (vocab.json, merges.txt), with <|endoftext|> as
    BOS, EOS and UNK, as GPT-2 has. The committed files are hash-checked first (get_tokenizer does that)."""
    tokenizer.get_tokenizer()
    shutil.copyfile(tokenizer.ENCODER_JSON, out_dir / "vocab.json")
    shutil.copyfile(tokenizer.VOCAB_BPE, out_dir / "merges.txt")
    special = {"bos_token": tokenizer.EOT_TOKEN, "eos_token": tokenizer.EOT_TOKEN, "unk_token": tokenizer.EOT_TOKEN}
    write_json(out_dir / "special_tokens_map.json", special)
    write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", **special, "add_bos_token": False, "add_prefix_space": False,
        "model_max_length": max_length, "clean_up_tokenization_spaces": False,
    })


# ----------------------------------------------------------------------------------------------------------------
# Model card

def run_metrics(run_dir: Path, step: int | None) -> dict:
    """{metric: (step, value)}: the latest of each in run_dir/metrics.jsonl at or before `step` (all steps when
    None); empty when the run has no metrics file. Unusable lines are skipped with a warning (read_metrics)."""
    if not (run_dir / "metrics.jsonl").is_file():
        return {}
    return latest_values([e for e in read_metrics(run_dir) if step is None or e["step"] <= step])


def model_card_text(model: GPT, dtype_name: str, step: int | None, metrics: dict,
                    tokens_seen: int | None = None) -> str:
    """The README.md of an export. `tokens_seen` and `step` are the exported checkpoint's own (a metrics event's
    token count is that of another step: the train event of step S counts update S too); `metrics` the run's
    latest validation loss and HellaSwag at or before the step."""
    c = model.config

    def metric(key, fmt):
        if key not in metrics:
            return "not available"
        at, value = metrics[key]
        return f"{fmt.format(value)} (step {at:,})"

    source = f"step {step:,} of a training run" if step is not None else "a checkpoint"
    tokens = ("not available" if tokens_seen is None
              else f"{tokens_seen:,}" + (f" (step {step:,})" if step is not None else ""))
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [llama, lf-llm-269m]
---
# LF_LLM-269M-style model

A decoder-only language model pre-trained from scratch with this repository's code (LF_LLM-269M architecture),
exported from {source} to `{ARCHITECTURE}` (weights re-mapped exactly, no approximation), {dtype_name} weights.

## Architecture
| field | value |
|---|---|
| layers / heads / d_model / head dim | {c.n_layer} / {c.n_head} / {c.n_embd} / {c.head_dim} |
| FFN | SwiGLU, hidden {c.ffn_hidden}, with biases |
| attention | multi-head (no GQA), q/k/v/o projections with biases, RoPE theta {c.rope_theta:g} (rotate-half) |
| norm | pre-norm RMSNorm, eps {c.norm_eps:g} |
| context | {c.block_size} tokens |
| vocabulary | {c.vocab_size} (GPT-2 BPE, `<|endoftext|>` = {tokenizer.EOT_ID} is BOS/EOS) |
| embedding | tied with the LM head |
| parameters | {model.num_params():,} ({model.num_params(include_embedding=False):,} without the token embedding) |

## Training
| field | value |
|---|---|
| tokens seen | {tokens} |
| validation loss | {metric("val_loss", "{:.4f}")} |
| HellaSwag acc_norm | {metric("hellaswag_acc_norm", "{:.4f}")} |

## Use
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
ids = tok("HTML stands for", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=30, do_sample=False)[0]))
```
"""


def export_checkpoint(checkpoint, out_dir, dtype_name: str = "float32", force: bool = False) -> Path:
    """Export a checkpoint file (or a run directory's newest) with a model card from its run's metrics.jsonl
    (the run directory is the checkpoint's folder's parent)."""
    # every problem of the three named at once, before the (slow) checkpoint load: the checkpoint is looked at
    # without reading a tensor (load_checkpoint's peek), so damage inside its tensor bytes is found by the load
    raise_all(lambda: check_dtype(dtype_name), lambda: load_checkpoint(Path(checkpoint), peek=True),
              lambda: check_output_dir(Path(out_dir), force))
    state, file = load_checkpoint(Path(checkpoint))
    model = model_from_state(state, file)
    step = state.get("step")
    card = model_card_text(model, dtype_name, step, run_metrics(file.parent.parent, step), state.get("tokens_seen"))
    return export_model(model, out_dir, dtype_name, card, force)


# ----------------------------------------------------------------------------------------------------------------
# Import

def gpt_config_from_hf(hf: dict, source: Path) -> GPTConfig:
    """Our GPTConfig from a transformers config.json, refusing anything our model cannot compute exactly."""
    architectures = hf.get("architectures") or ([hf["model_type"]] if hf.get("model_type") else [])
    if not architectures:
        raise UserError(f"{source} names no model architecture (no 'architectures' or 'model_type'): it is no "
                        f"transformers config.json; give a transformers model directory")
    if ARCHITECTURE not in architectures:
        raise UserError(f"{source} is a {', '.join(map(str, architectures))} model; only {ARCHITECTURE} "
                        f"exports of this architecture can be imported")
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings")
    if not all(isinstance(hf.get(key), int) and hf[key] > 0 for key in sizes):
        raise UserError(f"{source}: needs positive integers for {', '.join(sizes)}; it cannot be imported")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    requirements = {  # field: (value found, what our model needs)
        "num_key_value_heads": (hf.get("num_key_value_heads", heads), heads),
        "head_dim": (hf.get("head_dim") or hidden // heads, hidden // heads),
        "attention_bias": (hf.get("attention_bias", False), True),
        "mlp_bias": (hf.get("mlp_bias", False), True),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", False), True),
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "rope type": (rope.get("rope_type", rope.get("type", "default")), "default"),
        "vocab_size": (hf.get("vocab_size"), tokenizer.VOCAB_SIZE),  # the GPT-2 BPE this repo tokenizes with
    }
    for field, (found, needed) in requirements.items():
        if found != needed:
            raise UserError(f"{source}: {field} is {found!r}, this model needs {needed!r}; it cannot be imported")
    extra = {k: v for k, v in (hf.get(EXTRA_CONFIG_KEY) or {}).items() if k in EXTRA_FIELDS}
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                         n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=hidden,
                         ffn_hidden=hf["intermediate_size"], rope_theta=float(rope.get("rope_theta") or
                                                                              hf.get("rope_theta", 10000.0)),
                         norm_eps=hf["rms_norm_eps"], **extra)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: config is incomplete or invalid for this model ({type(e).__name__}: {e})")


def is_training_run(folder: Path) -> bool:
    """Whether `folder` is a training run of this repo (or its checkpoints/ folder), not a transformers directory."""
    return bool(list_checkpoints(folder) or (folder.name == "checkpoints" and list_checkpoints(folder.parent))
                or (folder / "metrics.jsonl").is_file() or (folder / "train.log").is_file())


def hf_dir_config(hf_dir) -> GPTConfig:
    """Our GPTConfig of the transformers directory `hf_dir`, checked before any weight is read: a folder holding
    config.json (an importable one) and model.safetensors."""
    hf_dir = Path(hf_dir)
    config_file, weights_file = hf_dir / "config.json", hf_dir / WEIGHTS_FILE
    if not hf_dir.exists():
        raise UserError(f"--from-hf {hf_dir} does not exist; give a transformers model directory")
    if not hf_dir.is_dir():
        raise UserError(f"--from-hf {hf_dir} is a file, not a folder; give a transformers model directory (a "
                        "checkpoint file of this repo is exported with --checkpoint)")
    if is_training_run(hf_dir):
        run = hf_dir.parent if hf_dir.name == "checkpoints" else hf_dir
        raise UserError(f"--from-hf {hf_dir} is a training run of this repo, not a transformers directory; its "
                        f"checkpoints load as they are (export one with --checkpoint {run} --out DIR)")
    if not config_file.is_file():
        raise UserError(f"--from-hf {hf_dir} has no config.json; give a transformers model directory")
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{config_file} is not readable JSON ({e})")
    config = gpt_config_from_hf(hf if isinstance(hf, dict) else {}, config_file)
    if not weights_file.is_file():
        raise UserError(f"--from-hf {hf_dir} has no {WEIGHTS_FILE}; re-save it with "
                        f"`model.save_pretrained(dir, safe_serialization=True)` as a single file")
    return config


def load_hf_dir(hf_dir) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(our config, our float32 state_dict) from a transformers directory with config.json and model.safetensors."""
    hf_dir = Path(hf_dir)
    config, weights_file = hf_dir_config(hf_dir), hf_dir / WEIGHTS_FILE
    try:
        hf_state = load_file(weights_file)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights_file} is corrupt or truncated ({e}); export it again")
    return config, from_hf_state_dict(hf_state, config, weights_file)


def written_by_import(path: Path) -> bool:
    """Whether `path` is a checkpoint import_hf wrote (marked 'imported_from'): the only file --force replaces."""
    try:
        return "imported_from" in load_checkpoint(path)[0]
    except CheckpointDamaged:
        return False


def check_import_out(out_file: Path, force: bool) -> None:
    if out_file.is_dir():
        raise UserError(f"--out {out_file} is a directory; give a checkpoint file path such as "
                        f"RUN_DIR/checkpoints/step_000000.pt")
    if out_file.exists() and not force:
        raise UserError(f"--out {out_file} exists; pass --force to overwrite it, or choose a new path")
    if out_file.exists() and not written_by_import(out_file):
        raise UserError(f"--out {out_file} is not a checkpoint export_hf.py --from-hf wrote (a training checkpoint, "
                        "say): --force replaces only those; choose a new path")
    check_writable_dir(out_file.parent, "--out's folder")


def import_hf(hf_dir, out_file, force: bool = False, dtype_name: str | None = None) -> Path:
    """Write a checkpoint of this repo (model config + weights, no optimizer) from a transformers directory. The
    weights are loaded into GPT first, so a file that checkpoint.load_model would refuse is never written. Every
    problem of --from-hf, --out and --dtype (which an import does not take) is named before a weight is read."""
    out_file = Path(out_file)

    def no_dtype():
        if dtype_name is not None:
            raise UserError("--dtype applies to an export (--checkpoint); an import always writes float32 weights")
    raise_all(lambda: hf_dir_config(hf_dir), lambda: check_import_out(out_file, force), no_dtype)
    config, state = load_hf_dir(hf_dir)
    with torch.device("meta"):
        model = GPT(config)
    try:
        model.load_state_dict(state, assign=True)  # strict: every tensor present with the config's shape
    except RuntimeError as e:
        raise UserError(f"{hf_dir}: weights do not match its config.json ({str(e).splitlines()[-1].strip()})")
    out_file.parent.mkdir(parents=True, exist_ok=True)  # (checked, not made, with the other problems)
    save_checkpoint({"model_config": dataclasses.asdict(config), "model": model.state_dict(),
                     "imported_from": str(hf_dir)}, out_file)  # the mark that --force may replace this file
    return out_file


# ----------------------------------------------------------------------------------------------------------------
# CLI

def path_flag(text: str) -> Path:
    """argparse type: cli.path_arg, as a Path."""
    return Path(path_arg(text))


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Examples:\n" + __doc__.rsplit("\n\n", 1)[-1])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=path_flag,
                        help="export this checkpoint file (or a run directory's newest checkpoint); the model card "
                             "reads training metrics from the run's metrics.jsonl when present")
    source.add_argument("--from-hf", type=path_flag,
                        help="import this transformers directory as a checkpoint: an export of this script, or "
                             "any LlamaForCausalLM it can express (multi-head attention, attention and MLP biases, "
                             "tied embedding, default RoPE, the 50257-token GPT-2 vocabulary)")
    p.add_argument("--out", type=path_flag, required=True,
                   help="export: the directory to write (must be new or empty unless --force); "
                        "import: the checkpoint file to write")
    p.add_argument("--dtype",
                   help=f"export only: weight dtype, one of {', '.join(DTYPES)} (default: float32, exact)")
    p.add_argument("--force", action="store_true",
                   help=f"replace an existing output: only an earlier export directory of this tool, unchanged (its "
                        f"{MARKER_FILE} lists every file), or a checkpoint an earlier --from-hf import wrote (never "
                        "a training checkpoint)")
    return p.parse_args(argv)


@main_entry
def main(argv=None):
    args = parse_args(argv)
    if args.from_hf is not None:
        out = import_hf(args.from_hf, args.out, args.force, args.dtype)
        print(f"wrote checkpoint {out} (load it with checkpoint.load_model)")
    else:
        out = export_checkpoint(args.checkpoint, args.out, "float32" if args.dtype is None else args.dtype, args.force)
        print(f"wrote {ARCHITECTURE} export {out} (load it with AutoModelForCausalLM.from_pretrained)")


if __name__ == "__main__":
    main()
