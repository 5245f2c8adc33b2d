"""Benchmarks: each mode measures one thing and compares against its baseline in the same run.

  python bench.py train --config debug ...   training throughput and MFU (train.py's flags)
  python bench.py data-prep ...   data_prep.py whole runs vs fineweb.py's Pool scheme and a 1-process loop
  python bench.py generate ...    generation with the KV cache vs recomputing the context
  python bench.py memory ...      memory per GPU (weights, gradients, AdamW, activations), DDP vs FSDP
  python bench.py gpu ...         every GPU row (training levers, generation, transformers peers) under one deadline

Every mode prints a table and, with --out FILE, writes its figures as JSON. `python bench.py MODE --help` lists a
mode's flags.
"""
import argparse
import cli
import contextlib
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

from cli import (REPO_DIR, UserError, check_result_out, ensure_writable_dir, finite_float, hardware_name, main_entry,
                 positive_int, run_header, write_json)

MODES = {}  # mode name -> (add_arguments(parser), run(args) -> dict of figures)


# ----------------------------------------------------------------------------------------------------------------
# train: full training steps (forward, backward, clip, AdamW) built by train.py's own Trainer from train.py's own
# flags, so what is timed is exactly what training runs: same model, optimizer, token batch (--total-batch-tokens in
# micro-batches of --micro-batch, accumulated), compile/autocast settings and data loader.

def add_train_arguments(parser):
    from train import add_config_flags
    add_config_flags(parser, default_preset="debug")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included (default 3)")
    parser.add_argument("--peer", action="store_true",
                        help="then time transformers' LlamaForCausalLM with the same initial weights (export_hf's "
                             "conversion), batches, optimizer settings, autocast and compile setting, and report the "
                             "ratio. Dropout is set to 0 on ours (Llama has none where ours has it)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step (torch.profiler): the top kernels by GPU time (on CPU operators "
                             "by CPU time) and the attention kernels that ran, in the JSON and printed")


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def run_train(args) -> dict:
    import gc
    import tempfile

    import torch

    from devices import Dist, enable_tf32, mfu, pick_device
    from train import Trainer, config_from_flags

    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    cfg, preset = config_from_flags(vars(args))
    if args.peer:
        cfg.attn_dropout = cfg.ffn_dropout = 0.0
    device = pick_device(cfg.device)
    on_cuda = device.type == "cuda"
    enable_tf32(device)
    sync = (lambda: torch.cuda.synchronize(device)) if on_cuda else (lambda: None)
    for line in run_header(device):
        print(line)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg.out = run_dir  # bench's --out is the JSON file; the run directory is a temporary one
        trainer = Trainer(cfg, preset, Dist(), device)
        initial_weights = peer_weights(trainer.model) if args.peer else None
        losses = []

        def step():
            loss, _ = trainer.train_step()
            losses.append(loss)
        for _ in range(args.warmup):
            step()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step_s = [timed(step, sync) for _ in range(args.steps)]

        def read_batches():
            for _ in range(trainer.accum):
                trainer.loader.next_batch()
        loader_s = [timed(read_batches, sync) for _ in range(args.steps)]
        median = statistics.median(step_s)
        tokens_per_s = cfg.total_batch_tokens / median
        result = {
            "mode": "train", "config": preset, "device": hardware_name(device), "torch": torch.__version__,
            "micro_batch": trainer.micro_batch, "seq_len": cfg.seq_len, "accum": trainer.accum,
            "tokens_per_step": cfg.total_batch_tokens, "compile": cfg.compile, "autocast": cfg.autocast and on_cuda,
            "pad_vocab_to": trainer.model_config.pad_vocab_to,
            "activation_checkpointing": cfg.activation_checkpointing, "attn_backend": cfg.attn_backend,
            "loss_chunk_rows": cfg.loss_chunk_rows, "fp8": cfg.fp8,
            "dropout": [trainer.model_config.attn_dropout, trainer.model_config.ffn_dropout],
            "steps": args.steps, "step_ms": 1000 * median, "step_ms_min": 1000 * min(step_s),
            "step_ms_max": 1000 * max(step_s), "tokens_per_s": tokens_per_s,
            "flops_per_token": trainer.flops_per_token, "peak_flops": trainer.peak,
            "mfu": mfu(trainer.flops_per_token, tokens_per_s, trainer.peak),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if on_cuda else None,
            "loader_fraction": statistics.median(loader_s) / median,
            "losses": [loss.item() for loss in losses],
        }
        profile = profile_step(step, sync, on_cuda) if args.profile else None
        peer = None
        if args.peer:
            dataset, model_config, micro_batch, accum = trainer.dataset, trainer.model_config, trainer.micro_batch, \
                trainer.accum
            del trainer, step  # our model and optimizer leave the device before the peer's arrive
            torch._dynamo.reset()  # compiled code holds on to our parameters
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()
            peer = run_hf_peer(initial_weights, model_config, dataset, cfg, micro_batch, accum, device, sync, args)
    if profile:
        result["profile"] = profile
    if peer:
        result["peer"] = peer
        result["peer_speedup"] = tokens_per_s / peer["tokens_per_s"]
    print_table([("device", result["device"]), ("batch", f"{result['micro_batch']} x {cfg.seq_len} x {result['accum']} "
                                                         f"micro-steps = {cfg.total_batch_tokens:,} tokens/step"),
                 ("compile / autocast / pad vocab", f"{cfg.compile} / {result['autocast']} / {result['pad_vocab_to']}"),
                 ("step time (median, min-max)", f"{result['step_ms']:.1f} ms ({result['step_ms_min']:.1f}-"
                                                 f"{result['step_ms_max']:.1f})"),
                 ("tokens/s", f"{tokens_per_s:,.0f}"),
                 ("MFU", f"{result['mfu']:.1%} of {result['peak_flops']:.3g} FLOP/s" if result["mfu"] is not None
                  else "n/a (no peak known for this device; pass --peak-flops)"),
                 ("peak memory", f"{result['peak_memory_bytes'] / 2**30:.2f} GiB" if on_cuda else "n/a (CPU)"),
                 ("data loader share of step", f"{100 * result['loader_fraction']:.3g}%")])
    if profile:
        print_profile(profile)
    if peer:
        print_table([("transformers LlamaForCausalLM", f"{peer['tokens_per_s']:,.0f} tokens/s, step "
                                                        f"{peer['step_ms']:.1f} ms, peak memory "
                                                        + (f"{peer['peak_memory_bytes'] / 2**30:.2f} GiB" if on_cuda
                                                           else "n/a (CPU)")),
                     ("ours / transformers", f"{result['peer_speedup']:.2f}x (first losses "
                                             f"{result['losses'][0]:.4f} vs "
                                             f"{peer['losses'][0]:.4f})")])
    result["benchmarks_md_row"] = benchmarks_md_row(result, args.command)
    print(f"BENCHMARKS.md row:\n{result['benchmarks_md_row']}")
    return result


def peer_weights(model) -> dict:
    """Our initial weights under transformers' names (export_hf's own conversion), float32, on the CPU."""
    from export_hf import to_hf_state_dict
    return {name: t.cpu() for name, t in to_hf_state_dict(model, model.wte.weight.dtype).items()}


def run_hf_peer(weights: dict, model_config, dataset, cfg, micro_batch: int, accum: int, device, sync, args) -> dict:
    """The same timed steps with transformers' LlamaForCausalLM (built from export_hf's config, locally, with our
    initial weights): a fresh loader with the run's seed (so the same batches, in the same order), the same
    micro-batch and accumulation, LR, AdamW settings (fused on CUDA), clipping, bf16 autocast on CUDA and
    torch.compile setting. Its loss is transformers' own, told the targets are already shifted (shift_labels)."""
    import contextlib

    import torch

    from dataloader import TrainLoader
    from train import lr_at
    hf = hf_llama(model_config, weights).to(device).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    forward = torch.compile(hf) if cfg.compile else hf
    loader = TrainLoader(dataset, micro_batch, cfg.seq_len, seed=cfg.seed, device=device, log=lambda _: None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.autocast \
        else contextlib.nullcontext()
    losses = []

    def step():
        loss_sum = torch.zeros((), device=device)
        for _ in range(accum):
            x, y = loader.next_batch()
            with autocast:
                loss = forward(input_ids=x, labels=y, shift_labels=y).loss
            (loss / accum).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum / accum)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = [timed(step, sync) for _ in range(args.steps)]
    median = statistics.median(step_s)
    return {"model": "transformers LlamaForCausalLM (sdpa)", "step_ms": 1000 * median,
            "step_ms_min": 1000 * min(step_s), "step_ms_max": 1000 * max(step_s), "tokens_per_s": cfg.total_batch_tokens / median,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "losses": [loss.item() for loss in losses]}


def profile_step(step, sync, on_cuda: bool, top: int = 20) -> dict:
    """One step under torch.profiler: the `top` kernels by GPU self time (on CPU: operators by CPU self time) with
    their share of the total, and the names of the attention operators and kernels that ran."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    events = prof.key_averages()
    if on_cuda:
        timed_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        time_of = lambda e: e.self_device_time_total  # noqa: E731
    else:
        timed_events = list(events)
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    total = sum(time_of(e) for e in timed_events) or 1
    ranked = sorted(timed_events, key=time_of, reverse=True)[:top]
    words = ("scaled_dot_product", "flash", "fmha", "cudnn", "attention", "sdpa")
    return {"unit": "GPU kernel self time" if on_cuda else "CPU operator self time", "total_ms": total / 1000,
            "top": [{"name": e.key, "ms": time_of(e) / 1000, "share": time_of(e) / total, "calls": e.count}
                    for e in ranked],
            "attention": sorted({e.key for e in events if any(w in e.key.lower() for w in words)})}


def print_profile(profile: dict) -> None:
    print(f"profile of one step ({profile['unit']}, {profile['total_ms']:.1f} ms in all), top {len(profile['top'])}:")
    for e in profile["top"]:
        print(f"{100 * e['share']:6.2f}% {e['ms']:9.2f} ms {e['calls']:6d}x  {e['name'][:120]}")
    print("attention operators and kernels that ran: " + ("; ".join(profile["attention"]) or "none found"))


def benchmarks_md_row(result: dict, command: str) -> str:
    """The measurement as a row of BENCHMARKS.md's training table (date, device, torch, command, tokens/s, step,
    MFU, peak memory, loader share), so that figures are pasted, never retyped."""
    cells = [time.strftime("%Y-%m-%d"), result["device"], result["torch"], f"`{command}`",
             f"{result['tokens_per_s']:,.0f}", f"{result['step_ms']:,.0f} ms",
             f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a",
             f"{result['peak_memory_bytes'] / 2**30:.1f} GiB" if result["peak_memory_bytes"] else "n/a",
             f"{100 * result['loader_fraction']:.2g}%"]
    return "| " + " | ".join(cells) + " |"


def print_table(rows) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


MODES["train"] = (add_train_arguments, run_train)


# ----------------------------------------------------------------------------------------------------------------
# generate: greedy decoding with the KV cache (model.generate, what generate.py runs: a prefill, then a decode step
# per token over the static cache, compiled into a CUDA graph on CUDA) vs rerunning the model over the whole context
# for every new token; with --peer also transformers' LlamaForCausalLM.generate with the same weights. On CUDA all of
# them run bf16 weights. Imports are local so that other modes do not pay for torch.

def add_generate_arguments(parser):
    from model import PRESETS
    parser.add_argument("--config", choices=sorted(PRESETS), default="debug", help="model preset (default: debug)")
    parser.add_argument("--new-tokens", type=positive_int, default=256,
                        help="tokens generated per timed run (default: 256)")
    parser.add_argument("--block-size", type=positive_int, default=512,
                        help="the model's context. The default fits the 3-token prompt + 256 new tokens, so the cache "
                             "is filled once. With the debug preset's own 128, once the window is full both paths "
                             "reread 128 tokens per step and the cache only helps the first 125 (default: 512)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed runs per path, median reported (default: 3)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the KV-cache path's decode step (CUDA graphs on CUDA); default: on CUDA only. "
                             "Compilation happens in the untimed warm-up (warmup_s)")
    parser.add_argument("--peer", action="store_true",
                        help="also time transformers' LlamaForCausalLM.generate (greedy, its default dynamic cache) "
                             "with the same weights (export_hf's conversion), built locally, on the same device")


def generate_without_cache(model, idx, new_tokens: int):
    """Greedy decoding the plain way: each new token reruns the model over the (cropped) context, idx (1, T)."""
    import torch
    with torch.no_grad():
        for _ in range(new_tokens):
            logits, _ = model(idx[:, -model.config.block_size:])  # (1, T, V)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def run_generate(args) -> dict:
    import os
    import platform

    import torch

    from devices import pick_device
    from generate import REFERENCE_PROMPTS
    from model import GPT, GPTConfig, Sampling
    from tokenizer import get_tokenizer

    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # generate.py's inference dtype
    model = GPT(GPTConfig.from_preset(args.config, block_size=args.block_size)).to(device, dtype).eval()
    prompt = torch.tensor([get_tokenizer().encode(REFERENCE_PROMPTS[1])], device=device)  # "HTML stands for"
    compile = device.type == "cuda" if args.compile is None else args.compile
    paths = {"kv_cache": lambda n: model.generate(prompt, Sampling(n, temperature=0), compile=compile),
             "recompute": lambda n: generate_without_cache(model, prompt, n)}
    if args.peer:
        paths["transformers"] = hf_greedy(model, prompt)

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def decode(path):
        outputs[path] = paths[path](args.new_tokens)

    # warm-up: compilation, CUDA-graph recording, first-call allocations and kernel selection stay out of the
    # timings (8 tokens reach the decode step's compilation and recording; it is the same graph for any length)
    warmup_s = {path: timed(lambda: paths[path](8), sync) for path in paths}
    seconds, outputs = {path: [] for path in paths}, {}
    for _ in range(args.repeats):  # alternate the paths so that a burst of load on a shared machine hits both
        for path in paths:
            seconds[path].append(timed(lambda: decode(path), sync))
    tokens_per_s = {path: args.new_tokens / statistics.median(s) for path, s in seconds.items()}
    result = {
        "config": args.config, "block_size": args.block_size, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "device": hardware_name(device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "load_average_1min": os.getloadavg()[0],
        "kv_cache_tokens_per_s": tokens_per_s["kv_cache"], "recompute_tokens_per_s": tokens_per_s["recompute"],
        "speedup": tokens_per_s["kv_cache"] / tokens_per_s["recompute"],
        # greedy: the paths must agree (in fp32; in bf16 a near tie can flip and the texts part from there)
        "same_tokens": torch.equal(outputs["kv_cache"], outputs["recompute"]),
        "same_prefix_tokens": same_prefix(outputs["kv_cache"], outputs["recompute"], prompt.size(1)),
        "dtype": str(dtype).removeprefix("torch."), "compiled": compile,
        "warmup_s": warmup_s, "ms_per_token": {path: 1000 / rate for path, rate in tokens_per_s.items()},
    }
    if args.peer:
        result.update(peer_tokens_per_s=tokens_per_s["transformers"],
                      peer_speedup=tokens_per_s["kv_cache"] / tokens_per_s["transformers"],
                      peer_same_prefix_tokens=same_prefix(outputs["kv_cache"], outputs["transformers"],
                                                          prompt.size(1)))
    print(f"generate, {args.config} preset (block_size {args.block_size}), {args.new_tokens} new tokens, greedy, "
          f"{device} {result['dtype']}, {result['torch_threads']} threads, median of {args.repeats}, KV-cache decode "
          f"step {'compiled' if compile else 'eager'}")
    print(f"{'path':<14}{'tokens/s':>12}{'ms/token':>10}{'warm-up s':>11}")
    for path, rate in tokens_per_s.items():
        print(f"{path:<14}{rate:>12.1f}{1000 / rate:>10.2f}{warmup_s[path]:>11.1f}")
    print(f"KV cache / recompute {result['speedup']:.2f}x, same tokens: {result['same_tokens']} "
          f"({result['same_prefix_tokens']} of {args.new_tokens} equal before the first difference)")
    if args.peer:
        print(f"ours / transformers {result['peer_speedup']:.2f}x ({result['peer_same_prefix_tokens']} tokens equal "
              f"before the first difference)")
    return result


def same_prefix(a, b, prompt_len: int) -> int:
    """How many new tokens two (1, T) outputs share before they first differ."""
    a, b = a[0, prompt_len:].tolist(), b[0, prompt_len:].tolist()
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def hf_greedy(model, prompt):
    """n -> transformers' greedy generate of n tokens after prompt (1, T), LlamaForCausalLM holding our model's
    weights in its dtype on its device (sdpa attention, transformers' default dynamic KV cache)."""
    import torch

    from export_hf import to_hf_state_dict
    from tokenizer import EOT_ID
    weights = to_hf_state_dict(model, model.wte.weight.dtype)
    hf = hf_llama(model.config, weights).to(model.wte.weight.device, model.wte.weight.dtype).eval()

    def generate(n):
        with torch.no_grad():  # min_new_tokens: all n tokens, as ours (no stop at <|endoftext|>)
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=EOT_ID)
    return generate


def hf_llama(model_config, weights: dict):
    """transformers' LlamaForCausalLM (sdpa attention) built locally from export_hf's config (no hub), holding
    `weights` (our tensors under its names: export_hf.to_hf_state_dict), float32 on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from export_hf import hf_config
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(model_config, "float32"), attn_implementation="sdpa"))
    hf.load_state_dict(weights, strict=False)  # lm_head is tied to the embedding: not in the exported tensors
    return hf


MODES["generate"] = (add_generate_arguments, run_generate)


# ----------------------------------------------------------------------------------------------------------------
# data-prep: whole runs, each in its own process on the same parquet files (a local copy laid out like FineWeb-Edu's
# sample-10BT) with the same process count, from launch to the last shard: data_prep.py --source hf; the scheme of
# build-nanogpt's fineweb.py (datasets.load_dataset, then Pool.imap(tokenize, rows, chunksize=16) into uint16
# shards; written here from its description); and a single-process loop. Figures: seconds, CPU seconds, tokens
# (identical token streams are checked), peak memory (PSS) of the process tree and peak disk (cache + output).

DATA_PREP_COLUMNS = ("id", "dump", "url", "file_path", "language", "language_score", "token_count", "score",
                     "int_score")  # FineWeb-Edu's columns besides text: datasets' Arrow cache holds them all
TEXT_SUFFIXES = (".py", ".md", ".rst", ".txt", ".html")


def add_data_prep_arguments(parser):
    from data_prep import available_cores
    parser.add_argument("--corpus-mb", type=finite_float, default=50, help="corpus size in MB (default: 50)")
    parser.add_argument("--text-root", nargs="+", metavar="DIR",
                        help="build the corpus from the text files under these folders (.py .md .rst .txt .html, "
                             "cut into ~4 KB documents at blank lines, repeated with a pass number when short); "
                             "default: the embedded corpus's speeches, repeated")
    parser.add_argument("--workers", type=int, default=available_cores(),
                        help="processes of every parallel scheme (default: all cores, here %(default)s)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default: 100M)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="whole runs of each scheme, taking turns; the fastest is reported (default: 1)")
    parser.add_argument("--schemes", default="data_prep,pool,loop",
                        help="which to run, comma-separated (default: data_prep,pool,loop)")
    parser.add_argument("--work-dir", default=str(REPO_DIR / "temp_data" / "bench_data_prep"),
                        help="corpus, caches and outputs, removed afterwards: a new or empty folder, or one an "
                             "earlier benchmark left (default: %(default)s)")


def local_documents(roots: list[str]):
    """~4 KB documents (whole paragraphs) from the UTF-8 text files under `roots`, in path order."""
    from data_prep import split_paragraphs
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.suffix not in TEXT_SUFFIXES or not path.is_file():
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            doc = []
            for paragraph in split_paragraphs(text):
                doc.append(paragraph)
                if sum(map(len, doc)) >= 4000:
                    yield "\n\n".join(doc)
                    doc = []
            if doc:
                yield "\n\n".join(doc)


def write_bench_corpus(folder: Path, megabytes: float, text_roots: list[str] | None, files: int = 8) -> int:
    """A folder laid out like FineWeb-Edu (README.md whose configs map sample-10BT to sample/10BT/*.parquet) with
    `files` parquet files of about `megabytes` MB of text in all, row groups of 1,000 documents; returns the text
    bytes. Documents repeat (with a pass number in front) when the source is shorter."""
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep import embedded_documents
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n  - split: train\n"
                                      "    path: sample/10BT/*.parquet\n---\n")
    docs, size = [], 0
    for repeat in itertools.count():
        for doc in (local_documents(text_roots) if text_roots else embedded_documents()):
            doc = f"({repeat}) {doc}" if repeat else doc
            docs.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= megabytes * 1e6:
                break
        if size >= megabytes * 1e6:
            break
    (folder / "sample" / "10BT").mkdir(parents=True)
    per_file = -(-len(docs) // files)
    for i in range(files):
        part = docs[i * per_file:(i + 1) * per_file]
        extra = {name: [f"{name}-{i}-{j}" for j in range(len(part))] for name in DATA_PREP_COLUMNS}
        pq.write_table(pa.table({"text": part, **extra}), folder / "sample" / "10BT" / f"{i:03d}_00000.parquet",
                       row_group_size=1000)
    return size


class RawShards:
    """The token stream cut into headerless uint16 files of `shard_tokens` (the first one val), as fineweb.py
    writes them."""

    def __init__(self, out: Path, shard_tokens: int):
        import numpy as np
        self.out, self.buffer, self.fill, self.count = out, np.empty(shard_tokens, np.uint16), 0, 0
        out.mkdir(parents=True)

    def add(self, tokens) -> None:
        while tokens.size:
            n = min(tokens.size, self.buffer.size - self.fill)
            self.buffer[self.fill:self.fill + n] = tokens[:n]
            self.fill, tokens = self.fill + n, tokens[n:]
            if self.fill == self.buffer.size:
                self.close()

    def close(self) -> None:
        if self.fill:
            self.buffer[:self.fill].tofile(self.out / f"{'val' if self.count == 0 else 'train'}_{self.count:06d}.bin")
            self.count, self.fill = self.count + 1, 0


def _pool_scheme_tokenize(row: dict):
    import numpy as np

    from tokenizer import EOT_ID, get_tokenizer
    return np.array([EOT_ID, *get_tokenizer().encode_ordinary(row["text"])], dtype=np.uint16)


def pool_scheme(dataset: str, out: str, workers: int, shard_tokens: int, cache_dir: str) -> None:
    """fineweb.py's scheme: the dataset loaded (and converted to Arrow) by datasets, rows sent to a pool 16 at a
    time, token arrays back in order into the shard buffer."""
    import multiprocessing

    import datasets
    rows = datasets.load_dataset(dataset, name="sample-10BT", split="train", cache_dir=cache_dir)
    writer = RawShards(Path(out), shard_tokens)
    with multiprocessing.Pool(workers) as pool:
        for tokens in pool.imap(_pool_scheme_tokenize, rows, chunksize=16):
            writer.add(tokens)
    writer.close()


def loop_scheme(dataset: str, out: str, workers: int, shard_tokens: int, cache_dir: str) -> None:
    """One process: each parquet file read with pyarrow, each document encoded in turn."""
    import numpy as np
    import pyarrow.parquet as pq

    from tokenizer import EOT_ID, get_tokenizer
    enc = get_tokenizer()
    writer = RawShards(Path(out), shard_tokens)
    for path in sorted((Path(dataset) / "sample" / "10BT").glob("*.parquet")):
        for text in pq.read_table(path, columns=["text"]).column(0).to_pylist():
            writer.add(np.array([EOT_ID, *enc.encode_ordinary(text)], dtype=np.uint16))
    writer.close()


# data_prep.py as run from the command line, plus a note of when the first document reaches a worker
FIRST_DOCUMENT_PROBE = """
import os, sys, time
marker, sys.argv = sys.argv[1], ["data_prep.py", *sys.argv[2:]]
import data_prep
tokenize = data_prep.tokenize_documents
def noting_the_first(texts):
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, repr(time.time()).encode())
        os.close(fd)
    except FileExistsError:
        pass
    return tokenize(texts)
data_prep.tokenize_documents = noting_the_first
data_prep.main()
"""


def process_tree_pss(pid: int) -> int:
    """Proportional resident bytes (PSS: pages shared by forked workers counted once in all) of `pid` and all its
    descendants, from /proc."""
    children, pss = {}, 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                children.setdefault(int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(
                    int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            rollup = (Path("/proc") / str(p) / "smaps_rollup").read_text()
            pss += int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1)) * 1024
        except (OSError, AttributeError):
            pass
    return pss


def folder_bytes(*folders: Path) -> int:
    return sum(p.stat().st_size for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file())


def run_measured(command: list[str], disk_folders: list[Path], env: dict) -> dict:
    """Run `command`; its wall time, CPU time (all its processes), and peaks of process-tree RSS and of the disk used
    under `disk_folders`, sampled every 0.1 s."""
    import resource
    import subprocess
    import threading
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peaks = {"memory": 0, "disk": 0}  # memory: PSS of the process tree

    def sample():
        while proc.poll() is None:
            peaks["memory"] = max(peaks["memory"], process_tree_pss(proc.pid))
            peaks["disk"] = max(peaks["disk"], folder_bytes(*disk_folders))
            time.sleep(0.1)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise UserError(f"{shlex.join(command[:4])}... failed ({proc.returncode}): {output.strip()[-2000:]}")
    peaks["disk"] = max(peaks["disk"], folder_bytes(*disk_folders))
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = cpu.ru_utime + cpu.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_pss_bytes": peaks["memory"],
            "peak_disk_bytes": peaks["disk"]}


def token_stream(out: Path) -> tuple[int, str]:
    """(token count, sha256 of the tokens) of an output folder: data_prep.py's shards in manifest order, or the
    headerless shards in name order (val first)."""
    import hashlib

    import numpy as np

    import shards
    digest, count = hashlib.sha256(), 0
    if (out / shards.MANIFEST_NAME).exists():
        manifest = shards.read_manifest(out)
        arrays = (shards.open_shard(out / s["file"], s["tokens"]) for s in manifest["shards"])
    else:
        files = sorted(out.glob("*.bin"), key=lambda p: int(p.stem.split("_")[1]))  # val_000000, train_000001, ...
        arrays = (np.fromfile(p, dtype=np.uint16) for p in files)
    for tokens in arrays:
        digest.update(np.ascontiguousarray(tokens).tobytes())
        count += tokens.size
    return count, digest.hexdigest()


def run_scheme(scheme: str, root: Path, corpus: Path, args, env: dict) -> dict:
    """One whole run of `scheme` on the corpus, measured; its output and cache are removed afterwards."""
    import shutil
    out, cache = root / f"out_{scheme}", root / f"cache_{scheme}"
    if scheme == "data_prep":
        marker = root / "first_document"
        marker.unlink(missing_ok=True)
        command = [sys.executable, "-c", FIRST_DOCUMENT_PROBE, str(marker), "--source", "hf", "--dataset",
                   str(corpus), "--name", "sample-10BT", "--out", str(out), "--workers", str(args.workers),
                   "--shard-tokens", str(args.shard_tokens), "--cache-dir", str(cache)]
    else:
        call = (f"import sys, bench; bench.{scheme}_scheme(sys.argv[1], sys.argv[2], int(sys.argv[3]), "
                f"int(sys.argv[4]), sys.argv[5])")
        command = [sys.executable, "-c", call, str(corpus), str(out), str(args.workers), str(args.shard_tokens),
                   str(cache)]
    launched = time.time()
    try:
        run = run_measured(command, [out, cache], env)
        run["tokens"], run["sha256"] = token_stream(out)
        run["shard_bytes"], run["cache_bytes"] = folder_bytes(out), folder_bytes(cache)
        if scheme == "data_prep":
            run["first_document_s"] = float(marker.read_text()) - launched
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return run


def best_of(runs: list[dict]) -> dict:
    """The runs of one scheme summed up: the least disturbed time (minimum: other load only ever adds), the
    largest memory and disk, and every time."""
    summary = {**runs[-1], "seconds_each": [r["seconds"] for r in runs]}
    for key in ("seconds", "cpu_seconds", "first_document_s"):
        if key in runs[-1]:
            summary[key] = min(r[key] for r in runs)
    for key in ("peak_pss_bytes", "peak_disk_bytes"):
        summary[key] = max(r[key] for r in runs)
    return summary


WORK_DIR_MARKER = ".bench-data-prep"  # in a --work-dir bench.py made: it may remove that folder


def claim_work_dir(root: Path) -> Path:
    """--work-dir, emptied and marked as bench.py's (the marker file) for this run, which removes it afterwards. A
    non-empty folder without the marker holds someone else's files: refused, nothing removed. One with it is the
    leftover of an earlier benchmark (killed before its cleanup): cleared."""
    import shutil
    if root.is_dir() and any(root.iterdir()) and not (root / WORK_DIR_MARKER).is_file():
        raise UserError(f"--work-dir {root} holds files bench.py did not write, and the benchmark removes its work "
                        "folder afterwards; give a new or empty folder")
    if root.is_dir():
        shutil.rmtree(root)
    ensure_writable_dir(root, "--work-dir")
    (root / WORK_DIR_MARKER).touch()
    return root


def run_data_prep(args) -> dict:
    import os
    import shutil
    if args.corpus_mb <= 0 or args.workers < 1 or args.shard_tokens < 1 or args.repeats < 1:
        raise UserError("--corpus-mb must be > 0, --workers, --shard-tokens and --repeats >= 1")
    schemes = args.schemes.split(",")
    if not set(schemes) <= {"data_prep", "pool", "loop"}:
        raise UserError(f"--schemes {args.schemes}: choose from data_prep, pool, loop")
    root = claim_work_dir(Path(args.work_dir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    runs = {scheme: [] for scheme in schemes}
    try:
        corpus = root / "fineweb-edu"
        text_bytes = write_bench_corpus(corpus, args.corpus_mb, args.text_root)
        corpus_bytes = folder_bytes(corpus / "sample")
        for _ in range(args.repeats):  # the schemes take turns, so that a busy spell is shared out
            for scheme in schemes:
                runs[scheme].append(run_scheme(scheme, root, corpus, args, env))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    streams = {(r["tokens"], r["sha256"]) for scheme_runs in runs.values() for r in scheme_runs}
    if len(streams) != 1:
        raise UserError(f"the schemes made different token streams: { {k: r[0]['tokens'] for k, r in runs.items()} }")
    results = {scheme: best_of(scheme_runs) for scheme, scheme_runs in runs.items()}
    result = {"corpus_mb": text_bytes / 1e6, "parquet_mb": corpus_bytes / 1e6, "tokens": next(iter(streams))[0],
              "workers": args.workers, "shard_tokens": args.shard_tokens, "repeats": args.repeats,
              "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0], "schemes": results,
              "same_tokens": True}
    if "data_prep" in results:
        for other in set(results) - {"data_prep"}:
            result[f"speedup_vs_{other}"] = results[other]["seconds"] / results["data_prep"]["seconds"]
    print_data_prep_table(result)
    return result


def print_data_prep_table(result: dict) -> None:
    print(f"\ndata-prep: {result['corpus_mb']:.1f} MB of text in {result['parquet_mb']:.1f} MB of parquet, "
          f"{result['tokens'] / 1e6:.1f}M tokens (identical in every scheme), {result['workers']} processes, "
          f"shards of {result['shard_tokens']} tokens, best of {result['repeats']}, {result['cpu_count']} CPUs, "
          f"load average {result['load_average_1min']:.2f} at the end")
    labels = {"data_prep": "data_prep.py --source hf", "pool": "Pool.imap scheme (datasets load)",
              "loop": "single-process loop"}
    print(f"{'whole run':<34}{'seconds':>9}{'Mtok/s':>8}{'CPU s':>8}{'peak PSS MB':>13}{'peak disk MB':>14}")
    for name, r in result["schemes"].items():
        print(f"{labels[name]:<34}{r['seconds']:>9.2f}{result['tokens'] / r['seconds'] / 1e6:>8.2f}"
              f"{r['cpu_seconds']:>8.1f}{r['peak_pss_bytes'] / 1e6:>13.0f}{r['peak_disk_bytes'] / 1e6:>14.0f}")
    for key in sorted(k for k in result if k.startswith("speedup_vs_")):
        print(f"data_prep.py vs {key.removeprefix('speedup_vs_')}: {result[key]:.2f}x")
    if "data_prep" in result["schemes"]:
        print(f"first document in a worker {result['schemes']['data_prep']['first_document_s']:.2f} s after launch")


MODES["data-prep"] = (add_data_prep_arguments, run_data_prep)


# ----------------------------------------------------------------------------------------------------------------
# memory: bytes per GPU of weights, gradients, AdamW state and activations, DDP vs FSDP, computed from the model.
# Parameter bytes come from the model's own parameters (built on the meta device); activation bytes are the tensors
# autograd saves for backward in a real training forward (CPU, bf16 autocast, train mode with the preset's dropout)
# of the embedding + head + loss alone and with one block, at batch 1, scaled by the micro-batch and the blocks.

def add_memory_arguments(parser):
    parser.add_argument("--configs", default="lf_llm_269m,lf_llm_1b",
                        help="model presets, comma-separated (default: lf_llm_269m,lf_llm_1b)")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per GPU (default: 16)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default: 2048)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs that FSDP shards over (default: 8)")
    parser.add_argument("--gpu-gib", type=float, default=80, help="memory per GPU in GiB (default: 80)")


def cast_of_parameter(t) -> bool:
    """Whether saved tensor t is autocast's bf16 copy of a parameter (maybe transposed): going back through its
    autograd history, only casts and transposes lead to a parameter."""
    fn = t.grad_fn
    while fn is not None and fn.name() in ("ToCopyBackward0", "TBackward0", "TransposeBackward0"):
        fn = fn.next_functions[0][0]
    return t.grad_fn is not None and fn is not None and fn.name() == "torch::autograd::AccumulateGrad"


def saved_tensor_bytes(model, idx, targets) -> tuple[dict, object]:
    """Bytes that autograd keeps for backward after model(idx, targets) under bf16 autocast, each storage once:
    'weight_copies' (autocast's bf16 casts of parameters, saved by the matmuls) and 'activations' (the rest). The
    fp32 parameters themselves are weights, not counted. Also returns the loss (its graph holds what was saved)."""
    import torch
    seen, sizes = set(), {"activations": 0, "weight_copies": 0}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and not (t.requires_grad and t.grad_fn is None):
            seen.add(storage.data_ptr())
            sizes["weight_copies" if cast_of_parameter(t) else "activations"] += storage.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, targets)
    return sizes, loss


def attention_saves(loss) -> dict:
    """{attention backward node: names of the tensors it saved}, found by walking the loss's autograd graph."""
    import torch
    found, stack, seen = {}, [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "Attention" in fn.name():
            found[fn.name()] = sorted(a[len("_saved_"):] for a in dir(fn)
                                      if a.startswith("_saved_") and isinstance(getattr(fn, a), torch.Tensor))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def model_with_blocks(cfg, n_layer: int):
    """The preset's shape with n_layer blocks, on CPU in train mode (random weights: memory does not depend on
    their values; built on meta first because the init scheme divides by the number of blocks)."""
    import dataclasses

    import torch

    from model import GPT
    with torch.device("meta"):
        model = GPT(dataclasses.replace(cfg, n_layer=n_layer))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.reset_rope_tables()
    return model.train()


def measure_activations(cfg, seq_len: int) -> dict:
    """Saved bytes at batch 1 of the embedding + final norm + tied head + loss ('head'), of one block (the model
    with one block minus the head part), and of a block's input (what activation checkpointing keeps per block)."""
    import torch
    gen = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, cfg.vocab_size, (1, seq_len), generator=gen) for _ in range(2))
    head, _ = saved_tensor_bytes(model_with_blocks(cfg, 0), idx, targets)
    model = model_with_blocks(cfg, 1)
    block_inputs = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: block_inputs.append(args[0].nbytes))
    one, loss = saved_tensor_bytes(model, idx, targets)
    return {"head": head, "block": {k: one[k] - head[k] for k in one}, "block_input": block_inputs[0],
            "attention_saves": attention_saves(loss)}


def fsdp_shard_numel(params, gpus: int) -> int:
    """Elements one GPU holds when every parameter is split along dim 0 into `gpus` chunks (FSDP2's fully_shard;
    the last chunks are padded up to the first's size, so this is what every rank allocates)."""
    return sum(-(-p.shape[0] // gpus) * (p.numel() // p.shape[0]) for p in params)


def memory_per_gpu(model, acts: dict, micro_batch: int, gpus: int) -> dict:
    """Bytes per GPU of each part, for DDP and FSDP, without and with activation checkpointing ('_ac').

    DDP: fp32 weights, fp32 .grad plus DDP's fp32 gradient buckets (a second copy: train.py does not pass
    gradient_as_bucket_view), AdamW's exp_avg and exp_avg_sq in fp32, and the saved activations including autocast's
    bf16 weight copies. FSDP (fully_shard per block and on the root, bf16 compute, fp32 master weights): weights,
    gradients and AdamW state sharded over the GPUs, plus the unsharded bf16 parameters of the root (embedding =
    tied head, all-gathered for the whole step) and of two blocks (the running one and the prefetched next), plus the
    unsharded gradients of the root and of one block before their reduce-scatter, counted in fp32. The bf16
    parameters are what the matmuls save, and they are freed after each block's forward: no weight copies in the
    activations. With checkpointing, each block keeps its input and one block's internals are live during its
    recompute in backward."""
    params = list(model.parameters())
    total, block = sum(p.numel() for p in params), sum(p.numel() for p in model.blocks[0].parameters())
    root, n_layer, B = total - model.config.n_layer * block, model.config.n_layer, micro_batch
    head, blk, x_in = acts["head"], acts["block"], acts["block_input"]
    head_act, block_act = head["activations"], blk["activations"]
    copies = n_layer * blk["weight_copies"] + head["weight_copies"]
    recompute = block_act - x_in  # one block's internals besides the input it already keeps
    shard = fsdp_shard_numel(params, gpus)
    ddp = {"weights": 4 * total, "gradients": 8 * total, "adamw": 8 * total}
    fsdp = {"weights": 4 * shard + 2 * (root + 2 * block), "gradients": 4 * shard + 4 * (root + block),
            "adamw": 8 * shard}
    activations = {
        "ddp": B * (n_layer * block_act + head_act) + B * copies,
        "ddp_ac": B * (n_layer * x_in + recompute + head_act) + B * (blk["weight_copies"] + head["weight_copies"]),
        "fsdp": B * (n_layer * block_act + head_act),
        "fsdp_ac": B * (n_layer * x_in + recompute + head_act),
    }
    return {name: {**(ddp if name.startswith("ddp") else fsdp), "activations": act,
                   "total": sum((ddp if name.startswith("ddp") else fsdp).values()) + act}
            for name, act in activations.items()}


def run_memory(args) -> dict:
    import dataclasses

    import torch

    from model import GPT, PRESETS, GPTConfig

    names = args.configs.split(",")
    if any(n not in PRESETS for n in names):
        raise UserError(f"--configs {args.configs!r}: valid presets are {', '.join(PRESETS)}")
    if min(args.micro_batch, args.seq_len, args.gpus) < 1 or not 0 < args.gpu_gib < float("inf"):
        raise UserError("--micro-batch, --seq-len and --gpus must be >= 1, --gpu-gib a number > 0")
    budget = args.gpu_gib * 2 ** 30
    result = {"micro_batch": args.micro_batch, "seq_len": args.seq_len, "gpus": args.gpus, "gpu_gib": args.gpu_gib,
              "torch": torch.__version__, "measured_on": hardware_name(torch.device("cpu")), "configs": {}}
    labels = {"ddp": "DDP", "ddp_ac": "DDP + activation ckpt", "fsdp": f"FSDP over {args.gpus}",
              "fsdp_ac": f"FSDP over {args.gpus} + activation ckpt"}
    for name in names:
        cfg = GPTConfig.from_preset(name)
        if args.seq_len > cfg.block_size:
            raise UserError(f"--seq-len {args.seq_len} is longer than {name}'s context ({cfg.block_size})")
        with torch.device("meta"):
            model = GPT(cfg)
        acts = measure_activations(cfg, args.seq_len)
        table = memory_per_gpu(model, acts, args.micro_batch, args.gpus)
        result["configs"][name] = {"parameters": model.num_params(), "measured_at_batch_1": acts, "per_gpu": table,
                                   "model_config": dataclasses.asdict(cfg)}
        print(f"\n{name}: {model.num_params():,} parameters, micro-batch {args.micro_batch} x {args.seq_len}, "
              f"{args.gpus} GPUs x {args.gpu_gib:g} GiB; GiB per GPU")
        print(f"{'':<32}{'weights':>9}{'grads':>9}{'AdamW':>9}{'activ.':>9}{'total':>9}  fits")
        for key, row in table.items():
            cells = "".join(f"{row[k] / 2 ** 30:>9.2f}" for k in ("weights", "gradients", "adamw", "activations",
                                                                    "total"))
            print(f"{labels[key]:<32}{cells}  {'yes' if row['total'] <= budget else 'no'}")
        for node, saved in acts["attention_saves"].items():
            print(f"attention: {node} saves {', '.join(saved)}")
    print("\nNot counted: the CUDA context and allocator slack, the step's transient buffers (e.g. the logits' "
          "gradient in backward, as large as the saved fp32 log-softmax), and FSDP's bf16 inputs to blocks (its "
          "mixed precision casts them; here the residual stream is measured in fp32 as autocast keeps it).")
    return result


MODES["memory"] = (add_memory_arguments, run_memory)


# ----------------------------------------------------------------------------------------------------------------
# gpu: every GPU row in one command under one deadline. Each row is this script's own train or generate mode in a
# subprocess (fresh device memory and statistics; a crash, OOM or hang ends that row only), most important first;
# when the time left is under what the row is expected to take (the wall time of the last row of its kind), it is
# skipped, and a running row is killed at the deadline. The JSON (--out) is rewritten after every row.

GPU_ROWS = [  # (name, mode, kind (for the time estimate), the row's own flags), most important first
    ("train_compiled", "train", "compiled", ["--compile", "--profile"]),
    ("generate", "generate", "generate", []),
    ("attn_cudnn", "train", "compiled", ["--compile", "--attn-backend", "cudnn", "--profile"]),
    ("attn_flash", "train", "compiled", ["--compile", "--attn-backend", "flash", "--profile"]),
    ("chunked_loss", "train", "compiled", ["--compile", "--loss-chunk-rows", "CHUNK"]),
    ("fp8", "train", "compiled", ["--compile", "--fp8"]),
    ("pad_vocab_64", "train", "compiled", ["--compile", "--pad-vocab-to", "64"]),
    ("peer_train_compiled", "train", "peer", ["--compile", "--peer"]),
    ("peer_generate", "generate", "generate", ["--peer"]),
    ("train_eager", "train", "eager", ["--no-compile", "--profile"]),
]


def add_gpu_arguments(parser):
    from model import PRESETS
    parser.add_argument("--config", choices=sorted(PRESETS), default="lf_llm_269m",
                        help="model preset (default: lf_llm_269m)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu for a dry run (default: cuda)")
    parser.add_argument("--data", help="a data_prep.py output directory (build it on a CPU machine first); default: "
                                       "random tokens, written as a small dataset next to --out")
    parser.add_argument("--deadline-s", type=finite_float, default=480,
                        help="seconds for everything, compilation included; rows that would not fit are skipped "
                             "and a row still running at the deadline is killed (default: 480)")
    # defaults: (on CUDA, on a CPU dry run)
    parser.add_argument("--micro-batch", type=positive_int, help="sequences per step (default: 16; CPU 2)")
    parser.add_argument("--seq-len", type=positive_int,
                        help="tokens per sequence (default: the preset's training seq-len, 2048; CPU 32)")
    parser.add_argument("--steps", type=positive_int, help="timed steps per training row (default: 10; CPU 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first per row (default: 3; CPU 1)")
    parser.add_argument("--new-tokens", type=positive_int, help="tokens per timed generation run (default: 256; CPU 8)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="torch.compile the rows marked compiled (default: on CUDA yes; on a CPU dry run no: "
                             "there compilation takes minutes)")
    parser.add_argument("--rows", default=",".join(name for name, *_ in GPU_ROWS),
                        help="which rows, comma-separated, run in the listed order (default: all: %(default)s)")


def random_token_data(folder: Path, micro_batch: int, seq_len: int) -> Path:
    """A dataset of uniformly random GPT-2 token ids (seed 0): a train shard of 8 micro-batches of windows and a
    val shard of one, in data_prep.py's format. Speed does not depend on the tokens' values."""
    import numpy as np

    import shards
    import tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    rng, entries = np.random.default_rng(0), []
    for split, windows in (("train", 8 * micro_batch), ("val", micro_batch)):
        tokens = rng.integers(0, tokenizer.EOT_ID + 1, windows * seq_len + 1, dtype=np.uint16)
        name = f"{split}_000000.bin"
        entries.append({"file": name, "split": split, "tokens": len(tokens),
                        "sha256": shards.write_shard(folder / name, tokens)})
    shards.write_manifest(folder, {"format": shards.MANIFEST_FORMAT, "tokenizer_sha256": tokenizer.RANKS_SHA256,
                                   "header_bytes": shards.HEADER_BYTES, "dtype": "uint16", "shards": entries})
    return folder


def gpu_row_command(name: str, mode: str, flags: list[str], args, data: str, seq_len: int, out: Path) -> list[str]:
    if mode == "generate":
        common = ["--config", args.config, "--device", args.device, "--new-tokens", str(args.new_tokens)]
    else:
        chunk = str(max(1, args.micro_batch * seq_len // 8))  # 8 chunks of rows: 4,096 rows at 16 x 2048
        compile_flag = "--compile" if args.compile else "--no-compile"
        flags = [chunk if f == "CHUNK" else compile_flag if f == "--compile" else f for f in flags]
        common = ["--config", args.config, "--data", data, "--device", args.device, "--micro-batch",
                  str(args.micro_batch), "--seq-len", str(seq_len), "--total-batch-tokens",
                  str(args.micro_batch * seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    return [sys.executable, str(REPO_DIR / "bench.py"), mode, *common, *flags, "--out", str(out)]


def run_gpu_row(command: list[str], log: Path, timeout: float) -> dict:
    """Run one row's process (its own session, so a timeout kills everything it started), output to `log`."""
    import os
    import signal
    import subprocess
    start = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_DIR, start_new_session=True)
        try:
            rc = process.wait(timeout=max(timeout, 0.01))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            rc = None
    row = {"wall_s": time.perf_counter() - start, "returncode": rc}
    if rc is None:
        row.update(status="timeout", error=f"killed at the deadline after {row['wall_s']:.0f} s")
    elif rc != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        row.update(status="error", error=lines[-1].removeprefix("error: ") if lines else f"exit status {rc}, no output")
    return row


def gpu_report_lines(rows: list[dict]) -> list[str]:
    """What the rows measured, one line each: BENCHMARKS.md training rows as they are, then the other figures."""
    lines = []
    for row in rows:
        r = row.get("result")
        if row["status"] != "ok":
            lines.append(f"{row['name']}: {row['status']}: {row.get('error') or row.get('reason')}")
        elif "benchmarks_md_row" in r:
            lines.append(f"{row['name']}: {r['benchmarks_md_row']}")
            if "profile" in r:
                lines.append(f"{row['name']}: attention ran as: {'; '.join(r['profile']['attention'])}")
            if "peer" in r:
                lines.append(f"{row['name']}: transformers {r['peer']['tokens_per_s']:,.0f} tokens/s, ours "
                             f"{r['tokens_per_s']:,.0f}: {r['peer_speedup']:.2f}x")
        else:
            figures = {k: v for k, v in r.items() if "tokens_per_s" in k or k in ("speedup", "same_tokens")}
            lines.append(f"{row['name']}: " + ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in figures.items()))
    return lines


GPU_ROWS_MARKER = ".bench-gpu-rows"  # in the <out stem>_rows/ folder bench.py gpu made: it writes into that one only


def gpu_rows_folder(out: Path) -> Path:
    """<--out's stem>_rows/ beside --out (gpu.json -> gpu_rows/): refused (UserError) unless it is missing or a folder
    bench.py gpu made (its marker file): a file, or someone else's folder, is left alone."""
    folder = out.parent / (out.stem + "_rows")
    if (folder.exists() or folder.is_symlink()) and not (folder.is_dir() and (folder / GPU_ROWS_MARKER).is_file()):
        raise UserError(f"--out {out}: its per-row folder {folder} exists and is not one bench.py gpu made (no "
                        f"{GPU_ROWS_MARKER} in it); remove it or choose another --out")
    return folder


def claim_gpu_rows_folder(folder: Path) -> None:
    """Create the per-row folder (checked by gpu_rows_folder) and mark it as bench.py gpu's."""
    ensure_writable_dir(folder, "--out's per-row folder")
    (folder / GPU_ROWS_MARKER).touch()


def run_gpu(args) -> dict:
    import importlib.util
    import json

    if not args.out:
        raise UserError("bench.py gpu writes its figures after every row: give --out FILE.json")
    out = Path(args.out)
    folder = gpu_rows_folder(out)  # each row's JSON and log; refused now if it is not one bench.py gpu made

    from cli import git_commit
    from train import TRAIN_PRESETS
    start = time.perf_counter()
    names = args.rows.split(",")
    known = {name: (mode, kind, flags) for name, mode, kind, flags in GPU_ROWS}
    if not names or not set(names) <= set(known):
        raise UserError(f"--rows {args.rows}: choose from {', '.join(known)}")
    on_cuda = args.device.startswith("cuda")
    defaults = dict(micro_batch=16, steps=10, warmup=3, new_tokens=256, compile=True) if on_cuda else \
        dict(micro_batch=2, seq_len=32, steps=2, warmup=1, new_tokens=8, compile=False)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    seq_len = args.seq_len or TRAIN_PRESETS.get(args.config, TRAIN_PRESETS["lf_llm_269m"]).seq_len
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if args.data:
        from dataloader import ShardDataset
        ShardDataset.open(args.data, verify_sha256=False)  # a missing or unfinished dataset is refused now
    claim_gpu_rows_folder(folder)
    if args.data:
        data = args.data
    else:
        data = str(random_token_data(folder / "random_tokens", args.micro_batch, seq_len))
    result = {"mode": "gpu", "config": args.config, "device": args.device, "commit": git_commit(),
              "data": args.data or "random tokens", "micro_batch": args.micro_batch, "seq_len": seq_len,
              "compile": args.compile, "steps": args.steps, "warmup": args.warmup, "new_tokens": args.new_tokens,
              "deadline_s": args.deadline_s, "command": args.command, "rows": []}
    seconds_of_kind = {}  # wall time of the last finished row of each kind: the estimate for the next
    auto_attention = []  # the attention operators the default (auto) training row ran
    for name in names:
        mode, kind, flags = known[name]
        left = args.deadline_s - (time.perf_counter() - start)
        expected = seconds_of_kind.get(kind, 2 * seconds_of_kind.get("compiled", 0) if kind == "peer"
                                       else min(seconds_of_kind.values(), default=0))
        command = gpu_row_command(name, mode, flags, args, data, seq_len, folder / f"{name}.json")
        row = {"name": name, "command": shlex.join(command[1:])}
        pinned = flags[flags.index("--attn-backend") + 1] if "--attn-backend" in flags else None
        if pinned and any(f"_scaled_dot_product_{pinned}_attention" in op for op in auto_attention):
            row.update(status="skipped", reason=f"train_compiled (--attn-backend auto) already ran {pinned} "
                                                f"attention: its figures are this row's")
        elif name == "fp8" and importlib.util.find_spec("torchao") is None:
            row.update(status="skipped", reason="torchao is not installed (pip install torchao)")
        elif left <= 0:
            row.update(status="skipped", reason="deadline reached")
        elif left < expected:
            row.update(status="skipped", reason=f"deadline: {left:.0f} s left, the row is expected to take "
                                                f"{expected:.0f} s (the last row of its kind, else the shortest)")
        else:
            print(f"[{time.perf_counter() - start:5.0f} s] {name}: {row['command']}", flush=True)
            row.update(run_gpu_row(command, folder / f"{name}.log", timeout=left))
            if row["returncode"] == 0:
                row.update(status="ok", result=json.loads((folder / f"{name}.json").read_text()))
                seconds_of_kind[kind] = row["wall_s"]
                if name == "train_compiled":
                    auto_attention = row["result"]["profile"]["attention"]
            print(f"[{time.perf_counter() - start:5.0f} s] {name}: {row['status']} in {row['wall_s']:.0f} s"
                  + (f": {row['error']}" if "error" in row else ""), flush=True)
        result["rows"].append(row)
        result["elapsed_s"] = time.perf_counter() - start
        write_json(out, result, written_by="bench.py gpu")  # after every row: a killed run leaves what it measured
    result["report"] = gpu_report_lines(result["rows"])
    print("\n".join(result["report"]))
    return result


MODES["gpu"] = (add_gpu_arguments, run_gpu)


def check_out(mode: str, out: str) -> None:
    """--out up front: a result path bench.py may write (cli.check_result_out: replaces only a result of bench.py,
    its "written_by" marker) and, for the gpu mode, a per-row folder beside it that bench.py gpu made or may make."""
    check_result_out(out, f"bench.py {mode}")
    if mode == "gpu":
        gpu_rows_folder(Path(out))


def command_without_out(argv: list[str]) -> str:
    """The arguments as a shell command line without --out FILE (where the JSON went is not part of the figure)."""
    kept, skip = [], False
    for arg in argv:
        if not skip and arg != "--out" and not arg.startswith("--out="):
            kept.append(arg)
        skip = arg == "--out"
    return shlex.join(kept)


@main_entry(memory_hint="try a lower --micro-batch (accumulation keeps the tokens per step), --micro-batch auto or "
                        "--activation-checkpointing")
def main(argv=None):
    argv = list(map(str, sys.argv[1:] if argv is None else argv))
    if argv[:1] and argv[0] in MODES:  # --out refused before the mode's flags import torch (seconds); checked again
        early = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
        early.add_argument("--out")
        with contextlib.suppress(argparse.ArgumentError):  # a malformed --out: the full parser says so below
            if (out := early.parse_known_args(argv[1:])[0].out):
                check_out(argv[0], out)
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    for name, (add_arguments, _) in MODES.items():
        # resolve: bench's --out (the JSON file) replaces train.py's --out (a run directory; bench uses a temporary)
        sub = modes.add_parser(name, conflict_handler="resolve")
        if argv[:1] == [name]:  # only the chosen mode's flags: adding them imports what the mode needs (torch...)
            add_arguments(sub)
            sub.add_argument("--out", help="write the figures as JSON to this file")
    args = parser.parse_args(argv)
    args.command = command_without_out(argv)
    if args.out:  # refused now rather than after the measurement: a folder, a file not ours, an unwritable folder
        check_out(args.mode, args.out)
    result = MODES[args.mode][1](args)
    if args.out:
        write_json(args.out, result, written_by=f"bench.py {args.mode}")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
