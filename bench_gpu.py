"""bench.py gpu: every GPU row in one command under one deadline (`python bench.py gpu --help`). Each row is
bench.py's own train or generate mode in a subprocess (fresh device memory and statistics; a crash, OOM or hang ends
that row only), most important first; when the time left is under what the row is expected to take (the wall time of
the last row of its kind), it is skipped, and a running row is killed at the deadline. The JSON (--out) is rewritten
after every row. bench.py holds the timers; this module runs them as rows.
"""
import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import shards
import tokenizer
from cli import (REPO_DIR, UserError, ensure_writable_dir, finite_float, git_commit, path_arg, positive_int,
                 write_json)
from dataloader import ShardDataset
from devices import checked_device
from model import PRESETS
from config import TrainConfig

GPU_ROWS = [  # (name, mode, kind (for the time estimate), the row's own flags), most important first
    ("train_compiled", "train", "compiled", ["--compile", "--profile"]),
    ("generate", "generate", "generate", ["--profile"]),
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
    parser.add_argument("--config", choices=sorted(PRESETS), default="lf_llm_269m",
                        help="model preset (default: lf_llm_269m)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu for a dry run (default: cuda)")
    parser.add_argument("--data", type=path_arg,
                        help="a data_prep.py output directory (build it on a CPU machine first); default: "
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
            figures = {k: v for k, v in r.items()
                       if "tokens_per_s" in k or k in ("speedup", "same_tokens", "cudagraph_skips")}
            lines.append(f"{row['name']}: " + ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in figures.items()))
            if "profile" in r:
                top = "; ".join(f"{e['name'][:60]} {100 * e['share']:.0f}%" for e in r["profile"]["top"][:3])
                lines.append(f"{row['name']}: {r['profile']['per_token']}; top: {top}")
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
    if not args.out:
        raise UserError("bench.py gpu writes its figures after every row: give --out FILE.json")
    out = Path(args.out)
    folder = gpu_rows_folder(out)  # each row's JSON and log; refused now if it is not one bench.py gpu made
    start = time.perf_counter()
    names = args.rows.split(",")
    known = {name: (mode, kind, flags) for name, mode, kind, flags in GPU_ROWS}
    if not names or not set(names) <= set(known):
        raise UserError(f"--rows {args.rows}: choose from {', '.join(known)}")
    on_cuda = checked_device(args.device).type == "cuda"  # a device this machine lacks is refused now, not per row
    defaults = dict(micro_batch=16, steps=10, warmup=3, new_tokens=256, compile=True) if on_cuda else \
        dict(micro_batch=2, seq_len=32, steps=2, warmup=1, new_tokens=8, compile=False)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    seq_len = args.seq_len or TrainConfig.from_preset(args.config).seq_len
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if args.data:
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


