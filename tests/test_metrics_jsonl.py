"""metrics.jsonl as plot_metrics.py reads and plots it (the one parser; export_hf's model card and the notebooks use
it too): which lines are events, and the plotted values (fractions shown as percent)."""
import json

import matplotlib
import pytest

matplotlib.use("Agg")
import plot_metrics  # noqa: E402


@pytest.mark.parametrize("line, problem", [
    ({"step": True, "loss": 1.0}, "its step is True"),
    ({"step": -1, "loss": 1.0}, "its step is -1"),
    ({"step": 2.0, "loss": 1.0}, "its step is 2.0"),
    ({"step": 3, "loss": True}, "its loss is True"),
    ({"step": 3, "mfu": "0.4"}, "its mfu is '0.4'"),
])
def test_a_line_with_a_bad_step_or_value_is_skipped(tmp_path, capsys, line, problem):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 2.0}) + "\n" + json.dumps(line) + "\n")
    assert plot_metrics.read_metrics(tmp_path) == [{"step": 0, "loss": 2.0}]
    assert capsys.readouterr().err.strip() == f"warning: {tmp_path / 'metrics.jsonl'} line 2 skipped: {problem}" + (
        ", not an integer >= 0" if "step" in problem else ", not a number")


def lines_of(fig, title: str) -> list[tuple[list, list]]:
    ax = next(ax for ax in fig.axes if ax.get_title() == title)
    return [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines]


def test_fractions_are_plotted_as_percent():
    events = [{"step": 1, "loss": 3.0, "mfu": 0.25}, {"step": 2, "loss": 2.5, "mfu": 0.5},
              {"step": 2, "hellaswag_acc": 0.3, "hellaswag_acc_norm": 0.375}]
    assert lines_of(plot_metrics.training_figure(events), "Model FLOPs utilization") == [([1, 2], [25.0, 50.0])]
    assert lines_of(plot_metrics.training_figure(events), "Training loss") == [([1, 2], [3.0, 2.5])]
    hellaswag = lines_of(plot_metrics.hellaswag_figure(events, title="HellaSwag"), "HellaSwag")
    assert hellaswag[:2] == [([2], [37.5]), ([2], [30.0])]  # acc_norm, acc
    assert hellaswag[2][1] == [25, 25]  # the chance line, in the same unit
