"""trackers.py: TensorBoard and W&B (offline) hold what metrics.jsonl holds, continue on resume, stay optional."""
import json
import shutil
import signal
import struct

import numpy as np
import pytest
import torch

from helpers import host_syncs_in_run, run_script

# 6 steps of the debug model with every kind of event: train steps, validation, HellaSwag and samples at 3 and 6.
RUN = ["--config", "debug", "--micro-batch", "4", "--seq-len", "32", "--total-batch-tokens", "256",
       "--max-steps", "6", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "3", "--val-tokens", "512",
       "--final-val-tokens", "512", "--hellaswag-every", "3", "--hellaswag-limit", "2", "--sample-every", "3",
       "--sample-tokens", "4", "--ckpt-every", "3", "--keep-checkpoints", "0"]


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """W&B offline, quiet, and with its settings and caches in a temporary folder, not in the home directory.
    WANDB_SERVICE empty: a script starts its own wandb service process and waits for it at exit (so its files are
    complete when it returns) instead of attaching to one that a test started in this process."""
    home = tmp_path_factory.mktemp("wandb_home")
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_CODE": "true",
            "WANDB_DISABLE_GIT": "true", "WANDB_CONFIG_DIR": str(home / "config"),
            "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data"),
            "WANDB_ARTIFACT_DIR": str(home / "artifacts"), "WANDB_SERVICE": ""}


@pytest.fixture
def wandb_here(wandb_env, monkeypatch):
    """W&B in this process: wandb_env set for the test, and wandb torn down after it (its service process stopped,
    its settings forgotten), so no test inherits another's."""
    wandb = pytest.importorskip("wandb")
    for name, value in wandb_env.items():
        monkeypatch.setenv(name, value)
    yield wandb
    wandb.teardown()


@pytest.fixture(scope="module")
def tracked_run(embedded_data, wandb_env, tmp_path_factory):
    """A run with both trackers (copied aside as `first`), then the same run resumed after losing its last checkpoint:
    the resumed part logs steps 3..6 again, which the trackers must not show twice."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("tracked")
    out, first = root / "run", root / "first"
    args = [*RUN, "--data", embedded_data, "--out", out, "--tracker", "tensorboard,wandb"]
    run_script("train.py", *args, env=wandb_env, check=True)
    first.mkdir()
    for path in [out / "metrics.jsonl", *out.glob("events.out.tfevents.*")]:
        shutil.copy(path, first)
    (out / "checkpoints" / "step_000006.pt").unlink()  # as if the run had crashed just before its last checkpoint
    run_script("train.py", *args, "--resume", env=wandb_env, check=True)
    return out, first


def read_events(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def numbers(events: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...]} of every number in the events (as TensorBoard stores them: float32)."""
    series = {}
    for event in events:
        for key, value in event.items():
            if key not in ("step", "samples") and value is not None:
                series.setdefault(key, []).append((event["step"], float(np.float32(value))))
    return series


def samples(events: list[dict]) -> list[tuple[int, list[list[str]]]]:
    return [(e["step"], [[s["prompt"], s["text"]] for s in e["samples"]]) for e in events if "samples" in e]


# --- TensorBoard ---------------------------------------------------------------------------------------------------

def tensorboard_events(run_dir):
    """({scalar tag: [(step, value)]}, {text tag: [(step, text)]}) as the TensorBoard server reads the run directory
    (its plugin event accumulator over all event files, purges included)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray
    reader = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    reader.Reload()
    scalars, texts = {}, {}
    for tag in reader.Tags()["tensors"]:
        plugin = reader.SummaryMetadata(tag).plugin_data.plugin_name
        if plugin == "scalars":
            scalars[tag] = [(e.step, float(make_ndarray(e.tensor_proto))) for e in reader.Tensors(tag)]
        elif plugin == "text":
            texts[tag.removesuffix("/text_summary")] = [(e.step, make_ndarray(e.tensor_proto).item().decode())
                                                        for e in reader.Tensors(tag)]
    return scalars, texts


def assert_tensorboard_mirrors(run_dir, events):
    scalars, texts = tensorboard_events(run_dir)
    assert scalars == numbers(events)  # every number, at its step, once, under its metrics.jsonl name
    shown = [(step, text.split("\n\n")) for step, text in texts["samples"]]
    assert shown == [(step, [f"{p!r} -> {t!r}" for p, t in rows]) for step, rows in samples(events)]
    return texts


def test_tensorboard_holds_the_metrics_jsonl_events(tracked_run):
    _, first = tracked_run
    events = read_events(first)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "hellaswag_acc_norm"} <= numbers(events).keys()
    texts = assert_tensorboard_mirrors(first, events)
    assert [step for step, _ in texts["config"]] == [0]
    assert json.loads(texts["config"][0][1].strip("`\n"))["train"]["max_steps"] == 6
    assert texts["run_header"][0][1].startswith("commit: ") and "parameters" in texts["run_header"][0][1]


def test_resumed_run_continues_tensorboard_without_repeating_steps(tracked_run):
    out, _ = tracked_run
    assert len(list(out.glob("events.out.tfevents.*"))) == 2  # the resume appended a file beside the first
    events = read_events(out)
    assert [e["step"] for e in events if "loss" in e] == list(range(6))
    texts = assert_tensorboard_mirrors(out, events)  # what the lost part logged after checkpoint 3 is gone
    assert [step for step, _ in texts["config"]] == [0, 3]


# --- Weights & Biases ----------------------------------------------------------------------------------------------

def wandb_records(path):
    """The records of an offline run's .wandb file, parsed with wandb's own protobuf schema. The file is a log of
    32 KiB blocks after a 7-byte header; each chunk has a 7-byte header (crc32, length, kind: 1 whole record, 2 first,
    3 middle, 4 last part). wandb's reader is in its Go binary only (`wandb leet inspect`, a process per file), so the
    framing is read here; requirements-dev.txt keeps wandb to the versions it was checked with. A file is complete
    only once wandb's service process has closed it (wandb.teardown() in this process, or the script's exit)."""
    from wandb.proto import wandb_internal_pb2
    raw, block, header = path.read_bytes(), 32768, 7
    assert raw[:7] == b":W&B\xe1\xbe\x00", f"{path}: not a version-0 W&B transaction log (see requirements-dev.txt)"
    pos, parts = header, []
    while pos + header <= len(raw):
        if block - pos % block < header:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + header])
        parts.append(raw[pos + header:pos + header + length])
        pos += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_run(path):
    """(run record, config, summary, history rows) of an offline .wandb file; samples tables read from their files."""
    run, config, summary, rows = None, {}, {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in record.summary.update if item.key})
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    row[key] = json.loads(item.value_json)
            if "samples/path" in row:
                table = json.loads((path.parent / "files" / row.pop("samples/path")).read_text())
                row = {k: v for k, v in row.items() if not k.startswith("samples/")}
                row["samples"] = [{"prompt": p, "text": t} for p, t in table["data"]]
                assert table["columns"] == ["prompt", "text"]
            rows.append(row)
    assert run is not None, f"{path}: no run record ({path.stat().st_size} bytes): read before wandb finished it?"
    return run, config, summary, rows


def offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def without_none(events):
    return [{k: v for k, v in e.items() if v is not None} for e in events]


def test_wandb_offline_run_holds_the_metrics_jsonl_events(tracked_run):
    out, first = tracked_run
    run, config, summary, rows = wandb_run(offline_runs(out)[0])
    assert run.display_name == "run" and run.project == "lf-llm"  # the run directory's name
    assert rows == without_none(read_events(first))  # every event, in order, same names and steps, exact values
    assert config["train"]["max_steps"] == 6 and config["model"]["n_layer"] == 4
    assert summary["run_header"].startswith("commit: ")


def test_resumed_run_continues_the_same_wandb_run(tracked_run):
    out, first = tracked_run
    runs = offline_runs(out)
    assert len(runs) == 2
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    assert [wandb_run(path)[0].run_id for path in runs] == [run_id, run_id]
    kept = len(read_events(out)) - len(wandb_run(runs[1])[3])
    # the resumed part logged what metrics.jsonl holds after the events it kept from before the checkpoint
    assert wandb_run(runs[1])[3] == without_none(read_events(out)[kept:])
    assert read_events(out)[:kept] == [e for e in read_events(first) if e["step"] < 3 or
                                       (e["step"] == 3 and "loss" not in e)]


def train_in_process(embedded_data, out, **overrides):
    """4 steps of the debug model in this process (no interpreter start: quicker than a subprocess). The last step
    still evaluates HellaSwag and samples, on 2 examples and 4 tokens."""
    from devices import Dist
    from train import TrainConfig, Trainer
    settings = dict(data=str(embedded_data), out=str(out), micro_batch="2", seq_len=32, total_batch_tokens=128,
                    max_steps=4, log_every=1, eval_every=2, val_tokens=256, final_val_tokens=256, hellaswag_every=0,
                    hellaswag_limit=2, sample_every=0, sample_tokens=4, ckpt_every=0)
    cfg = TrainConfig.from_preset("debug", **{**settings, **overrides})
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return Trainer(cfg, "debug", Dist(), torch.device("cpu")).run()
    finally:  # the run's stop-on-signal handlers would outlive it in this process (Ctrl-C would not stop pytest)
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_wandb_respects_its_environment(embedded_data, wandb_here, tmp_path, monkeypatch):
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb_files"
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_NAME", "named")
    assert train_in_process(embedded_data, out, tracker="wandb", wandb_project="proj") == 0
    # run.finish() returns before wandb's service process has written the .wandb file (it does when it closes the
    # run's stream, after finish); teardown waits for the service to exit
    wandb_here.teardown()
    runs = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and not (out / "wandb").exists()
    run = wandb_run(runs[0])[0]
    assert (run.project, run.display_name) == ("proj", "named")


def test_a_fresh_start_in_an_old_run_directory_is_a_new_wandb_run(embedded_data, wandb_here, tmp_path):
    """W&B keeps what it is sent: a start from step 0 that continued the directory's old W&B run would show steps
    0.. twice there. A resume continues the run; a fresh start (here --resume --allow-fresh-start with no checkpoint
    left, as a torchrun restart of a run that never checkpointed does) begins a new one."""
    out, seen = tmp_path / "run", []

    def new_wandb_run():
        """(the id kept in the run directory, the run record of the offline run that the last start added)"""
        wandb_here.teardown()  # the .wandb files are complete once wandb's service process has exited
        added = [path for path in offline_runs(out) if path not in seen]
        seen.extend(added)
        assert len(added) == 1
        return (out / "wandb_run_id.txt").read_text().strip(), wandb_run(added[0])

    assert train_in_process(embedded_data, out, tracker="wandb", stop_at_step=2) == 0
    first_id, (first, _, _, first_rows) = new_wandb_run()
    assert first.run_id == first_id and [row["step"] for row in first_rows if "loss" in row] == [0, 1]

    assert train_in_process(embedded_data, out, tracker="wandb", resume=True) == 0
    resumed_id, (resumed, _, _, resumed_rows) = new_wandb_run()
    assert resumed_id == resumed.run_id == first_id  # the same W&B run, continued at step 2
    assert [row["step"] for row in resumed_rows if "loss" in row] == [2, 3]

    shutil.rmtree(out / "checkpoints")  # as if the run had never checkpointed
    assert train_in_process(embedded_data, out, tracker="wandb", resume=True, allow_fresh_start=True) == 0
    fresh_id, (fresh, _, _, fresh_rows) = new_wandb_run()
    assert fresh_id == fresh.run_id and fresh_id != first_id  # steps 0.. again, in a new W&B run
    assert [row["step"] for row in fresh_rows if "loss" in row] == [0, 1, 2, 3]


# --- optional, and never in the way ---------------------------------------------------------------------------------

@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_missing_tracker_package_is_one_line(embedded_data, tmp_path, package):
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / f"{package}.py").write_text(f'raise ImportError("No module named {package!r}")\n')
    proc = run_script("train.py", *RUN, "--data", embedded_data, "--out", tmp_path / "run", "--tracker", package,
                      env={"PYTHONPATH": str(fake)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: --tracker {package} needs the {package} package (No module "
                                                f"named '{package}'); install it with: pip install {package}"]
    assert not (tmp_path / "run").exists()  # stopped before anything was written


TRACKER_CANNOT_START = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import train
import trackers
from cli import UserError

def cannot_start(*args, **kwargs):
    raise UserError("--tracker wandb could not start: not logged in")
trackers.open_trackers = cannot_start
rank, done = os.environ["RANK"], Path({done!r})
try:
    status = train.main(sys.argv[1:])
except SystemExit as e:
    status = e.code
(done / f"rank{{rank}}").write_text(str(status))
if rank == "0":  # torchrun stops the other ranks once one has ended: rank 0 waits (a minute at most) for rank 1
    for _ in range(600):
        if (done / "rank1").exists():
            break
        time.sleep(0.1)
sys.exit(status)
"""


def test_a_tracker_that_cannot_start_stops_every_rank(embedded_data, tmp_path):
    """Only rank 0 opens the trackers: when that fails, the other ranks must stop too instead of waiting for rank 0
    in the first collective (under torchrun --max-restarts each restart would hang until the group is torn down).
    Each rank records how its main() ended; rank 0 ends after rank 1, so torchrun cannot stop rank 1 first."""
    from helpers import REPO
    script, done = tmp_path / "train_untracked.py", tmp_path / "done"
    done.mkdir()
    script.write_text(TRACKER_CANNOT_START.format(repo=str(REPO), done=str(done)))
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *RUN,
                      "--data", embedded_data, "--out", tmp_path / "run", timeout=180)
    assert proc.returncode != 0
    assert {path.name: path.read_text() for path in done.iterdir()} == {"rank0": "2", "rank1": "2"}, proc.stderr[-2000:]
    assert proc.stderr.count("error: --tracker wandb could not start: not logged in") == 1, proc.stderr[-2000:]
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_unknown_tracker_refused():
    from cli import UserError
    from trackers import parse_trackers
    assert parse_trackers("none") == [] and parse_trackers("wandb, tensorboard,wandb") == ["wandb", "tensorboard"]
    with pytest.raises(UserError, match="unknown mlflow"):
        parse_trackers("tensorboard,mlflow")


class FakeTracker:
    """The interface Trackers drives (name, log, close(exit_code)), recording each close's exit code."""
    name = "fake"

    def __init__(self):
        self.logged, self.closed = [], []

    def log(self, event):
        self.logged.append(event)

    def close(self, exit_code):
        self.closed.append(exit_code)


def test_trackers_close_with_exit_code_1_when_an_exception_ends_the_run():
    # W&B marks a run closed with exit code 0 as finished: a crashed run must close with 1 so it shows as failed.
    from trackers import Trackers
    ok, failed = FakeTracker(), FakeTracker()
    with Trackers([ok]) as trackers:
        trackers.log({"step": 0})
    with pytest.raises(RuntimeError, match="boom"):
        with Trackers([failed]) as trackers:
            trackers.log({"step": 0})
            raise RuntimeError("boom")
    assert ok.logged == failed.logged == [{"step": 0}]
    assert ok.closed == [0] and failed.closed == [1]


def test_a_failing_tracker_warns_once_and_training_goes_on(embedded_data, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import trackers

    calls = []

    def disk_full(self, event):
        calls.append(event["step"])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(trackers.TensorBoardTracker, "log", disk_full)
    assert train_in_process(embedded_data, tmp_path / "run", tracker="tensorboard") == 0
    assert calls == [0]  # dropped after its first failure: no retry per event
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("warning: the tensorboard tracker failed (OSError") == 1
    assert [e["step"] for e in read_events(tmp_path / "run") if "loss" in e] == [0, 1, 2, 3]


def test_trackers_add_no_host_sync_to_the_training_steps(embedded_data, wandb_here, tmp_path):
    """The sync test of test_bench with both trackers on: the same count as without them, and no more for 6 steps
    than for 2 (the trackers get the Python numbers the log step already read)."""
    pytest.importorskip("tensorboard")
    plain = host_syncs_in_run(embedded_data, tmp_path / "plain", steps=2)
    short = host_syncs_in_run(embedded_data, tmp_path / "short", steps=2, tracker="tensorboard,wandb")
    long = host_syncs_in_run(embedded_data, tmp_path / "long", steps=6, tracker="tensorboard,wandb")
    assert list((tmp_path / "long").glob("events.out.tfevents.*")) and offline_runs(tmp_path / "long")
    assert short == plain and long == short
