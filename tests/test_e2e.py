"""The two run scripts, end to end on CPU with tiny settings (the full script in its SMOKE mode)."""
import json
import os
import subprocess

import pytest

from helpers import REPO, assert_one_line_error, free_port

SCRIPTS = ["run_pre_training_e2e.sh", "run_pre_training_e2e_debug.sh", "run_tests.sh", ".ci/run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", REPO / script]).returncode == 0


def run_bash(script, env, timeout=300):
    return subprocess.run(["bash", REPO / script], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def test_full_script_smoke_mode_runs_every_stage_and_resumes(tmp_path):
    """Also: DATA_DIR starts as an interrupted preparation left it (a shard, no manifest.json), which data_prep.py
    alone refuses; the script replaces it."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train_000000.bin").write_bytes(b"\0" * 64)
    env = {"SMOKE": "1", "DATA_DIR": str(tmp_path / "data"), "RUN_DIR": str(tmp_path / "run"),
           "MASTER_PORT": str(free_port())}
    proc = run_bash("run_pre_training_e2e.sh", env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("prepare data", "train debug on 1 x 2 processes", "final HellaSwag", "samples", "plots"):
        assert f"=== {stage}" in proc.stdout, stage
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_000008.pt").exists()
    assert json.loads((run / "hellaswag.json").read_text())["total"] == 10
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["hellaswag.png", "loss.png", "training.png"]
    # Running it again reuses the data and resumes the finished run instead of training from scratch.
    again = run_bash("run_pre_training_e2e.sh", env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stdout.split("=== train")[0]
    assert "is at step 8, this run's last step: nothing to train" in again.stdout
    # A wrong setting stops at the one-process check, before torchrun (whose restarts would retry it): one line.
    bad = run_bash("run_pre_training_e2e.sh", {**env, "TRAIN_ARGS": "--sample-temperature 1e-45"})
    assert bad.returncode != 0 and "=== check the train.py configuration" in bad.stdout
    assert "=== train" not in bad.stdout and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if "1e-45" in line] == [
        "error: --sample-temperature 1e-45: must be 0 (greedy) or a finite number >= 0.0001"]


def test_debug_script_runs_and_summarizes(tmp_path):
    """TRAIN_ARGS is split as a command line (a quoted prompt stays one argument); with --eval-every 0 the only
    validation loss is the last step's, and the summary says so (it claimed one at step 0)."""
    env = {"DATA_DIR": str(tmp_path / "data"), "RUN_DIR": str(tmp_path / "run"), "DEVICE": "cpu",
           "TRAIN_ARGS": "--max-steps 6 --micro-batch 2 --seq-len 32 --total-batch-tokens 64 --eval-every 0 "
                         "--val-tokens 256 --final-val-tokens 512 --ckpt-every 3 --hellaswag-every 0 --sample-every 0 "
                         "--hellaswag-limit 2 --sample-tokens 4 --sample-prompts 'Once upon a time' \"it's\""}
    proc = run_bash("run_pre_training_e2e_debug.sh", env)  # the last step still evaluates and samples
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.split("=== summary")[1]
    assert f"run directory : {tmp_path / 'run'}" in summary and "step_000006.pt" in summary
    assert "val loss      : " in summary and " at step 6 -> " in summary and "step 0" not in summary
    samples = [e for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
               if "samples" in e]
    assert [s["prompt"] for s in samples[0]["samples"]] == ["Once upon a time", "it's"]


@pytest.mark.parametrize("train_args, said", [
    ("--sample-prompts 'Once upon", "error: TRAIN_ARGS has a quote that is not closed"),
    ("--max-steps 0 \\", "error: TRAIN_ARGS ends with a backslash that escapes nothing"),
])
def test_train_args_with_an_open_quote_is_one_line(tmp_path, train_args, said):
    proc = run_bash("run_pre_training_e2e_debug.sh", {"DATA_DIR": str(tmp_path / "data"), "RUN_DIR": str(tmp_path),
                                                       "TRAIN_ARGS": train_args})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(said), proc.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("resume, said", [("1", "RESUME=1 needs RUN_DIR"), ("yes", "RESUME=yes: use RESUME=1"),
                                          ("true", "RESUME=true: use RESUME=1"), ("2", "RESUME=2: use RESUME=1")])
def test_resume_is_0_or_1_and_needs_run_dir(resume, said):
    assert_one_line_error(run_bash("run_pre_training_e2e_debug.sh", {"RESUME": resume, "RUN_DIR": ""}), said,
                          status=2, alone=True)


def test_failing_stage_is_named(tmp_path):
    env = {"DATA_DIR": str(tmp_path / "data"), "RUN_DIR": str(tmp_path / "run"), "TRAIN_ARGS": "--max-lr fast"}
    proc = run_bash("run_pre_training_e2e_debug.sh", env)
    assert proc.returncode != 0
    assert "error: stage 'train the debug model" in proc.stderr
