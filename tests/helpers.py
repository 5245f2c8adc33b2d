"""What more than one test module uses: running the repo's scripts, the tiny training recipe and reading its run, the
one-line-error assertion, tiny checkpoints and data sets, counting host syncs. Fixtures live in conftest.py; no test
module imports another test module."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import shards  # noqa: E402
import tokenizer  # noqa: E402


# --- running the repo's scripts ------------------------------------------------------------------------------------

def script_env(env=None) -> dict:
    """This process's environment for a repo script: unbuffered output, no hub downloads, `env` on top."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}


def run_script(*args, timeout=300, env=None, check=False):
    """Run a repo script (`train.py ...`, or ["-m", "torch.distributed.run", ...]) in a subprocess from the repo."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=script_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_scripts(*runs, timeout=300, env=None):
    """run_script for each argument tuple in `runs`, all started at once (a short run is mostly its interpreter
    importing torch on one core: side by side they use both). Returns their CompletedProcess in order."""
    procs = [subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=script_env(env)) for args in runs]
    try:
        outputs = [proc.communicate(timeout=timeout) for proc in procs]
        return [subprocess.CompletedProcess(proc.args, proc.returncode, *out) for proc, out in zip(procs, outputs)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_main(script, *args, check=False) -> subprocess.CompletedProcess:
    """A repo script's main(args) in this process, from the repo (as run_script), what run_script would show of it:
    the exit status (main's SystemExit; 0 when it returns) and what it printed, without the seconds a fresh
    interpreter spends importing torch. Only for runs that leave this process as they found it (a refusal before any
    work, a short run that sets no signal handler or environment variable), and not where the test is about the
    process itself (its exit, its signals, torchrun). `args` is [python, script, *args], as run_script's
    (assert_one_line_error reads it); `check` as run_script's."""
    import contextlib
    import importlib
    import io
    from unittest import mock
    main = importlib.import_module(Path(script).stem).main
    argv = [str(script), *map(str, args)]  # sys.argv too: argparse names the program after sys.argv[0]
    stdout, stderr = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", argv), contextlib.chdir(REPO), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        try:
            code = main(argv[1:]) or 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code
    if check and code != 0:
        raise AssertionError(f"{argv} failed ({code}):\n{stdout.getvalue()[-3000:]}\n{stderr.getvalue()[-3000:]}")
    return subprocess.CompletedProcess([sys.executable, *argv], code, stdout.getvalue(), stderr.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# One thread per process: torchrun sets this itself only with several processes per node, and the thread count can
# change how CPU kernels split their sums.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
FSDP_WORKER_STEP = 3  # tests/fsdp_worker.py's STEPS: its sharded checkpoint is step_000003


# --- the one-line error ----------------------------------------------------------------------------------------

def assert_one_line_error(proc, *needles, status=None, alone=False, argparse=False) -> str:
    """The one-line error: exit status non-zero (or `status`), no traceback, and stderr's non-empty lines end with
    exactly one error line, `error: ...`, holding every needle (no other line is an error line). `alone`: that line is
    all of stderr (a trailing newline aside). `argparse`: argparse's `PROG: error: ...` after its usage lines counts
    too, PROG the script run (`bench.py MODE` for a bench.py mode). `proc`: a CompletedProcess (an in-process main's
    exit code and captured stderr fit in one too). Returns the error line."""
    code, stderr = proc.returncode, proc.stderr
    assert code != 0 if status is None else code == status, (code, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, f"nothing on stderr (exit status {code})"
    prefixes = ["error: "]
    if argparse:
        script = Path(str(proc.args[1])).name
        prefixes.append(f"{script} {proc.args[2]}: error: " if script == "bench.py" else f"{script}: error: ")
    last = lines[-1]
    assert last.startswith(tuple(prefixes)), stderr
    assert not [line for line in lines[:-1] if line.startswith(tuple(prefixes)) or ": error: " in line], stderr
    assert not alone or stderr.rstrip("\n") == last, stderr
    for needle in needles:
        assert str(needle) in last, last
    return last


# --- the tiny training recipe and its run ---------------------------------------------------------------------

# A tiny, quick recipe on the debug model: 8 steps of 2 x 4 x 32 tokens, dropout on (the preset's).
TINY = ["--config", "debug", "--micro-batch", "4", "--seq-len", "32", "--total-batch-tokens", "256",
        "--max-steps", "8", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "4", "--val-tokens", "512",
        "--hellaswag-every", "0", "--hellaswag-limit", "2", "--sample-every", "0", "--sample-tokens", "4",
        "--ckpt-every", "0", "--keep-checkpoints", "0"]
NO_DROPOUT = ["--attn-dropout", "0", "--ffn-dropout", "0"]  # compiled dropout draws other masks than eager


def train(data, out, *extra, check=True, **kw):
    """train.py with TINY on `data` into `out`, `extra` flags on top."""
    return run_script("train.py", *TINY, "--data", data, "--out", out, *extra, check=check, **kw)


def train_events(run_dir) -> list[dict]:
    """The training-step events of a run's metrics.jsonl (those with a loss)."""
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


def train_losses(run_dir) -> dict:
    """{step: loss} of a run's metrics.jsonl."""
    return {e["step"]: e["loss"] for e in train_events(run_dir)}


def final_weights(run_dir, step=8):
    return torch.load(run_dir / "checkpoints" / f"step_{step:06d}.pt", weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_weights_close_relative_to_training(a, b, rel):
    """Per tensor: ||a - b|| <= rel * ||a - init||, the distance between two runs small next to how far training
    moved the weights. Elementwise tolerances do not fit here: AdamW's update m / (sqrt(v) + eps) turns a rounding
    difference in a near-zero gradient element into a full-size step of either sign, so a handful of elements differ
    by ~lr after a few steps without any bug, while a real bug (other data, other gradients) moves every tensor."""
    from model import GPT, GPTConfig
    init = GPT(GPTConfig.from_preset("debug"), seed=1337).state_dict()  # TINY's model and seed
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).norm() <= rel * (a[k] - init[k]).norm(), k


def assert_same_tensors(a: dict, b: dict, where=""):
    assert a.keys() == b.keys(), where
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
        else:
            assert torch.equal(a[key], b[key]), f"{where}.{key}"


def copy_run(run, to):
    import shutil
    shutil.copytree(run, to)
    return to


def limited_run(args, file_size_limit: int | None = None):
    """Run a repo script with RLIMIT_FSIZE set in the child: a write past it fails with EFBIG (SIGXFSZ ignored)."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if file_size_limit else None)


def garble(file) -> None:
    """Overwrite the middle half of `file` with random bytes, keeping its size."""
    data = bytearray(file.read_bytes())
    middle = slice(len(data) // 4, 3 * len(data) // 4)
    data[middle] = random.Random(0).randbytes(len(data[middle]))
    file.write_bytes(bytes(data))


# --- tiny checkpoints and data sets ----------------------------------------------------------------------------

def tiny_config(**overrides):
    """The real GPT-2 vocabulary (prompts and HellaSwag are real text) with a tiny body: fast on CPU."""
    from model import GPTConfig
    return GPTConfig(**{**dict(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32, ffn_hidden=64),
                        **overrides})


def save_tiny_checkpoint(path, seed: int = 0, **overrides):
    """A weights-only checkpoint of a tiny_config model at `path`; returns the model."""
    import dataclasses

    from checkpoint import save_checkpoint
    from model import GPT
    cfg = tiny_config(**overrides)
    model = GPT(cfg, seed=seed)
    save_checkpoint({"model_config": dataclasses.asdict(cfg), "model": model.state_dict()}, path)
    return model


TRAIN_SIZES = [101, 57, 200, 9]  # at seq_len 8, (tokens - 1) // 8 = 12, 7, 24, 1 windows: 44 per epoch
VAL_SIZES = [100, 100]


def make_dataset(folder, train_sizes=TRAIN_SIZES, val_sizes=VAL_SIZES):
    """Shards of consecutive token values (unique over the dataset) and their manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    entries, next_token = [], 0
    for split, sizes in [("val", val_sizes), ("train", train_sizes)]:
        for i, size in enumerate(sizes):
            name = f"{split}_{i:06d}.bin"
            tokens = np.arange(next_token, next_token + size, dtype=np.uint16)
            next_token += size
            sha = shards.write_shard(folder / name, tokens)
            entries.append({"file": name, "split": split, "tokens": size, "sha256": sha})
    assert next_token < 2 ** 16
    shards.write_manifest(folder, {"format": shards.MANIFEST_FORMAT, "tokenizer_sha256": tokenizer.RANKS_SHA256,
                                   "header_bytes": shards.HEADER_BYTES, "dtype": "uint16", "shards": entries})
    return folder


# --- host syncs of a training run ------------------------------------------------------------------------------

class SyncingOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts dispatched ops that make the host wait for the GPU on CUDA: reading a value (also from inside torch's
    own code) and ops whose output shape depends on values."""
    SYNCING = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2",
               "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.overloadpacket.__name__ in self.SYNCING:
            self.count += 1
        return func(*args, **(kwargs or {}))


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts Python-level reads of a tensor into host memory, which wait for the GPU on CUDA but dispatch nothing
    for a CPU tensor (.cpu(), .tolist(), .numpy()), and the value reads (.item(), bool(), float(), int()).
    `.to("cpu")` is not counted: on this CPU-only test machine the loader's host-to-device copies look the same."""
    READS = {"cpu", "tolist", "numpy", "item", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.paused and getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_syncs_in_run(embedded_data, out, steps: int, **overrides) -> int:
    """Host syncs of a training run (one process, eager) that stops after `steps` steps and logs only then. AdamW's
    step is left out: on CUDA it is fused AdamW, while the CPU optimizer reads its step counter with .item().
    `overrides`: more TrainConfig fields (test_tracking turns the trackers on)."""
    from devices import Dist
    from train import TrainConfig, Trainer
    cfg = TrainConfig.from_preset("debug", data=str(embedded_data), out=str(out), micro_batch="2", seq_len=32,
                                  total_batch_tokens=128, max_steps=100, stop_at_step=steps, log_every=1000,
                                  eval_every=0, hellaswag_every=0, sample_every=0, ckpt_every=0, **overrides)
    trainer = Trainer(cfg, "debug", Dist(), torch.device("cpu"))
    counters, optimizer_step = (SyncingOps(), HostReads()), trainer.optimizer.step

    def step_unrecorded(*args, **kwargs):
        for counter in counters:
            counter.paused = True
        try:
            return optimizer_step(*args, **kwargs)
        finally:
            for counter in counters:
                counter.paused = False
    trainer.optimizer.step = step_unrecorded
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with counters[0], counters[1]:
            trainer.run()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert trainer.step == steps
    return sum(counter.count for counter in counters)
