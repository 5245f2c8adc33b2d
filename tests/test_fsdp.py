"""FSDP2 and sharded checkpoints (sharding.py, checkpoint.py): one torchrun launch of tests/fsdp_worker.py (2 gloo
processes) trains, saves, reloads in every layout and is killed mid-save; the tests below read what it left, the
single-process readers among them with no process group at all."""
import json
import shutil

import pytest
import torch

from conftest import REPO, run_script
import checkpoint
import sharding
from cli import UserError

STEP = 3  # the worker's STEPS: its sharded checkpoint is step_000003


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_worker")
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      REPO / "tests" / "fsdp_worker.py", out, env={"OMP_NUM_THREADS": "1"})
    # the last act, a save killed on rank 0, fails the launch on purpose: every file before it must be there
    assert (out / "killing").exists() and proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def assert_same_tensors(a: dict, b: dict, where=""):
    assert a.keys() == b.keys(), where
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
        else:
            assert torch.equal(a[key], b[key]), f"{where}.{key}"


def test_fsdp_on_two_processes_clips_and_steps_like_one_process_accumulating(worker):
    """Same token batch per step (one process: 4 micro-steps of 1 sequence; FSDP: 2 micro-steps of 1 sequence on
    each of 2 processes, gradients reduce-scattered on the last one only), clipped to 0.5 (every pre-clip norm here
    is larger): each step's pre-clip norm, the global one over both processes' shards, agrees to rounding (measured
    up to 7e-7 relative), so the clipping and the weights it moved agree too (step 2's norm follows two updates)."""
    norms = json.loads((worker / "grad_norms.json").read_text())
    assert len(norms["fsdp"]) == len(norms["plain"]) == 3 and min(norms["plain"]) > 0.5
    assert norms["fsdp"] == pytest.approx(norms["plain"], rel=1e-5)


def test_sharded_checkpoint_reloads_exactly_into_fsdp_and_plain_models_and_a_pt_into_fsdp(worker):
    """Weights, AdamW moments and step counts come back bit for bit: from the sharded checkpoint into a fresh FSDP
    model on 2 processes and into a plain model on each (FSDP -> DDP), and from a plain run's .pt (optimizer state
    keyed by position) into FSDP (DDP -> FSDP). The loading run keeps its own optimizer settings."""
    loaded = torch.load(worker / "loaded.pt", weights_only=True)
    assert_same_tensors(loaded["fsdp_from_sharded"], loaded["trained"], "fsdp_from_sharded")
    assert_same_tensors(loaded["plain_from_sharded"], loaded["trained"], "plain_from_sharded")
    assert_same_tensors(loaded["fsdp_from_pt"], loaded["plain"], "fsdp_from_pt")
    assert float(loaded["trained"]["optimizer"]["wte.weight"]["step"]) == STEP
    assert [g["weight_decay"] for g in loaded["fsdp_from_pt_settings"]] == [0.1, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in loaded["fsdp_from_pt_settings"])


def test_fsdp_holds_half_the_parameter_and_optimizer_bytes_per_process(worker):
    """Measured on each process: the bytes of its parameter tensors (its shards) and AdamW moments, FSDP vs the same
    model unsharded (what each DDP process holds). The shards add up to the whole model exactly."""
    ranks = [json.loads((worker / f"bytes_rank{r}.json").read_text()) for r in (0, 1)]
    plain = ranks[0]["plain"]["params"] + ranks[0]["plain"]["optimizer"]
    for rank in ranks:
        fsdp = rank["fsdp"]["params"] + rank["fsdp"]["optimizer"]
        assert 0.49 < fsdp / plain < 0.51, (fsdp, plain)
    assert sum(r["fsdp"]["params"] for r in ranks) == ranks[0]["plain"]["params"]


def test_single_process_readers_get_the_full_model_without_a_process_group(worker):
    """checkpoint.load_checkpoint (generate.py, hellaswag_eval.py, export_hf.py, GPT.from_checkpoint) on a sharded
    folder, or on its run directory, gives what a .pt file holds: format, model_config, the model as full tensors
    (the uneven embedding shards joined), and the extra state the trainer passed."""
    trained = torch.load(worker / "loaded.pt", weights_only=True)["trained"]["model"]
    run = worker / "run"
    for source in (run, checkpoint.checkpoint_path(run, STEP, sharded=True)):
        state, found = checkpoint.load_checkpoint(source)
        assert found == checkpoint.checkpoint_path(run, STEP, sharded=True)
        assert state["format"] == checkpoint.FORMAT and state["step"] == STEP
        assert state["note"] == "opaque to sharding.py"
        assert_same_tensors(state["model"], trained)
    model = checkpoint.load_model(run)
    assert_same_tensors(model.state_dict(), trained)
    assert "model" not in checkpoint.load_checkpoint_file(found, weights=False)


def test_save_killed_mid_write_leaves_the_previous_checkpoint_and_an_orphan_only(worker, tmp_path):
    """Rank 0 was SIGKILLed while writing step 4's train_state.pt, after both processes' shards: step 4 exists under
    no checkpoint name (a resume picks step 3), and its temporary folder is an orphan the next start removes."""
    run = tmp_path / "run"
    shutil.copytree(worker / "run", run)
    assert checkpoint.list_checkpoints(run) == [checkpoint.checkpoint_path(run, STEP, sharded=True)]
    state, found, damaged = checkpoint.newest_valid_checkpoint(run)
    assert found.name == f"step_{STEP:06d}" and state["step"] == STEP and not damaged
    orphans = checkpoint.remove_orphaned_temp_files(run)
    assert [p.name for p in orphans] == [p.name for p in (worker / "run" / "checkpoints").glob(".step_000004.tmp*")]
    assert len(orphans) == 1 and not orphans[0].exists()


@pytest.fixture
def damaged_run(worker, tmp_path):
    """A run with the good step 3 and a copy of it as step 5, for the test to damage."""
    run = tmp_path / "run"
    good = checkpoint.checkpoint_path(run, STEP, sharded=True)
    shutil.copytree(checkpoint.checkpoint_path(worker / "run", STEP, sharded=True), good)
    shutil.copytree(good, checkpoint.checkpoint_path(run, 5, sharded=True))
    return run, checkpoint.checkpoint_path(run, 5, sharded=True)


@pytest.mark.parametrize("damage, needle", [("missing", "missing its shard file __1_0.distcp"),
                                            ("truncated", "__0_0.distcp is truncated"),
                                            ("no_state", "has no train_state.pt"),
                                            ("bad_index", ".metadata is corrupt or truncated")])
def test_damaged_sharded_checkpoint_is_one_line_and_a_resume_falls_back(damaged_run, damage, needle):
    run, newer = damaged_run
    if damage == "missing":
        (newer / "__1_0.distcp").unlink()
    elif damage == "truncated":
        shard = newer / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "no_state":
        (newer / "train_state.pt").unlink()
    else:
        (newer / ".metadata").write_bytes((newer / ".metadata").read_bytes()[:50])
    with pytest.raises(checkpoint.CheckpointDamaged) as error:
        checkpoint.load_checkpoint_file(newer)
    assert needle in str(error.value) and "\n" not in str(error.value)
    state, found, damaged = checkpoint.newest_valid_checkpoint(run, weights=False)
    assert found.name == f"step_{STEP:06d}" and list(damaged) == [newer] and needle in damaged[newer]


def test_reader_script_names_the_missing_shard_in_one_line(damaged_run):
    run, newer = damaged_run
    (newer / "__1_0.distcp").unlink()
    proc = run_script("generate.py", "--checkpoint", newer, "--prompt", "a", "--max-new-tokens", "1")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: sharded checkpoint {newer} is missing its shard file "
                                                    "__1_0.distcp; use an earlier checkpoint")


def test_listing_pruning_and_setting_aside_treat_folders_like_files(tmp_path):
    """Folders and .pt files in one run: listed by step, pruned (a folder entirely, no temporary name left),
    quarantined and set aside by renaming."""
    folder = checkpoint.checkpoint_dir(tmp_path)
    for step, sharded in ((1, True), (2, False), (3, True), (4, True), (5, False)):
        path = checkpoint.checkpoint_path(tmp_path, step, sharded)
        if sharded:
            path.mkdir(parents=True)
            (path / "__0_0.distcp").write_bytes(b"x")
        else:
            path.write_bytes(b"x")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step_000001", "step_000002.pt", "step_000003", "step_000004", "step_000005.pt"]
    checkpoint.prune_checkpoints(tmp_path, keep=3)
    assert sorted(p.name for p in folder.iterdir()) == ["step_000003", "step_000004", "step_000005.pt"]
    checkpoint.quarantine_checkpoints(tmp_path, from_step=4)
    assert sorted(p.name for p in folder.iterdir()) == ["step_000003", "step_000004.nonfinite",
                                                       "step_000005.pt.nonfinite"]
    assert (folder / "step_000004.nonfinite" / "__0_0.distcp").exists()
    assert checkpoint.list_checkpoints(tmp_path) == [folder / "step_000003"]


def test_fsdp_on_a_torch_without_fsdp2_is_one_line_naming_the_version(monkeypatch):
    monkeypatch.setattr(sharding, "fsdp_available", lambda: False)
    with pytest.raises(UserError, match=r"--fsdp needs FSDP2 .* torch 2\.6 or newer; this is torch ") as error:
        sharding.require_fsdp()
    assert "\n" not in str(error.value)
