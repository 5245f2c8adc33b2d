"""Fixtures shared by the test modules; the helpers they share are in helpers.py."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# run_script and run_scripts stay importable from here for modules that still import them from conftest
from helpers import (NO_DROPOUT, ONE_THREAD, TINY, TORCHRUN_2, run_script, run_scripts, script_env,  # noqa: E402,F401
                     train)

torch.set_num_threads(2)


@pytest.fixture
def repo_dir():
    return REPO


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory):
    """The embedded corpus prepared once per test session, in several small shards (so shard order matters). The
    validation split is small: a run's last step evaluates the whole split (--final-val-tokens 0), and 2048 tokens
    (63 windows of 32) keep that to a few batches instead of ~30 s of CPU per run."""
    out = tmp_path_factory.mktemp("data") / "embedded"
    run_script("data_prep.py", "--source", "embedded", "--out", out, "--shard-tokens", 60_000,
               "--val-tokens", 2_048, "--workers", 2, check=True)
    return out


@pytest.fixture(scope="session")
def run_at_step_4(embedded_data, tmp_path_factory):
    """A TINY run stopped after step 4, with checkpoints at steps 2 and 4 (tests work on copies of it: copy_run)."""
    out = tmp_path_factory.mktemp("runs") / "at_step_4"
    train(embedded_data, out, "--ckpt-every", "2", "--stop-at-step", "4")
    return out


@pytest.fixture(scope="session")
def ddp_run_without_dropout(embedded_data, tmp_path_factory):
    """A TINY run without dropout on 2 gloo processes (torchrun --standalone, one thread each): test_multinode's two
    single-process nodes must equal it bit for bit, test_train's one process accumulating to rounding."""
    out = tmp_path_factory.mktemp("runs") / "ddp_without_dropout"
    run_script(*TORCHRUN_2, "train.py", *TINY, *NO_DROPOUT, "--data", embedded_data, "--out", out, env=ONE_THREAD,
               check=True)
    return out


@pytest.fixture(scope="session")
def fsdp_worker(tmp_path_factory):
    """What one torchrun launch of tests/fsdp_worker.py (2 gloo processes) left: FSDP and plain training, a sharded
    checkpoint at step helpers.FSDP_WORKER_STEP under run/, reloads in every layout (test_fsdp, test_checkpoint)."""
    out = tmp_path_factory.mktemp("fsdp_worker")
    run_script(*TORCHRUN_2, REPO / "tests" / "fsdp_worker.py", "units", out, env=ONE_THREAD, check=True)
    return out
