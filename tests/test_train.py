"""train.py: schedule, batch derivation, exact resume, DDP equivalence, preemption, restarts, bad input."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from cli import UserError
from devices import largest_fitting
from helpers import (NO_DROPOUT, REPO, TINY, assert_one_line_error, assert_same_weights,
                     assert_weights_close_relative_to_training, copy_run, final_weights, make_dataset, run_script,
                     train, train_events, train_losses)
from train import TrainConfig, grad_accum_steps, lr_at, micro_batch_candidates, parse_config


@pytest.fixture(scope="module")
def straight_run(embedded_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "straight"
    train(embedded_data, out)
    return out


# --- pure functions -------------------------------------------------------------------------------------------

def test_the_readmes_recipe_table_states_the_defaults():
    """The README's recipe table is TrainConfig's defaults and what follows from them, each figure read from the
    table: the token batch (a power of two), the micro-batch and the accumulation on 8 GPUs it gives, max_steps as
    the whole batches in the stated token count, the optimizer and the schedule (min_lr a tenth of max_lr)."""
    cfg = TrainConfig()
    readme = (REPO / "README.md").read_text()

    def row(name: str) -> str:
        return re.search(rf"^\| {name} \| (.*) \|$", readme, re.MULTILINE).group(1)

    def number(text: str) -> float:
        return float(text.replace(",", ""))
    batch = re.fullmatch(r"([\d,]+) tokens per optimizer step \(2\^(\d+)\): micro-batch (\d+) x ([\d,]+) per GPU, "
                         r"accumulation derived from the GPU count \((\d+) on (\d+) GPUs\)", row("batch"))
    assert cfg.total_batch_tokens == number(batch[1]) == 2 ** int(batch[2])
    assert int(cfg.micro_batch) == int(batch[3]) and cfg.seq_len == number(batch[4])
    assert grad_accum_steps(cfg.total_batch_tokens, int(cfg.micro_batch), cfg.seq_len, int(batch[6])) == int(batch[5])
    steps = re.fullmatch(r"([\d,]+) \((\d+)B tokens\)", row("steps"))
    assert cfg.max_steps == number(steps[1]) == int(steps[2]) * 10 ** 9 // cfg.total_batch_tokens
    optimizer = re.match(r"AdamW, betas \(([\d.]+), ([\d.]+)\), eps ([\d.e-]+), weight decay ([\d.]+) ",
                         row("optimizer"))
    assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay) == tuple(map(float, optimizer.groups()))
    assert row("other").startswith(f"gradient clipping at {cfg.grad_clip}, ")
    schedule = re.fullmatch(r"linear warmup over (\d+) steps \((\d+)M tokens\) to ([\d.e-]+), cosine decay to "
                            r"([\d.e-]+) at the last step", row("schedule"))
    assert cfg.warmup_steps == int(schedule[1])
    assert cfg.warmup_steps * cfg.total_batch_tokens == pytest.approx(int(schedule[2]) * 1e6, rel=0.01)
    assert (cfg.max_lr, cfg.min_lr) == (float(schedule[3]), float(schedule[4]))
    assert cfg.min_lr == pytest.approx(0.1 * cfg.max_lr)


def test_lr_schedule_warms_up_linearly_then_decays_like_a_half_cosine_to_min_lr():
    """The schedule's properties rather than its formula: over warmup_steps a linear rise from max_lr / warmup_steps
    to max_lr; from there to the last step a non-increasing curve from max_lr down to exactly min_lr, symmetric about
    its middle (lr(k) + lr(n - k) = max_lr + min_lr, k steps into a decay of n), above the straight line between its
    ends in the first half and below it in the second (a half cosine, not a linear decay)."""
    cfg = TrainConfig()
    warm, last = cfg.warmup_steps, cfg.max_steps - 1
    lrs = [lr_at(step, cfg) for step in range(cfg.max_steps)]
    assert lrs[0] == pytest.approx(cfg.max_lr / warm)
    assert all(b - a == pytest.approx(cfg.max_lr / warm) for a, b in zip(lrs[:warm - 1], lrs[1:warm]))
    assert lrs[warm - 1] == pytest.approx(cfg.max_lr) and lrs[warm] == pytest.approx(cfg.max_lr)
    assert lrs[last] == cfg.min_lr  # reached exactly at the last step
    decay, n = lrs[warm:], last - warm
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    for k in range(1, n):
        assert decay[k] + decay[n - k] == pytest.approx(cfg.max_lr + cfg.min_lr), k
        straight = cfg.max_lr + (cfg.min_lr - cfg.max_lr) * k / n
        assert decay[k] > straight if 2 * k < n else decay[k] < straight if 2 * k > n else True, k


def test_grad_accum_derivation_and_error():
    assert grad_accum_steps(524_288, 16, 2048, 1) == 16
    assert grad_accum_steps(524_288, 8, 2048, 4) == 8
    with pytest.raises(UserError, match="does not divide the 256 sequences"):
        grad_accum_steps(524_288, 12, 2048, 1)


def test_micro_batch_auto_picks_largest_fitting_divisor():
    candidates = micro_batch_candidates(524_288, 2048, 8)  # 32 sequences per rank per step
    assert candidates == [32, 16, 8, 4, 2, 1]
    assert largest_fitting(candidates, lambda b: b * 5 <= 64) == 8
    assert largest_fitting(candidates, lambda b: False) == 0


def test_debug_preset_divides_over_one_or_two_cpu_processes():
    """`torchrun --nproc_per_node=2 train.py --config debug` needs no extra flag: auto picks 8 sequences on one
    process and 4 on each of two (a fixed 8 does not divide the 1,024-token batch over 2 x 128-token rows)."""
    from train import CPU_AUTO_MICRO_BATCH
    cfg = TrainConfig.from_preset("debug")
    assert cfg.micro_batch == "auto"
    for world, expected in ((1, 8), (2, 4)):
        batch = largest_fitting(micro_batch_candidates(cfg.total_batch_tokens, cfg.seq_len, world),
                                lambda b: b <= CPU_AUTO_MICRO_BATCH)
        assert batch == expected and grad_accum_steps(cfg.total_batch_tokens, batch, cfg.seq_len, world) == 1


def test_memory_probe_runs_two_accumulating_passes_and_leaves_the_model_untouched():
    import contextlib

    from model import GPT, GPTConfig
    from devices import memory_probe
    model = GPT(GPTConfig.from_preset("debug"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = []
    model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    original_forward = model.forward

    def forward(idx, targets=None):  # a device that holds at most 4 sequences, with the first pass's grads held
        if idx.shape[0] > 4 or (idx.shape[0] == 4 and model.wte.weight.grad is not None):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original_forward(idx, targets)
    model.forward = forward
    fits = memory_probe(model, 16, torch.device("cpu"), contextlib.nullcontext, stand_in_copies=2, headroom_bytes=64)
    assert [b for b in (8, 4, 2) if fits(b)] == [2]  # 4 fits once, but not a second time beside the gradients
    assert batches == [8, 4, 4, 2, 2]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_micro_batch_auto_that_fits_nothing_is_one_line(embedded_data, tmp_path, monkeypatch):
    import train as train_module
    from devices import Dist
    monkeypatch.setattr(train_module, "CPU_AUTO_MICRO_BATCH", 0)
    cfg = TrainConfig.from_preset("debug", data=str(embedded_data), out=str(tmp_path / "run"), micro_batch="auto")
    with pytest.raises(UserError, match="even a micro-batch of 1 sequence does not fit"):
        train_module.Trainer(cfg, "debug", Dist(), torch.device("cpu"))


def test_micro_batch_auto_on_cpu_trains_and_resumes(embedded_data, tmp_path):
    out = tmp_path / "auto"
    auto = ["--micro-batch", "auto", "--total-batch-tokens", "1024"]  # 32 sequences of 32: auto takes 16 on CPU
    train(embedded_data, out, *auto, "--stop-at-step", "2")
    train(embedded_data, out, *auto, "--resume", "--max-steps", "4")
    log = (out / "train.log").read_text()
    assert "micro-batch auto: 16 sequences" in log and "micro-batch 16 x 32, 2 accumulation steps" in log
    assert torch.load(out / "checkpoints" / "step_000004.pt", weights_only=True)["micro_batch"] == 16


def test_every_field_is_a_flag_and_bad_flags_are_refused():
    cfg, preset = parse_config(["--config", "debug", "--max-lr", "1e-3", "--no-compile", "--sample-prompts", "a", "b",
                                "--attn-dropout", "0"])
    assert preset == "debug" and cfg.max_lr == 1e-3 and cfg.compile is False
    assert cfg.sample_prompts == ("a", "b") and cfg.model_config().attn_dropout == 0.0
    assert cfg.model_config().ffn_dropout == 0.15  # untouched: the preset's
    with pytest.raises(SystemExit):
        parse_config(["--max-lr", "fast"])
    with pytest.raises(SystemExit):
        parse_config(["--no-such-flag", "1"])


# --- runs ------------------------------------------------------------------------------------------------------

def test_run_writes_metrics_config_log_and_checkpoint(straight_run):
    events = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if "loss" in e]
    assert [e["step"] for e in train_events] == list(range(8))
    assert {"step", "loss", "lr", "grad_norm", "step_ms", "tokens_per_s", "mfu", "tokens"} <= train_events[0].keys()
    assert [e["step"] for e in events if "val_loss" in e] == [0, 4, 8]
    assert [e["step"] for e in events if "hellaswag_acc_norm" in e] == [8]  # the last step always evaluates
    assert [len(e["samples"]) for e in events if "samples" in e] == [3]
    log = (straight_run / "train.log").read_text()
    assert log.startswith("commit: ") and "torch " in log and "config: " in log
    assert json.loads((straight_run / "config.json").read_text())["train"]["max_steps"] == 8
    state = torch.load(straight_run / "checkpoints" / "step_000008.pt", weights_only=True)
    assert {"model", "optimizer", "step", "loader", "rng", "train_config", "model_config",
            "tokens_seen", "micro_batch"} <= state.keys()
    assert state["step"] == 8 and state["tokens_seen"] == 8 * 256
    assert not any(k.startswith("_orig_mod") or k.startswith("module.") for k in state["model"])


def test_stop_and_resume_is_exact(straight_run, run_at_step_4, embedded_data, tmp_path):
    """The first half is conftest's run stopped at step 4 (shared with other modules; its extra checkpoint at step 2
    changes nothing the run computes), continued here."""
    out = copy_run(run_at_step_4, tmp_path / "split")
    assert (out / "checkpoints" / "step_000004.pt").exists() and not (out / "checkpoints" / "step_000008.pt").exists()
    train(embedded_data, out, "--resume")
    assert train_losses(out) == train_losses(straight_run)  # float equality: bit-exact continuation
    assert_same_weights(final_weights(out), final_weights(straight_run))


def test_evaluation_does_not_change_training(straight_run, embedded_data, tmp_path):
    out = tmp_path / "evals"
    train(embedded_data, out, "--eval-every", "1", "--hellaswag-every", "2", "--sample-every", "3")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([e for e in events if "hellaswag_acc" in e]) == 5 and len([e for e in events if "samples" in e]) == 4
    assert train_losses(out) == train_losses(straight_run)
    assert_same_weights(final_weights(out), final_weights(straight_run))


def test_sigterm_checkpoints_then_resume_completes(straight_run, embedded_data, tmp_path):
    out = tmp_path / "sigterm"
    cmd = [sys.executable, "train.py", *TINY, "--data", str(embedded_data), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if "step      2 | loss" in line:
            proc.send_signal(signal.SIGTERM)
            break
    output = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, output
    assert "stopped by signal" in output
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0] != "step_000008.pt"
    train(embedded_data, out, "--resume")
    assert train_losses(out) == train_losses(straight_run)
    assert_same_weights(final_weights(out), final_weights(straight_run))


@pytest.fixture(scope="module")
def single_run_without_dropout(embedded_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "single"
    train(embedded_data, out, *NO_DROPOUT)
    return out


def assert_ddp_matches_one_process(single, ddp, tolerance: float) -> None:
    """Only the order of the gradient sums differs: per-step losses and pre-clip grad norms (averages over every
    weight) agree to `tolerance`, the final weights relative to how far they moved to 1e-3 (measured: 8e-5)."""
    a, b = train_events(single), train_events(ddp)
    assert [e["step"] for e in a] == [e["step"] for e in b] == list(range(8))
    for ours, theirs in zip(a, b):
        assert theirs["loss"] == pytest.approx(ours["loss"], rel=tolerance), ours["step"]
        assert theirs["grad_norm"] == pytest.approx(ours["grad_norm"], rel=tolerance), ours["step"]
    assert_weights_close_relative_to_training(final_weights(single), final_weights(ddp), rel=1e-3)


def test_ddp_two_processes_match_one_process_with_accumulation(single_run_without_dropout, ddp_run_without_dropout):
    """2 gloo processes (conftest's run, shared with test_multinode) equal 1 process accumulating both halves, to
    1e-5 (measured: 2e-7 for the losses, 9e-7 for the grad norms)."""
    assert_ddp_matches_one_process(single_run_without_dropout, ddp_run_without_dropout, tolerance=1e-5)


def test_ddp_two_processes_compiled_and_checkpointed_match_one_process_with_accumulation(single_run_without_dropout,
                                                                                        embedded_data, tmp_path):
    """As the test above, with the model compiled inside DDP and its blocks recomputed in backward (the full run's
    combination on GPUs), to 1e-4."""
    ddp = tmp_path / "ddp"
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
               "--data", embedded_data, "--out", ddp, *NO_DROPOUT, "--compile", "--activation-checkpointing",
               check=True)
    assert_ddp_matches_one_process(single_run_without_dropout, ddp, tolerance=1e-4)


def test_resume_under_another_process_count_and_micro_batch(single_run_without_dropout, embedded_data, tmp_path,
                                                            refused_train):
    """Elastic resume: 2 processes x micro-batch 4 save at step 4; 1 process x micro-batch 2 (4 accumulation steps,
    the same 256-token batch) continues. The continuation reads the same windows with the same weights and optimizer
    state, so its losses and grad norms match the uninterrupted run's up to the order of gradient sums (the DDP
    test's tolerance) and its final weights are close; the layout change is logged and recorded. A changed token
    batch is refused in one line unless --allow-token-batch-change."""
    out = tmp_path / "elastic"
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
               "--data", embedded_data, "--out", out, *NO_DROPOUT, "--stop-at-step", "4", check=True)
    assert_one_line_error(refused_train(embedded_data, out, *NO_DROPOUT, "--resume", "--total-batch-tokens", "512"),
                          "--total-batch-tokens 256", "--allow-token-batch-change")
    train(embedded_data, out, *NO_DROPOUT, "--resume", "--micro-batch", "2")
    a, b = train_events(single_run_without_dropout), train_events(out)
    assert [e["step"] for e in a] == [e["step"] for e in b] == list(range(8))
    for ours, theirs in zip(a, b):
        assert theirs["loss"] == pytest.approx(ours["loss"], rel=1e-5), ours["step"]
        assert theirs["grad_norm"] == pytest.approx(ours["grad_norm"], rel=1e-5), ours["step"]
    assert_weights_close_relative_to_training(final_weights(single_run_without_dropout), final_weights(out), rel=1e-3)
    assert "layout changed: 2 processes x micro-batch 4 x 1 accumulation steps -> 1 x 2 x 4" in \
        (out / "train.log").read_text()
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 4, "world_size": 1, "micro_batch": 2, "previous_world_size": 2, "previous_micro_batch": 4} in events
    assert torch.load(out / "checkpoints" / "step_000008.pt", weights_only=True)["loader"]["window"] == 8 * 8


def test_killed_worker_restarts_from_checkpoint(embedded_data, tmp_path):
    """SIGKILL of a worker under torchrun --max-restarts: the group restarts from the last checkpoint and continues
    exactly like a run that was never interrupted (2 gloo processes, dropout on: data, masks and optimizer state)."""
    uninterrupted = tmp_path / "uninterrupted"
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
               "--data", embedded_data, "--out", uninterrupted, check=True)
    out = tmp_path / "restart"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "train.py", *TINY, "--data", str(embedded_data), "--out", str(out), "--ckpt-every", "2",
           "--resume", "--allow-fresh-start"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 600  # a hang guard only: a loaded machine may take minutes to reach the checkpoint
    while not (out / "checkpoints" / "step_000002.pt").exists():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.2)
    workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)],
                             capture_output=True, text=True).stdout.split()
    assert workers, "torchrun has no worker processes"
    os.kill(int(workers[0]), signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "resume: continuing after step" in output
    assert train_losses(out) == train_losses(uninterrupted)  # float equality: steps 0-7, those after the restart too
    assert_same_weights(final_weights(out), final_weights(uninterrupted))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(run_at_step_4, embedded_data, tmp_path):
    out = copy_run(run_at_step_4, tmp_path / "nan")  # four sane steps first (checkpoints at 2 and 4)
    proc = train(embedded_data, out, "--resume", "--max-lr", "1e30", "--ckpt-every", "1", "--eval-every", "0",
                 check=False)  # then an LR that blows the weights up
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "NaN/inf at step" in proc.stderr
    bad = int(proc.stderr.split("NaN/inf at step ")[1].split(";")[0])
    files = [p.name for p in (out / "checkpoints").iterdir()]
    kept = sorted(int(name[5:11]) for name in files if name.endswith(".pt"))
    assert kept and all(step < bad for step in kept)  # weights of step >= bad produced the NaN: not resumable
    assert f"step_{bad:06d}.pt.nonfinite" in files
    assert f"last good checkpoint is {out / 'checkpoints' / f'step_{kept[-1]:06d}.pt'}" in proc.stderr


# --- bad input -------------------------------------------------------------------------------------------------

@pytest.fixture
def refused_train(monkeypatch, capsys):
    """train(data, out, *extra, check=False) for a run refused before it trains, as train.main in this process
    (train_main: no interpreter to start), what assert_one_line_error reads of it."""
    def refused(data, out, *extra) -> subprocess.CompletedProcess:
        argv = [*TINY, "--data", str(data), "--out", str(out), *map(str, extra)]
        status, err = train_main(argv, monkeypatch, capsys)
        return subprocess.CompletedProcess(["train.py", *argv], status, "", err)
    return refused


def test_missing_data_dir_names_the_prep_command(tmp_path, refused_train):
    assert_one_line_error(refused_train(tmp_path / "nowhere", tmp_path / "run"), "data_prep.py")


def test_other_tokenizer_refused(embedded_data, tmp_path, refused_train):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(embedded_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = "0" * 64
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(refused_train(data, tmp_path / "run"), "tokenizer")


def test_corrupt_shard_refused(embedded_data, tmp_path, refused_train):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(embedded_data, data)
    shard = sorted(data.glob("train_*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # same size: only the sha256 check can see it
    shard.write_bytes(bytes(raw))
    assert_one_line_error(refused_train(data, tmp_path / "run"), shard.name)


def test_indivisible_batch_and_long_sequence_refused(embedded_data, tmp_path, refused_train):
    assert_one_line_error(refused_train(embedded_data, tmp_path / "a", "--micro-batch", "3"),
                          "--micro-batch 3 does not divide")
    assert_one_line_error(refused_train(embedded_data, tmp_path / "b", "--seq-len", "256", "--total-batch-tokens",
                                        "1024"), "context")


@pytest.mark.parametrize("flag, value", [("--log-every", "0"), ("--pad-vocab-to", "0"), ("--attn-dropout", "2"),
                                         ("--seed", "-1"), ("--micro-batch", "many"), ("--max-lr", "0")])
def test_impossible_flag_values_refused(embedded_data, tmp_path, refused_train, flag, value):
    assert_one_line_error(refused_train(embedded_data, tmp_path / "run", flag, value), flag)


def test_resume_from_weights_only_checkpoint_suggests_init_from(straight_run, embedded_data, tmp_path, refused_train):
    from checkpoint import checkpoint_path, save_checkpoint
    state = torch.load(straight_run / "checkpoints" / "step_000008.pt", weights_only=True)
    save_checkpoint({"model_config": state["model_config"], "model": state["model"]},
                    checkpoint_path(tmp_path / "w", 0))
    assert_one_line_error(refused_train(embedded_data, tmp_path / "w", "--resume"), "--init-from")


def test_resume_without_checkpoint_refused(embedded_data, tmp_path, refused_train):
    assert_one_line_error(refused_train(embedded_data, tmp_path / "run", "--resume"), "--allow-fresh-start")


def test_init_from_starts_a_new_run_from_the_weights(straight_run, embedded_data, tmp_path):
    out = tmp_path / "init"
    # the dropout may differ from the source run's: only the architecture must match
    train(embedded_data, out, "--init-from", straight_run, "--max-steps", "2", "--attn-dropout", "0")
    assert f"init: weights from {straight_run / 'checkpoints' / 'step_000008.pt'}" in (out / "train.log").read_text()
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["val_loss"] < 10.5  # starts from trained weights, not from ln(50257)


def test_checkpoint_of_other_model_config_refused(straight_run, embedded_data, tmp_path, refused_train):
    assert_one_line_error(refused_train(embedded_data, tmp_path / "run", "--init-from", straight_run,
                                        "--pad-vocab-to", "64"), "different model config")


def test_out_of_gpu_memory_is_one_line_naming_the_memory_flags(embedded_data, tmp_path, monkeypatch, capsys):
    import train as train_module

    def out_of_memory(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.07 GiB\nmore details")
    monkeypatch.setattr(train_module.Trainer, "train_step", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        train_module.main([*TINY, "--data", str(embedded_data), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: out of GPU memory (CUDA out of memory. Tried to allocate 3.07 GiB)")
    assert " in train.py:" in error[-1] and "(_train);" in error[-1]  # where it happened: the innermost repo frame
    assert "--micro-batch auto" in error[-1] and "--activation-checkpointing" in error[-1]


def test_out_of_gpu_memory_without_a_message_is_still_one_line(capsys):
    from cli import main_entry

    @main_entry(memory_hint="lower --batch-size")
    def main():
        raise torch.cuda.OutOfMemoryError()
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: out of GPU memory; lower --batch-size\n"


# --- problems found before the run directory is made, all in one line ------------------------------------------

class Accepted(Exception):
    """Raised in place of Trainer.run: the run passed every check (and made its run directory)."""


def train_main(argv: list[str], monkeypatch, capsys) -> tuple[int | str, str]:
    """train.main(argv) in this process, a run stopped where it would start training: (exit status, or 'accepted'
    for a run that got there; stderr)."""
    import train as train_module

    def accepted(self):
        raise Accepted
    monkeypatch.setattr(train_module.Trainer, "run", accepted)
    try:
        status = train_module.main(argv)
    except SystemExit as e:
        status = e.code
    except Accepted:
        status = "accepted"
    return status, capsys.readouterr().err


def windows_dataset(folder, train_windows: int, val_windows: int, seq_len: int = 32):
    """A data set whose one train shard and one val shard hold exactly these windows of seq_len + 1 tokens."""
    return make_dataset(folder, train_sizes=[train_windows * seq_len + 1], val_sizes=[val_windows * seq_len + 1])


MODES = {"run": (1, []), "--check": (1, ["--check"]), "--check 2": (2, ["--check", "2"])}  # (processes, arguments)
# TINY's micro-batch of 4 on 1 or 2 processes, its --val-tokens 512 (16 windows of 32): a split of 3 windows is too
# small for both, one of 6 for 2 processes only (8 windows per step), one of 40 for neither
DATA_FIT_CASES = [(train_windows, val_windows, mode) for train_windows in (3, 40) for val_windows in (3, 6, 40)
                  for mode in MODES]


@pytest.mark.parametrize("train_windows, val_windows, mode", DATA_FIT_CASES)
def test_a_data_set_too_small_for_the_batch_is_one_line_before_the_run_directory(train_windows, val_windows, mode,
                                                                                tmp_path, monkeypatch, capsys):
    """A micro-batch larger than every train shard was refused by TrainLoader, and a val split of fewer windows than
    micro-batch x processes at the first evaluation, both after the run directory was made (and --check passed
    them). Each is named with the windows it needs and holds, both in one line."""
    data, out = windows_dataset(tmp_path / "data", train_windows, val_windows), tmp_path / "run"
    processes, mode_args = MODES[mode]
    expected = []
    if train_windows < 4:
        expected.append(["a micro-batch of 4 x 32 tokens needs 4 windows of 33 tokens",
                         f"holds {train_windows * 32 + 1} tokens: {train_windows} such windows at stride 32"])
    if min(val_windows, 16) < 4 * processes:
        expected.append([f"needs {4 * processes} windows of 33 tokens",
                         f"holds {val_windows * 32 + 1} tokens: {val_windows} such windows at stride 32"])
    status, err = train_main([*TINY, "--data", str(data), "--out", str(out), *mode_args], monkeypatch, capsys)
    if not expected:
        assert status == (0 if mode != "run" else "accepted"), err
        return
    line = assert_one_line_error(subprocess.CompletedProcess([], status, "", err), status=2, alone=True)
    for needles in expected:
        for needle in needles:
            assert needle in line, (needle, line)
    assert not out.exists()


@pytest.mark.parametrize("train_windows, val_windows", [(t, v) for t in (40, 6, 1) for v in (40, 6, 3)])
def test_micro_batch_auto_takes_no_more_than_the_data_holds(train_windows, val_windows, tmp_path):
    """On the CPU auto takes the largest divisor of the 32 sequences per step up to CPU_AUTO_MICRO_BATCH (16), and
    no more than one train shard and the val split hold: it took 16 and TrainLoader refused it (or the first
    evaluation found the val split short) after the run directory was made."""
    from dataloader import val_batches
    from devices import Dist
    from train import CPU_AUTO_MICRO_BATCH, Trainer
    data = windows_dataset(tmp_path / "data", train_windows, val_windows)
    cfg = TrainConfig.from_preset("debug", data=str(data), out=str(tmp_path / "run"), micro_batch="auto",
                                  seq_len=32, total_batch_tokens=1024)  # (its --val-tokens 8192: 256 windows)
    trainer = Trainer(cfg, "debug", Dist(), torch.device("cpu"))
    held = min(CPU_AUTO_MICRO_BATCH, train_windows, val_windows)
    assert trainer.micro_batch == max(b for b in (32, 16, 8, 4, 2, 1) if b <= held)
    trainer.loader.next_batch()
    assert next(val_batches(trainer.dataset, trainer.micro_batch, 32, max_tokens=cfg.val_tokens))[0].shape == \
        (trainer.micro_batch, 32)


# One kind of problem per flag check_run judges, (its arguments, what the line must hold), a few for the device; every
# case below is some of them at once, all named in one line. The split and the data are judged once the values they
# read hold, beside the other problems: a bad --device, a --micro-batch that does not divide the share, a data set
# too small, a flag value and a missing file.
TOGETHER = {
    "device": [(["--device", "tpu"], "--device 'tpu': use cuda, mps or cpu"),
               (["--device", "cuda:99"], "--device cuda")],  # no CUDA here; on a GPU machine: not that many GPUs
    "split": [(["--micro-batch", "3"], "--micro-batch 3 does not divide the 8 sequences")],
    "train": [(["--data", "{two_windows}"], "holds 65 tokens: 2 such windows at stride 32")],
    "val": [(["--val-tokens", "64"], "of which --val-tokens 64 allows 2; raise --val-tokens"),
            (["--final-val-tokens", "32", "--eval-every", "0"], "of which --final-val-tokens 32 allows 1")],
    "value": [(["--max-lr", "0"], "--max-lr 0.0: must be > 0")],
    "input": [(["--hellaswag-data", "{missing}"], "--hellaswag-data '{missing}': no such file")],
}


def together_cases() -> list[list[tuple[list[str], str]]]:
    """Each kind alone, every pair of kinds, all at once (the variants of a kind taking turns)."""
    import itertools
    alone = [[kind] for kinds in TOGETHER.values() for kind in kinds]
    pairs = [[TOGETHER[a][i % len(TOGETHER[a])], TOGETHER[b][i % len(TOGETHER[b])]]
             for i, (a, b) in enumerate(itertools.combinations(TOGETHER, 2))]
    every = [[kinds[i % len(kinds)] for kinds in TOGETHER.values()] for i in range(3)]
    return alone + pairs + every


@pytest.mark.parametrize("mode", ["run", "--check"])
@pytest.mark.parametrize("problems", together_cases(), ids=lambda ps: " ".join(a for args, _ in ps for a in args))
def test_a_bad_device_and_the_batch_split_are_named_with_the_other_problems(problems, mode, tmp_path, monkeypatch,
                                                                             capsys):
    """A bad --device was raised alone, before any other problem was looked for; the split of the token batch was
    judged only when every other flag held; a data set too small for the batch was found after the run directory
    was made."""
    paths = {"{two_windows}": str(windows_dataset(tmp_path / "data", 2, 40)), "{missing}": str(tmp_path / "missing")}
    good = windows_dataset(tmp_path / "good", 40, 40)
    out = tmp_path / "run"
    args = [paths.get(arg, arg) for arguments, _ in problems for arg in arguments]
    status, err = train_main([*TINY, "--data", str(good), "--out", str(out), *args, *MODES[mode][1]], monkeypatch,
                             capsys)
    line = assert_one_line_error(subprocess.CompletedProcess([], status, "", err), status=2, alone=True)
    for _, needle in problems:
        needle = needle.replace("{missing}", paths["{missing}"])
        assert needle in line, (needle, line)
    assert not out.exists()
