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


def run_script(*args, timeout=300, env=None, check=False):
    """Run a repo script (`train.py ...`, or ["-m", "torch.distributed.run", ...]) in a subprocess from the repo."""
    import os
    import subprocess
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory):
    """The embedded corpus prepared once per test session, in several small shards (so shard order matters)."""
    out = tmp_path_factory.mktemp("data") / "embedded"
    run_script("data_prep.py", "--source", "embedded", "--out", out, "--shard-tokens", 60_000,
               "--val-tokens", 30_000, "--workers", 2, check=True)
    return out
