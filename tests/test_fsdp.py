"""FSDP2 and sharded checkpoints (sharding.py, checkpoint.py, train.py --fsdp), all on CPU with gloo.

Unit checks: one torchrun launch of tests/fsdp_worker.py (2 processes, conftest's fsdp_worker fixture) trains, saves
and reloads in every layout; the tests read what it left (test_checkpoint's readers of its sharded checkpoint too).
Acceptance: a few short train.py runs (the `runs` fixture) compared with one process accumulating the same token
batch."""
import json
import re
import shutil

import pytest
import torch

import checkpoint
import sharding
from helpers import FSDP_WORKER_STEP as STEP
from helpers import (NO_DROPOUT, ONE_THREAD, REPO, TINY, TORCHRUN_2, assert_same_tensors,
                     assert_weights_close_relative_to_training, garble, run_script, run_scripts, train_events)


def test_fsdp_on_two_processes_clips_and_steps_like_one_process_accumulating(fsdp_worker):
    """Same token batch per step (one process: 4 micro-steps of 1 sequence; FSDP: 2 micro-steps of 1 sequence on
    each of 2 processes, gradients reduce-scattered and accumulated as shards), clipped to 0.5 (every pre-clip norm here
    is larger): each step's pre-clip norm, the global one over both processes' shards, agrees to rounding (measured
    up to 7e-7 relative), so the clipping and the weights it moved agree too (step 2's norm follows two updates)."""
    norms = json.loads((fsdp_worker / "grad_norms.json").read_text())
    assert len(norms["fsdp"]) == len(norms["plain"]) == 3 and min(norms["plain"]) > 0.5
    assert norms["fsdp"] == pytest.approx(norms["plain"], rel=1e-5)


def test_sharded_checkpoint_reloads_exactly_into_fsdp_and_plain_models_and_a_pt_into_fsdp(fsdp_worker):
    """Weights, AdamW moments and step counts come back bit for bit: from the sharded checkpoint into a fresh FSDP
    model on 2 processes and into a plain model on each (FSDP -> DDP), and from a plain run's .pt (optimizer state
    keyed by position) into FSDP (DDP -> FSDP). The loading run keeps its own optimizer settings."""
    loaded = torch.load(fsdp_worker / "loaded.pt", weights_only=True)
    assert_same_tensors(loaded["fsdp_from_sharded"], loaded["trained"], "fsdp_from_sharded")
    assert_same_tensors(loaded["plain_from_sharded"], loaded["trained"], "plain_from_sharded")
    assert_same_tensors(loaded["fsdp_from_pt"], loaded["plain"], "fsdp_from_pt")
    assert float(loaded["trained"]["optimizer"]["wte.weight"]["step"]) == STEP
    assert [g["weight_decay"] for g in loaded["fsdp_from_pt_settings"]] == [0.1, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in loaded["fsdp_from_pt_settings"])


def test_fsdp_holds_half_the_parameter_and_optimizer_bytes_per_process(fsdp_worker):
    """Measured on each process: the bytes of its parameter tensors (its shards) and AdamW moments, FSDP vs the same
    model unsharded (what each DDP process holds). The shards add up to the whole model exactly."""
    ranks = [json.loads((fsdp_worker / f"bytes_rank{r}.json").read_text()) for r in (0, 1)]
    plain = ranks[0]["plain"]["params"] + ranks[0]["plain"]["optimizer"]
    for rank in ranks:
        fsdp = rank["fsdp"]["params"] + rank["fsdp"]["optimizer"]
        assert 0.49 < fsdp / plain < 0.51, (fsdp, plain)
    assert sum(r["fsdp"]["params"] for r in ranks) == ranks[0]["plain"]["params"]


# --- train.py --fsdp: acceptance ------------------------------------------------------------------------------

RUN = [*TINY, *NO_DROPOUT, "--final-val-tokens", "512"]  # 8 steps of 2 x 4 x 32 tokens, no dropout


@pytest.fixture(scope="module")
def runs(embedded_data, tmp_path_factory):
    """The runs every acceptance test reads, made in one chain (each launch costs seconds of startup):
    single: one process, micro-batch 4 x 2 accumulation steps, checkpoints at steps 6 and 8: the reference;
    chain: 2 DDP processes (micro-batch 4) to step 2 (.pt), continued by 2 processes under --fsdp at micro-batch 2
        (2 accumulation steps), saving steps 4 and 6 (sharded), rank 0 SIGKILLed while it saves step 8; then, with
        a garbled step 7 added, resumed by one process without --fsdp (micro-batch 4) to step 8 (.pt).
        `after_kill` lists the checkpoint folder as the kill left it."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    single, chain, data = root / "single", root / "chain", ["--data", embedded_data]
    # the reference and the chain's first (DDP) part need nothing of each other: side by side, 3 processes
    for proc in run_scripts(("train.py", *RUN, *data, "--out", single, "--ckpt-every", "6"),
                            (*TORCHRUN_2, "train.py", *RUN, *data, "--out", chain, "--stop-at-step", "2"),
                            env=ONE_THREAD):
        assert proc.returncode == 0, (proc.args, proc.stdout[-3000:], proc.stderr[-3000:])
    ddp_log = (chain / "train.log").read_text()
    killed = run_script(*TORCHRUN_2, REPO / "tests" / "fsdp_worker.py", "kill-at-save", 8, *RUN, *data,
                        "--out", chain, "--resume", "--ckpt-every", "2", "--micro-batch", "2", env=ONE_THREAD)
    after_kill = sorted(p.name for p in checkpoint.checkpoint_dir(chain).iterdir())
    fsdp_log = (chain / "train.log").read_text()[len(ddp_log):]
    fsdp_events = train_events(chain)
    step_6, step_7 = (checkpoint.checkpoint_path(chain, s, sharded=True) for s in (6, 7))
    shutil.copytree(step_6, step_7)
    garble(step_7 / "__1_0.distcp")
    run_script("train.py", *RUN, *data, "--out", chain, "--resume", env=ONE_THREAD, check=True)
    return {"single": single, "chain": chain, "killed": killed, "after_kill": after_kill, "ddp_log": ddp_log,
            "fsdp_log": fsdp_log, "fsdp_events": fsdp_events,
            "one_log": (chain / "train.log").read_text()[len(ddp_log) + len(fsdp_log):]}


# Pre-clip grad norms, as clip_grad_norm_ computes them in float32, differ by more than the gradients do: over one
# process's whole 6.4M-element embedding gradient the float32 sum of squares loses more to rounding than over each
# of two halves (vs a float64 sum, measured 4.6e-4 low for the one process, 2.3e-4 for FSDP's shards at step 3).
# Measured against the single run: up to 3.5e-4 relative under FSDP, 5e-6 on one process after it; the losses of
# the whole chain agree to 1.4e-6.
FSDP_NORM_REL = 2e-3


def assert_steps_match(reference: list[dict], events: list[dict], steps: range, norm_rel: float) -> None:
    """Losses of `steps` equal the reference's up to the order of gradient sums (the DDP test's tolerance), grad
    norms to `norm_rel`; the tokens seen after each step are the reference's (the loader's global position)."""
    ours, theirs = {e["step"]: e for e in reference}, {e["step"]: e for e in events}
    assert set(steps) <= theirs.keys(), sorted(theirs)
    for step in steps:
        assert theirs[step]["loss"] == pytest.approx(ours[step]["loss"], rel=1e-5), step
        assert theirs[step]["grad_norm"] == pytest.approx(ours[step]["grad_norm"], rel=norm_rel), step
        assert theirs[step]["tokens"] == ours[step]["tokens"], step


def assert_same_state(reference, path) -> None:
    """The checkpoint at `path` holds weights close to the reference run's at that step (relative to how far
    training moved them, as in the DDP test) and the same loader state: the same global window position, so the
    next windows read are the same (the stream is a function of seed and position)."""
    step = checkpoint.checkpoint_step(path)
    theirs = checkpoint.load_checkpoint(path)[0]
    ours = torch.load(checkpoint.checkpoint_path(reference, step), weights_only=True)
    assert theirs["loader"] == ours["loader"] and theirs["step"] == step
    assert_weights_close_relative_to_training(ours["model"], theirs["model"], rel=1e-3)


def test_ddp_checkpoint_continues_under_fsdp_like_one_process_accumulating(runs):
    """2 DDP processes save step 2 (.pt); 2 FSDP processes (2 micro-steps of 2 each) continue from it. Against one
    process accumulating the same token batch (2 micro-steps of 4) from step 0: losses of steps 2-7 to 1e-5
    relative, grad norms to FSDP_NORM_REL; FSDP's step-6 checkpoint (sharded) holds close weights and the same
    loader position."""
    assert_steps_match(train_events(runs["single"]), runs["fsdp_events"], range(2, 8), FSDP_NORM_REL)
    assert_same_state(runs["single"], checkpoint.checkpoint_path(runs["chain"], 6, sharded=True))
    assert "layout changed: 2 processes x micro-batch 4 x 1 accumulation steps -> 2 x 2 x 2" in runs["fsdp_log"]


def test_fsdp_checkpoint_continues_on_one_process_without_fsdp(runs):
    """Saved by 2 FSDP processes at step 6, resumed by one plain process (2 accumulation steps) to step 8: it
    matches the single run. A newer step 7 with a garbled shard file (its size kept) was set aside loudly, naming
    the file."""
    assert_steps_match(train_events(runs["single"]), train_events(runs["chain"]), range(6, 8), FSDP_NORM_REL)
    assert_same_state(runs["single"], checkpoint.checkpoint_path(runs["chain"], 8))
    log = runs["one_log"]
    assert "layout changed: 2 processes x micro-batch 2 x 2 accumulation steps -> 1 x 4 x 2" in log
    assert re.search(r"moved a damaged checkpoint aside to \S*step_000007\.damaged: checkpoint \S*step_000007/"
                     r"__1_0\.distcp is corrupt or truncated", log), log
    assert "steps 7-7 are lost" in log


def test_kill_during_a_sharded_save_leaves_the_previous_checkpoint_for_resume(runs):
    """Rank 0 SIGKILLed while saving step 8 (every shard written, train_state.pt half written): step 6 is the newest
    checkpoint; the half-written step 8 sits under a temporary name, which the next start removes, and --resume
    continues from step 6."""
    assert runs["killed"].returncode != 0
    temporary, *kept = runs["after_kill"]
    assert kept == ["step_000002.pt", "step_000004", "step_000006"] and re.fullmatch(r"\.step_000008\.tmp\d+",
                                                                                     temporary)
    chain = runs["chain"]
    assert f"removed {checkpoint.checkpoint_dir(chain) / temporary}" in runs["one_log"]
    assert f"resume: continuing after step 6 from {checkpoint.checkpoint_path(chain, 6, True)}" in runs["one_log"]


def test_init_from_under_fsdp_starts_from_the_checkpoints_full_weights(embedded_data, tmp_path):
    """--init-from a .pt (full tensors) under --fsdp on 2 processes: each keeps its slice of the checkpoint's
    weights. At a learning rate of 1e-30 the one step leaves them as they were, so the sharded step-1 checkpoint,
    read back whole, holds the initial checkpoint's weights (zero biases moved by 5e-31)."""
    from model import GPT, GPTConfig
    init = tmp_path / "init.pt"
    model = GPT(GPTConfig.from_preset("debug", attn_dropout=0.0, ffn_dropout=0.0), seed=7)
    checkpoint.save_checkpoint({"model_config": model.config.__dict__, "model": model.state_dict()}, init)
    run = tmp_path / "run"
    run_script(*TORCHRUN_2, "train.py", *RUN, "--data", embedded_data, "--out", run, "--fsdp", "--init-from", init,
               "--stop-at-step", "1", "--max-lr", "1e-30", "--min-lr", "0", env=ONE_THREAD, check=True)
    assert f"init: weights from {init}" in (run / "train.log").read_text()
    state, found = checkpoint.load_checkpoint(run)
    assert found == checkpoint.checkpoint_path(run, 1, sharded=True)
    assert state["model"].keys() == model.state_dict().keys()
    for key, weight in model.state_dict().items():
        torch.testing.assert_close(state["model"][key], weight, rtol=0, atol=1e-29, msg=key)


def state_bytes(log: str) -> int:
    """Rank 0's measured parameter + optimizer state bytes, from its train.log."""
    line = re.search(r"memory: parameters ([\d,]+) bytes \+ optimizer state ([\d,]+) bytes", log)
    return int(line.group(1).replace(",", "")) + int(line.group(2).replace(",", ""))


def test_fsdp_process_holds_half_the_parameters_and_optimizer_state_of_a_ddp_process(runs):
    fsdp, ddp = state_bytes(runs["fsdp_log"]), state_bytes(runs["ddp_log"])
    assert 0.49 < fsdp / ddp < 0.51, (fsdp, ddp)


def test_fsdp_on_a_torch_without_fsdp2_is_one_line_naming_the_version(monkeypatch, embedded_data, tmp_path, capsys):
    import train
    monkeypatch.setattr(sharding, "fsdp_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--data", str(embedded_data), "--out", str(tmp_path / "run"), "--fsdp"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and re.fullmatch(r"error: --fsdp needs FSDP2 .* in torch 2\.6 or newer; this is torch .*",
                                            error[0]), error


def test_fsdp_without_torchrun_is_one_line(embedded_data, tmp_path, capsys):
    import train
    with pytest.raises(SystemExit):
        train.main([*TINY, "--data", str(embedded_data), "--out", str(tmp_path / "run"), "--fsdp"])
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: --fsdp shards the model over torchrun's processes"), error
