import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

torch.set_num_threads(2)


@pytest.fixture
def repo_dir():
    return REPO


def script_env(env=None) -> dict:
    """This process's environment for a repo script: unbuffered output, no hub downloads, `env` on top."""
    import os
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}


def run_script(*args, timeout=300, env=None, check=False):
    """Run a repo script (`train.py ...`, or ["-m", "torch.distributed.run", ...]) in a subprocess from the repo."""
    import subprocess
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=script_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_scripts(*runs, timeout=300, env=None):
    """run_script for each argument tuple in `runs`, all started at once (a short run is mostly its interpreter
    importing torch on one core: side by side they use both). Returns their CompletedProcess in order."""
    import subprocess
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


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory):
    """The embedded corpus prepared once per test session, in several small shards (so shard order matters). The
    validation split is small: a run's last step evaluates the whole split (--final-val-tokens 0), and 2048 tokens
    (63 windows of 32) keep that to a few batches instead of ~30 s of CPU per run."""
    out = tmp_path_factory.mktemp("data") / "embedded"
    run_script("data_prep.py", "--source", "embedded", "--out", out, "--shard-tokens", 60_000,
               "--val-tokens", 2_048, "--workers", 2, check=True)
    return out
