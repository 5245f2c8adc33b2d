"""Plots of a run's metrics.jsonl: the training panel, train vs validation loss, and HellaSwag accuracy.

  python plot_metrics.py temp_data/runs/debug            # writes PNGs into the run directory's plots/
  python plot_metrics.py RUN_DIR --out assets/plots

Works on a run still in progress (a half-written last line is skipped) and on runs with no evaluations yet. Each PNG
carries the tEXt chunk written_by=plot_metrics.py: a PNG of the same name in --out is replaced only when it has it
(an earlier plot), anything else there stops the tool before a plot is written.
Importable: the notebooks call read_metrics / training_figure / loss_figure / hellaswag_figure / latest_values.
"""
import argparse
import cli
import json
import sys
from pathlib import Path

from cli import RESULT_MARKER, UserError, atomic_write, ensure_writable_dir, main_entry, path_arg, raise_all

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
    train.py is writing right now, one a crash tore, a hand edit) is skipped with a warning naming its number (the
    first MAX_LINE_WARNINGS of them, then one line counting the rest)."""
    file, events, skipped = scan_metrics(path)
    warn_skipped(file, skipped)
    return events


MAX_LINE_WARNINGS = 10  # a file of many bad lines (another kind of file) is a few warnings and a count, not one each


def scan_metrics(path) -> tuple[Path, list[dict], list[tuple[int, str]]]:
    """(the metrics file, its usable events in order, [(line number, what is wrong)] of the lines skipped)."""
    file = metrics_path(path)
    if not file.is_file():
        raise UserError(f"no metrics at {file}; pass a run directory made by train.py (or its metrics.jsonl)")
    events, skipped = [], []
    for number, line in enumerate(file.read_bytes().splitlines(), start=1):
        event, problem = parse_event(line)
        if problem:
            skipped.append((number, problem))
        else:
            events.append(event)
    return file, events, skipped


def warn_skipped(file: Path, skipped: list[tuple[int, str]]) -> None:
    for number, problem in skipped[:MAX_LINE_WARNINGS]:
        print(f"warning: {file} line {number} skipped: {problem}", file=sys.stderr)
    if len(skipped) > MAX_LINE_WARNINGS:
        print(f"warning: {file}: {len(skipped) - MAX_LINE_WARNINGS:,} more lines skipped (lines "
              f"{skipped[MAX_LINE_WARNINGS][0]} to {skipped[-1][0]})", file=sys.stderr)


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


FIGURES = (("training", training_figure, "Training"), ("loss", loss_figure, "Train vs validation loss"),
           ("hellaswag", hellaswag_figure, "HellaSwag"))
WRITTEN_BY = "plot_metrics.py"
PNG_MARK = {RESULT_MARKER: WRITTEN_BY}  # a tEXt chunk of every PNG written: the mark of a plot it may replace


def png_text(path) -> dict[str, str]:
    """The text chunks of a PNG file (keyword -> text, as Pillow reads them); {} for any other file."""
    from PIL import Image, UnidentifiedImageError  # (matplotlib's own dependency)
    try:
        with Image.open(path) as image:
            return dict(getattr(image, "text", {}))
    except (OSError, UnidentifiedImageError, ValueError):
        return {}


def is_plot_of_ours(path) -> bool:
    return Path(path).is_file() and png_text(path).get(RESULT_MARKER) == WRITTEN_BY


def check_plot_dir(out_dir: Path, what: str) -> None:
    """Refuse (UserError) an output folder that is a file, or that holds a file of a plot's name that this tool did
    not write (a user's own training.png): only earlier plots are replaced. Nothing is made here (write_plots makes
    the folder once the metrics passed too: a run directory given by mistake is not created)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{what} {out_dir} is a file; give a folder for the PNGs")
    foreign = [out_dir / f"{name}.png" for name, *_ in FIGURES
               if ((out_dir / f"{name}.png").exists() or (out_dir / f"{name}.png").is_symlink())
               and not is_plot_of_ours(out_dir / f"{name}.png")]
    if foreign:
        raise UserError(f"{what} {out_dir} holds {', '.join(f.name for f in foreign)}, which {WRITTEN_BY} did not "
                        f"write (no {RESULT_MARKER}={WRITTEN_BY} PNG text): it replaces only its own plots; move "
                        f"{'them' if len(foreign) > 1 else 'it'} away or choose another {what}")


def plot_events(path) -> tuple[Path, list[dict], list[tuple[int, str]]]:
    """scan_metrics, refusing a file without a single usable line (nothing to plot: an empty file, another kind of
    file, a file of garbage) in one line naming the first bad line."""
    file, events, skipped = scan_metrics(path)
    if not events and not skipped:
        raise UserError(f"{file} holds no metrics line (it is empty): nothing to plot; pass a run that has logged "
                        "a step")
    if not events:
        number, problem = skipped[0]
        raise UserError(f"{file} holds no usable metrics line ({len(skipped):,} lines, none an event train.py "
                        f"writes; line {number}: {problem}): nothing to plot; pass a run directory made by train.py "
                        "(or its metrics.jsonl)")
    return file, events, skipped


def write_plots(path, out_dir=None) -> list[Path]:
    """Write training.png, loss.png and hellaswag.png; out_dir defaults to RUN_DIR/plots. The metrics and the
    output folder are checked first, every problem named in one line, before any plot is written."""
    import matplotlib.pyplot as plt
    run_dir = metrics_path(path).parent
    what = "--out" if out_dir else "the plots folder"
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    (file, events, skipped), _ = raise_all(lambda: plot_events(path), lambda: check_plot_dir(out_dir, what))
    ensure_writable_dir(out_dir, what)
    warn_skipped(file, skipped)
    written = []
    for name, make, title in FIGURES:
        fig = make(events, title=f"{title}: {run_dir.name}")
        file = out_dir / f"{name}.png"
        with atomic_write(file) as f:  # a write that fails leaves the previous plot, never a cut-off image
            fig.savefig(f, format="png", dpi=110, metadata=PNG_MARK)
        plt.close(fig)
        written.append(file)
    return written


@main_entry
def main(argv=None) -> None:
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=path_arg, help="run directory (or its metrics.jsonl)")
    parser.add_argument("--out", type=path_arg, help="folder for the PNGs (default RUN/plots)")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    for file in write_plots(args.run, args.out):
        print(f"wrote {file}")


if __name__ == "__main__":
    main()
