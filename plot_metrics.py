"""Plots of a run's metrics.jsonl: the training panel, train vs validation loss, and HellaSwag accuracy.

  python plot_metrics.py temp_data/runs/debug            # writes PNGs into the run directory's plots/
  python plot_metrics.py RUN_DIR --out assets/plots

Works on a run still in progress (a half-written last line is skipped) and on runs with no evaluations yet.
Importable: the notebooks call read_metrics / training_figure / loss_figure / hellaswag_figure / latest_values.
"""
import argparse
import cli
import json
import sys
from pathlib import Path

from cli import UserError, atomic_write, main_entry

TRAIN_PANELS = [  # (metrics key, title, y label, log scale)
    ("loss", "Training loss", "cross-entropy (nats/token)", False),
    ("lr", "Learning rate", "LR", False),
    ("grad_norm", "Gradient norm (before clipping)", "L2 norm", True),
    ("step_ms", "Step time", "ms per optimizer step", False),
    ("tokens_per_s", "Throughput", "tokens/s (all processes)", False),
    ("mfu", "Model FLOPs utilization", "MFU (%)", False),
]


def metrics_path(path) -> Path:
    path = Path(path)
    return path / "metrics.jsonl" if path.is_dir() else path


def read_metrics(path) -> list[dict]:
    """Events of a run directory's (or a file's) metrics.jsonl, in order. A line that cannot be used (the one
    train.py is writing right now, one a crash tore, a hand edit) is skipped with a warning naming its number."""
    file = metrics_path(path)
    if not file.is_file():
        raise UserError(f"no metrics at {file}; pass a run directory made by train.py (or its metrics.jsonl)")
    events = []
    for number, line in enumerate(file.read_bytes().splitlines(), start=1):
        event, problem = parse_event(line)
        if problem:
            print(f"warning: {file} line {number} skipped: {problem}", file=sys.stderr)
        else:
            events.append(event)
    return events


def parse_event(line: bytes) -> tuple[dict | None, str]:
    """(event, "") for a usable metrics line, else (None, what is wrong with it). An event is a JSON object with an
    integer step >= 0 whose plotted metrics are numbers (or null)."""
    try:
        event = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg} at column {e.colno}; unfinished or damaged)"
    if not isinstance(event, dict):
        return None, f"a JSON {type(event).__name__}, not an object"
    step = event.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None, f"its step is {step!r}, not an integer >= 0"
    for key in NUMERIC_KEYS & event.keys():
        value = event[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return None, f"its {key} is {value!r}, not a number"
    return event, ""


# Keys whose values are plotted: each must be a number (or null).
NUMERIC_KEYS = {key for key, *_ in TRAIN_PANELS} | {"val_loss", "hellaswag_acc", "hellaswag_acc_norm", "tokens"}


def series(events: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every event that has `key` with a value."""
    points = [(e["step"], e[key]) for e in events if e.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _figure(rows: int, cols: int, width: float, height: float):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    return fig, axes.ravel()


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def training_figure(events: list[dict], title: str = ""):
    fig, axes = _figure(2, 3, 15, 7.5)
    for ax, (key, name, ylabel, log) in zip(axes, TRAIN_PANELS):
        steps, values = series(events, key)
        ax.set_title(name)
        if not values:
            _empty(ax, f"no {key} values yet" + (" (no GPU peak known)" if key == "mfu" else ""))
            continue
        if key == "mfu":
            values = [100 * v for v in values]
        ax.plot(steps, values, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Training")
    fig.tight_layout()
    return fig


def _lines_figure(title: str, ylabel: str, lines: list, empty_message: str, chance: float | None = None):
    """One panel of several (steps, values, matplotlib style, label) lines against step."""
    fig, (ax,) = _figure(1, 1, 8, 5)
    if not any(values for _, values, _, _ in lines):
        _empty(ax, empty_message)
    else:
        for steps, values, style, label in lines:
            ax.plot(steps, values, style, ms=4, lw=1.2, label=label)
        if chance is not None:
            ax.axhline(chance, color="gray", ls=":", label=f"chance ({chance:g}%)")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def loss_figure(events: list[dict], title: str = ""):
    return _lines_figure(title or "Train vs validation loss", "cross-entropy (nats/token)",
                         [(*series(events, "loss"), "-", "train (batch mean)"),
                          (*series(events, "val_loss"), "o-", "validation")], "no losses yet")


def hellaswag_figure(events: list[dict], title: str = ""):
    def percent(key):
        steps, values = series(events, key)
        return steps, [100 * v for v in values]
    return _lines_figure(title or "HellaSwag", "accuracy (%)",
                         [(*percent("hellaswag_acc_norm"), "o-", "acc_norm (mean log-prob per token)"),
                          (*percent("hellaswag_acc"), "s--", "acc (sum of log-probs)")],
                         "no HellaSwag evaluations yet", chance=25)


def latest_values(events: list[dict]) -> dict:
    """The newest value of each metric, with the step it was recorded at."""
    latest = {}
    for event in events:
        for key, value in event.items():
            if key != "step" and value is not None:
                latest[key] = (event["step"], value)
    return latest


def write_plots(path, out_dir=None) -> list[Path]:
    """Write training.png, loss.png and hellaswag.png; out_dir defaults to RUN_DIR/plots."""
    import matplotlib.pyplot as plt
    events = read_metrics(path)
    run_dir = metrics_path(path).parent
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    figures = (("training", training_figure, "Training"), ("loss", loss_figure, "Train vs validation loss"),
               ("hellaswag", hellaswag_figure, "HellaSwag"))
    for name, make, title in figures:
        fig = make(events, title=f"{title}: {run_dir.name}")
        file = out_dir / f"{name}.png"
        with atomic_write(file) as f:  # a write that fails leaves the previous plot, never a cut-off image
            fig.savefig(f, format="png", dpi=110)
        plt.close(fig)
        written.append(file)
    return written


@main_entry
def main(argv=None) -> None:
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory (or its metrics.jsonl)")
    parser.add_argument("--out", help="folder for the PNGs (default RUN/plots)")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    for file in write_plots(args.run, args.out):
        print(f"wrote {file}")


if __name__ == "__main__":
    main()
