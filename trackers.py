"""Live mirrors of metrics.jsonl in TensorBoard and Weights & Biases: `train.py --tracker tensorboard,wandb`.

metrics.jsonl stays the record that the plots and notebooks read; a tracker gets each of its events as it is logged
(same step, same names), plus the run's config and header. Both packages are optional and imported only when asked
for. Only rank 0 tracks, fed with the Python numbers already logged (no extra wait for the GPU); a tracker that
fails during the run is dropped with one warning and training goes on.
"""
import json
import os
import secrets
from pathlib import Path

from tqdm import tqdm

from cli import UserError, atomic_write, write_json
from plot_metrics import parse_event, read_metrics

TRACKERS = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id.txt"  # in the run directory: a resumed run continues the same W&B run
WANDB_DEFAULT_PROJECT = "lf-llm"


def parse_trackers(text: str) -> list[str]:
    """'none' -> [], 'tensorboard,wandb' -> both; an unknown name is a UserError listing the choices."""
    names = [name.strip() for name in text.split(",") if name.strip() not in ("", "none")]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise UserError(f"--tracker {text!r}: unknown {', '.join(unknown)}; give none, {', '.join(TRACKERS)} "
                        "or a comma-separated list of them")
    return list(dict.fromkeys(names))


def missing_packages(names: list[str]) -> list[str]:
    """Import each chosen tracker's package now, so that a missing one stops the run before it starts: one problem
    per package that does not import (train.check_run names them with every other problem of the run)."""
    problems = []
    for name in names:
        try:
            _import(name)
        except ImportError as e:
            problems.append(f"--tracker {name} needs the {name} package ({e}); install it with: pip install {name}")
    return problems


def _import(name: str):
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter  # imports the tensorboard package
        return SummaryWriter
    import wandb
    return wandb


class Trackers:
    """The chosen trackers behind one call per event. A context manager: closes them on exit, marking the W&B run
    failed when an exception ends the run."""

    def __init__(self, trackers=(), warn=print):
        self.active, self.warn = list(trackers), warn

    def log(self, event: dict) -> None:
        for tracker in list(self.active):
            self._call(tracker, tracker.log, event)

    def close(self, exit_code: int = 0) -> None:
        for tracker in list(self.active):
            self._call(tracker, tracker.close, exit_code)
        self.active = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(exit_code=0 if exc_type is None else 1)

    def _call(self, tracker, method, *args) -> None:
        try:
            method(*args)
        except Exception as e:  # network, disk, the package itself: the run matters more than its mirror
            self.active.remove(tracker)
            self.warn(f"warning: the {tracker.name} tracker failed ({type(e).__name__}: {e}); training goes on "
                      "without it (metrics.jsonl has every event)")
            try:
                tracker.close(1)
            except Exception:
                pass  # already reported: one warning per tracker


def open_trackers(names: list[str], run_dir: Path, start_step: int, resumed: bool, config: dict, header: list[str],
                  wandb_project: str = "", wandb_run_name: str = "", warn=print) -> Trackers:
    """Start the named trackers for a run that continues after `start_step` steps (0 and resumed=False: a fresh
    run). A tracker that cannot start is a UserError: better one line now than a run nobody can watch."""
    opened = []
    for name in names:
        try:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(run_dir, start_step, config, header))
            else:
                opened.append(WandbTracker(run_dir, resumed, config, header, wandb_project, wandb_run_name))
        except Exception as e:
            Trackers(opened).close(exit_code=1)
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"--tracker {name} could not start: {detail}"
                            + ("; log in (wandb login, WANDB_API_KEY) or set WANDB_MODE=offline"
                               if name == "wandb" else ""))
    return Trackers(opened, warn)


def samples_text(samples: list[dict]) -> str:
    """A samples event as the lines train.log shows: 'prompt' -> 'continuation' (markdown paragraphs)."""
    return "\n\n".join(f"{s['prompt']!r} -> {s['text']!r}" for s in samples)


class TensorBoardTracker:
    """Event files in the run directory, so `tensorboard --logdir RUN_DIR` (or a folder of runs) shows it. Each
    number is a scalar under its metrics.jsonl name; samples are text."""
    name = "tensorboard"

    def __init__(self, run_dir: Path, start_step: int, config: dict, header: list[str]):
        SummaryWriter = _import("tensorboard")
        # purge_step: TensorBoard hides what earlier event files hold at or after start_step, as drop_metrics_after
        # did in metrics.jsonl; the evaluations of start_step that metrics.jsonl keeps are written again below.
        self.writer = SummaryWriter(str(run_dir), purge_step=start_step, flush_secs=30)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", start_step)
        self.writer.add_text("run_header", "  \n".join(header), start_step)
        metrics = run_dir / "metrics.jsonl"
        for event in read_metrics(metrics) if metrics.exists() else []:
            if event["step"] == start_step:
                self.log(event)

    def log(self, event: dict) -> None:
        step = event["step"]
        for key, value in event.items():
            if key == "samples":
                self.writer.add_text(key, samples_text(value), step)
            elif key != "step" and value is not None:
                self.writer.add_scalar(key, value, step)

    def close(self, exit_code: int = 0) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run named after the run directory, its id kept there. Its x-axis is the event's `step` (a W&B step
    metric), so an event that a resume logs again never clashes with W&B's own ever-increasing step (W&B keeps
    what it was sent: the steps a crash lost and the resume ran again appear twice there). W&B's
    environment (WANDB_MODE=offline, WANDB_DIR, WANDB_ENTITY, WANDB_PROJECT, WANDB_NAME...) applies; its files go
    to the run directory unless WANDB_DIR says otherwise."""
    name = "wandb"

    def __init__(self, run_dir: Path, resumed: bool, config: dict, header: list[str], project: str, run_name: str):
        self.wandb = _import("wandb")
        id_file = run_dir / WANDB_ID_FILE
        # a resumed run continues its W&B run; a fresh start (metrics.jsonl emptied too) is a new one
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else secrets.token_hex(6)
        with atomic_write(id_file, "w") as f:
            f.write(run_id + "\n")
        self.run = self.wandb.init(
            project=project or os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT,
            name=run_name or os.environ.get("WANDB_NAME") or run_dir.name,
            dir=os.environ.get("WANDB_DIR") or str(run_dir), id=run_id, resume="allow")
        self.run.config.update(config, allow_val_change=True)  # a resume may change settings (--max-steps ...)
        self.run.summary["run_header"] = "\n".join(header)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, event: dict) -> None:
        row = {key: value for key, value in event.items() if value is not None}
        if "samples" in row:
            row["samples"] = self.wandb.Table(columns=["prompt", "text"],
                                              data=[[s["prompt"], s["text"]] for s in row["samples"]])
        self.run.log(row)

    def close(self, exit_code: int = 0) -> None:
        # finish() returns before wandb's service process has written and closed the offline .wandb file: it is
        # complete once that process ends (at this process's exit, or after wandb.teardown())
        self.run.finish(exit_code=exit_code)


# ----------------------------------------------------------------------------------------------------------------
# A training run's record: train.log, metrics.jsonl, and the trackers mirroring it

class RunLog:
    """Rank 0's readable log (stdout + train.log), metrics.jsonl and the --tracker mirrors of it; other ranks stay
    quiet."""

    def __init__(self, run_dir: Path, active: bool):
        self.active, self.run_dir = active, run_dir
        self.log_file = open(run_dir / "train.log", "a") if active else None
        self.metrics_path = run_dir / "metrics.jsonl"
        self.trackers = Trackers()  # none until open_trackers

    def info(self, line: str = "") -> None:
        if self.active:
            tqdm.write(line)
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def metrics(self, event: dict) -> None:
        if self.active:  # opened per event: a resume may have rewritten the file (drop_metrics_after)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(event) + "\n")
            self.trackers.log(event)

    def header(self, lines: list[str], config: dict) -> None:
        """The run's header and config in the log; the config also as config.json."""
        for line in lines:
            self.info(line)
        self.info("config: " + json.dumps(config))
        if self.active:
            write_json(self.run_dir / "config.json", config)

    def open_trackers(self, cfg, d, step: int, resumed: bool, header: list[str], config: dict) -> Trackers:
        """Rank 0 starts the --tracker mirrors (cfg: train.py's TrainConfig), which then get every metrics event;
        other ranks get none. A tracker that cannot start stops every rank together (the others would otherwise
        wait in the first collective; d: devices.Dist)."""
        error = None
        if self.active:
            try:
                self.trackers = open_trackers(parse_trackers(cfg.tracker), self.run_dir, step, resumed, config,
                                              header, cfg.wandb_project, cfg.wandb_run_name, warn=self.info)
            except UserError as e:
                error = str(e)
        error = d.gather(error)[0]
        if error:
            raise UserError(error)
        return self.trackers


def drop_metrics_after(run_dir: Path, step: int) -> list[tuple[int, str]]:
    """On resume from a checkpoint taken after `step` steps, forget the events the lost segment logged past it (the
    run logs them again). A line that is no event train.py can read (a note added by hand, a line a crash tore) is
    no event of the lost segment: it is kept as it is, ended by a newline so that the next event gets a line of its
    own. Returns [(line number, what is wrong)] of those lines."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    kept, unreadable = [], []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        event, problem = parse_event(line)
        if problem and line.strip():
            unreadable.append((number, problem))
        elif problem or event["step"] > step or (event["step"] == step and "loss" in event):
            continue  # an empty line, or an event of the lost segment
        kept.append(line + b"\n")
    with atomic_write(path, "wb") as f:
        f.write(b"".join(kept))
    return unreadable
