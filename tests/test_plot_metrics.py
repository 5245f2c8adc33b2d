import json

import matplotlib
import pytest

matplotlib.use("Agg")

import plot_metrics  # noqa: E402
from helpers import assert_one_line_error, run_script  # noqa: E402


def write_events(run_dir, events, partial_tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + partial_tail)


def train_events(n):
    return [{"step": s, "loss": 10 - s * 0.1, "lr": 1e-3, "grad_norm": 1.0, "step_ms": 100.0,
             "tokens_per_s": 1000.0, "mfu": None, "tokens": 256 * (s + 1)} for s in range(n)]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plots_of_run_in_progress_without_evals(tmp_path):
    write_events(tmp_path / "run", train_events(5), partial_tail='{"step": 5, "lo')
    files = plot_metrics.write_plots(tmp_path / "run")
    assert [f.name for f in files] == ["training.png", "loss.png", "hellaswag.png"]
    for f in files:
        assert_png(f)


def test_plots_and_latest_values_with_evals(tmp_path):
    events = train_events(10) + [{"step": 0, "val_loss": 10.9}, {"step": 10, "val_loss": 9.0},
                                 {"step": 10, "hellaswag_acc": 0.3, "hellaswag_acc_norm": 0.4},
                                 {"step": 10, "samples": [{"prompt": "a", "text": "b"}]}]
    write_events(tmp_path / "run", events)
    latest = plot_metrics.latest_values(plot_metrics.read_metrics(tmp_path / "run"))
    assert latest["val_loss"] == (10, 9.0) and latest["loss"] == (9, pytest.approx(9.1))
    assert "mfu" not in latest  # never measured on CPU
    fig = plot_metrics.hellaswag_figure(events)
    assert len(fig.axes[0].lines) == 3  # acc_norm, acc and the chance line
    for f in plot_metrics.write_plots(tmp_path / "run", tmp_path / "pngs"):
        assert_png(f)


def test_cli_missing_run_is_one_line_error(tmp_path):
    proc = run_script("plot_metrics.py", tmp_path / "nothing")
    assert assert_one_line_error(proc, alone=True).startswith("error: no metrics at")
