"""Benchmarks of training and generation: each mode times one thing and compares it against its baseline in the same
run.

  python bench.py train --config debug ...   training throughput and MFU (train.py's flags)
  python bench.py generate ...    generation with the KV cache vs recomputing the context
  python bench.py gpu ...         every GPU row (training levers, generation, transformers peers) under one deadline
                                  (bench_gpu.py: each row a train or generate run of this script)

Every mode prints a table and, with --out FILE, writes its figures as JSON. `python bench.py MODE --help` lists a
mode's flags. Data preparation is raced by bench_data_prep.py; memory per GPU is estimated by memory_estimate.py.
"""
import argparse
import cli
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

from bench_gpu import add_gpu_arguments, run_gpu
from cli import (UserError, hardware_name, main_entry, path_arg, positive_int, raise_all, run_and_write_result,
                 run_header)
from dataloader import TrainLoader
from devices import Dist, checked_device, enable_tf32, mfu, pick_device
from export_hf import hf_config, to_hf_state_dict
from generate import REFERENCE_PROMPTS
from model import GPT, PRESETS, GPTConfig, Sampling
from tokenizer import EOT_ID, get_tokenizer
from config import add_config_flags, config_from_flags
from train import Trainer, lr_at

MODES = {}  # mode name -> (add_arguments(parser), run(args) -> dict of figures)


# ----------------------------------------------------------------------------------------------------------------
# train: full training steps (forward, backward, clip, AdamW) built by train.py's own Trainer from train.py's own
# flags, so what is timed is exactly what training runs: same model, optimizer, token batch (--total-batch-tokens in
# micro-batches of --micro-batch, accumulated), compile/autocast settings and data loader.

def add_train_arguments(parser):
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


def time_steps(step, args, device, sync) -> tuple[float, dict]:
    """--warmup untimed calls of `step` (compilation included), then --steps timed ones: the median step in seconds,
    and the timed steps' figures (median, fastest, slowest; peak memory on CUDA)."""
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = [timed(step, sync) for _ in range(args.steps)]
    median = statistics.median(step_s)
    return median, {"step_ms": 1000 * median, "step_ms_min": 1000 * min(step_s), "step_ms_max": 1000 * max(step_s),
                    "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def check_train_flags(args, cfg) -> None:
    """What bench.py train adds to train.py's checks: its own --warmup, and --resume (or a flag of one) with no run to
    take up."""
    problems = []
    if args.warmup < 0:
        problems.append(f"--warmup must be >= 0, got {args.warmup}")
    resuming = [flag for flag, given in (("--resume", cfg.resume), ("--allow-fresh-start", cfg.allow_fresh_start),
                                         ("--allow-token-batch-change", cfg.allow_token_batch_change)) if given]
    if resuming:
        problems.append(f"{' '.join(resuming)}: bench.py train runs in a temporary folder of its own, with nothing to "
                        f"resume; leave {'it' if len(resuming) == 1 else 'them'} out")
    if problems:
        raise UserError("; ".join(problems))


def run_train(args) -> dict:
    cfg, preset = config_from_flags(vars(args))
    check_train_flags(args, cfg)
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
        median, step_figures = time_steps(step, args, device, sync)

        def read_batches():
            for _ in range(trainer.accum):
                trainer.loader.next_batch()
        loader_s = [timed(read_batches, sync) for _ in range(args.steps)]
        tokens_per_s = cfg.total_batch_tokens / median
        result = {
            "mode": "train", "config": preset, "device": hardware_name(device), "torch": torch.__version__,
            "micro_batch": trainer.micro_batch, "seq_len": cfg.seq_len, "accum": trainer.accum,
            "tokens_per_step": cfg.total_batch_tokens, "compile": cfg.compile, "autocast": cfg.autocast and on_cuda,
            "pad_vocab_to": trainer.model_config.pad_vocab_to,
            "activation_checkpointing": cfg.activation_checkpointing, "attn_backend": cfg.attn_backend,
            "loss_chunk_rows": cfg.loss_chunk_rows, "fp8": cfg.fp8,
            "dropout": [trainer.model_config.attn_dropout, trainer.model_config.ffn_dropout],
            "steps": args.steps, **step_figures, "tokens_per_s": tokens_per_s,
            "flops_per_token": trainer.flops_per_token, "peak_flops": trainer.peak,
            "mfu": mfu(trainer.flops_per_token, tokens_per_s, trainer.peak),
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
        memory = f"{peer['peak_memory_bytes'] / 2**30:.2f} GiB" if on_cuda else "n/a (CPU)"
        print_table([("transformers LlamaForCausalLM",
                      f"{peer['tokens_per_s']:,.0f} tokens/s, step {peer['step_ms']:.1f} ms, peak memory {memory}"),
                     ("ours / transformers", f"{result['peer_speedup']:.2f}x (first losses {result['losses'][0]:.4f} "
                                             f"vs {peer['losses'][0]:.4f})")])
    result["benchmarks_md_row"] = benchmarks_md_row(result, args.command)
    print(f"BENCHMARKS.md row:\n{result['benchmarks_md_row']}")
    return result


def peer_weights(model) -> dict:
    """Our initial weights under transformers' names (export_hf's own conversion), float32, on the CPU."""
    return {name: t.cpu() for name, t in to_hf_state_dict(model, model.wte.weight.dtype).items()}


def run_hf_peer(weights: dict, model_config, dataset, cfg, micro_batch: int, accum: int, device, sync, args) -> dict:
    """The same timed steps with transformers' LlamaForCausalLM (built from export_hf's config, locally, with our
    initial weights): a fresh loader with the run's seed (so the same batches, in the same order), the same
    micro-batch and accumulation, LR, AdamW settings (fused on CUDA), clipping, bf16 autocast on CUDA and
    torch.compile setting. Its loss is transformers' own, told the targets are already shifted (shift_labels)."""
    hf = hf_llama(model_config, weights).to(device).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    forward = torch.compile(hf) if cfg.compile else hf
    loader = TrainLoader(dataset, micro_batch, cfg.seq_len, seed=cfg.seed, device=device, log=lambda _: None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.autocast \
        else nullcontext()
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
    median, step_figures = time_steps(step, args, device, sync)
    return {"model": "transformers LlamaForCausalLM (sdpa)", **step_figures,
            "tokens_per_s": cfg.total_batch_tokens / median, "losses": [loss.item() for loss in losses]}


def profile_step(step, sync, on_cuda: bool, top: int = 20) -> dict:
    """One call of `step` under torch.profiler: the `top` kernels by GPU self time (on CPU: operators by CPU self
    time) with their share of the total, and the names of the attention operators and kernels that ran."""
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


def print_profile(profile: dict, of: str = "one step") -> None:
    print(f"profile of {of} ({profile['unit']}, {profile['total_ms']:.1f} ms in all), top {len(profile['top'])}:")
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
# them run bf16 weights.

def add_generate_arguments(parser):
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
                             "with the same weights (export_hf's conversion), built locally, on the same device; the "
                             "context must then hold the prompt (3 tokens) + --new-tokens")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more KV-cache run (torch.profiler): the top kernels by GPU time (on CPU "
                             "operators by CPU time) and their time per token beside the timed wall time per token, "
                             "which tells whether the device or the host (Python, launches) bounds decoding")


def generate_without_cache(model, idx, new_tokens: int):
    """Greedy decoding the plain way: each new token reruns the model over the (cropped) context, idx (1, T)."""
    with torch.no_grad():
        for _ in range(new_tokens):
            logits, _ = model(idx[:, -model.config.block_size:])  # (1, T, V)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def check_generate_window(args, prompt_len: int) -> None:
    """The context must hold the prompt; with --peer also prompt + new tokens: past it our model slides its window
    and transformers' generate does not, so the two would no longer compute the same thing."""
    if args.block_size < prompt_len:
        raise UserError(f"--block-size {args.block_size}: shorter than the {prompt_len}-token prompt; give "
                        f">= {prompt_len}")
    if args.peer and prompt_len + args.new_tokens > args.block_size:
        raise UserError(f"--peer with --block-size {args.block_size}: the prompt ({prompt_len} tokens) + --new-tokens "
                        f"{args.new_tokens} outgrow the context, where our model slides its window and transformers' "
                        f"generate does not (different work); give --block-size >= {prompt_len + args.new_tokens}")


def run_generate(args) -> dict:
    prompt_ids = get_tokenizer().encode(REFERENCE_PROMPTS[1])  # "HTML stands for"
    raise_all(lambda: check_generate_window(args, len(prompt_ids)), lambda: checked_device(args.device))
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # generate.py's inference dtype
    model = GPT(GPTConfig.from_preset(args.config, block_size=args.block_size)).to(device, dtype).eval()
    prompt = torch.tensor([prompt_ids], device=device)
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
    if compile and device.type == "cuda":  # > 0: a graph ran without its CUDA graph (TORCH_LOGS=cudagraphs: why)
        result["cudagraph_skips"] = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    if args.profile:
        result["profile"] = profile_step(lambda: paths["kv_cache"](args.new_tokens), sync, device.type == "cuda")
        result["profile"]["ms_per_token"] = result["profile"]["total_ms"] / args.new_tokens
        result["profile"]["per_token"] = generation_profile_line(result)
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
    if "cudagraph_skips" in result:
        print(f"decode graphs run without a CUDA graph: {result['cudagraph_skips']}")
    if args.profile:
        print_profile(result["profile"], of=f"one KV-cache run of {args.new_tokens} tokens")
        print(result["profile"]["per_token"])
    return result


def generation_profile_line(result: dict) -> str:
    """A token's time on the GPU (the profiled run's kernel time over its tokens) beside its timed wall time: near
    100% the kernels bound decoding, far below it the host does (Python, launches, a graph's replay). On the CPU
    the operators' time is the host's own and grows under the profiler: no share is given."""
    profiled, wall, unit = result["profile"]["ms_per_token"], result["ms_per_token"]["kv_cache"], \
        result["profile"]["unit"]
    share = f": {100 * profiled / wall:.0f}%" if unit.startswith("GPU") else ""
    return f"KV cache per token: {wall:.3f} ms wall (timed), {profiled:.3f} ms of {unit} (profiled run){share}"


def same_prefix(a, b, prompt_len: int) -> int:
    """How many new tokens two (1, T) outputs share before they first differ."""
    a, b = a[0, prompt_len:].tolist(), b[0, prompt_len:].tolist()
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def hf_greedy(model, prompt):
    """n -> transformers' greedy generate of n tokens after prompt (1, T), LlamaForCausalLM holding our model's
    weights in its dtype on its device (sdpa attention, transformers' default dynamic KV cache)."""
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
    from transformers import LlamaConfig, LlamaForCausalLM  # only here: only --peer needs it, and it takes seconds
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(model_config, "float32"), attn_implementation="sdpa"))
    hf.load_state_dict(weights, strict=False)  # lm_head is tied to the embedding: not in the exported tensors
    return hf


MODES["generate"] = (add_generate_arguments, run_generate)
MODES["gpu"] = (add_gpu_arguments, run_gpu)  # bench_gpu.py: the train and generate timers as rows


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
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    for name, (add_arguments, _) in MODES.items():
        # resolve: bench's --out (the JSON file) replaces train.py's --out (a run directory; bench uses a temporary)
        sub = modes.add_parser(name, conflict_handler="resolve")
        add_arguments(sub)
        sub.add_argument("--out", type=path_arg, help="write the figures as JSON to this file")
    args = parser.parse_args(argv)
    args.command = command_without_out(argv)
    # bench.py gpu checks its per-row folder beside --out first thing
    run_and_write_result(MODES[args.mode][1], args, f"bench.py {args.mode}")


if __name__ == "__main__":
    main()
