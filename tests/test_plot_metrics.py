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


# --- what --out holds: only the tool's own plots are replaced -----------------------------------------------------

PLOT_NAMES = ["training.png", "loss.png", "hellaswag.png"]


def png_without_mark(path):
    import matplotlib.pyplot as plt
    fig = plt.figure()
    fig.savefig(path, format="png")  # matplotlib's own text (Software) only
    plt.close(fig)


def png_of_another_tool(path):
    import matplotlib.pyplot as plt
    fig = plt.figure()
    fig.savefig(path, format="png", metadata={"written_by": "hellaswag_eval.py"})
    plt.close(fig)


FOREIGN = {  # (name in --out, how it is made)
    "a user's training.png": ("training.png", png_without_mark),
    "a text file named loss.png": ("loss.png", lambda p: p.write_text("my notes")),
    "a folder named hellaswag.png": ("hellaswag.png", lambda p: p.mkdir()),
    "another tool's PNG": ("training.png", png_of_another_tool),
    "an empty training.png": ("training.png", lambda p: p.write_bytes(b"")),
}


def tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot_metrics.main([str(a) for a in argv])
    import subprocess
    return subprocess.CompletedProcess(argv, exit_info.value.code, "", capsys.readouterr().err)


@pytest.mark.parametrize("case", FOREIGN)
def test_a_file_of_a_plots_name_not_written_by_the_tool_is_refused_before_any_plot(case, tmp_path, capsys):
    """--out EXISTING_FOLDER overwrote a user's own training.png (any file of a plot's name). Now the PNGs carry a
    text chunk written_by=plot_metrics.py; another file of such a name stops the tool before it writes anything."""
    write_events(tmp_path / "run", train_events(5))
    out = tmp_path / "out"
    plot_metrics.write_plots(tmp_path / "run", out)  # earlier plots of this tool: replaced, they do not count
    name, make = FOREIGN[case]
    (out / name).unlink()
    make(out / name)
    before = tree(tmp_path)
    error = run_main([tmp_path / "run", "--out", out], capsys)
    assert_one_line_error(error, f"--out {out} holds {name}, which plot_metrics.py did not write", status=2,
                          alone=True)
    assert tree(tmp_path) == before


def test_earlier_plots_are_replaced_and_every_plot_carries_the_mark(tmp_path):
    write_events(tmp_path / "run", train_events(5))
    first = {f: f.read_bytes() for f in plot_metrics.write_plots(tmp_path / "run", tmp_path / "out")}
    write_events(tmp_path / "run", train_events(9))
    second = plot_metrics.write_plots(tmp_path / "run", tmp_path / "out")
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == sorted(PLOT_NAMES)
    assert any(f.read_bytes() != data for f, data in first.items())
    for f in second:
        assert plot_metrics.png_text(f)["written_by"] == "plot_metrics.py"


def test_the_committed_debug_run_plots_carry_the_mark(repo_dir):
    """The README regenerates them with `plot_metrics.py RUN --out assets/debug_run`: they must be the tool's own."""
    for name in PLOT_NAMES:
        assert plot_metrics.is_plot_of_ours(repo_dir / "assets" / "debug_run" / name), name


# --- nothing to plot, many bad lines, bad paths -----------------------------------------------------------------

NOTHING_TO_PLOT = {  # (metrics.jsonl's bytes, what the error says)
    "empty": (b"", "holds no metrics line (it is empty)"),
    "blank lines": (b"\n\n", "holds no usable metrics line (2 lines"),
    "garbage": (b"not json\n{\"step\": -1}\n[1, 2]\n", "holds no usable metrics line (3 lines"),
    "a checkpoint's bytes": (bytes(range(256)) * 400, "holds no usable metrics line"),
}


@pytest.mark.parametrize("case", NOTHING_TO_PLOT)
def test_nothing_to_plot_is_one_line_and_nothing_is_written(case, tmp_path, capsys):
    data, phrase = NOTHING_TO_PLOT[case]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_bytes(data)
    error = run_main([tmp_path / "run", "--out", tmp_path / "out"], capsys)
    assert_one_line_error(error, f"{tmp_path / 'run' / 'metrics.jsonl'} {phrase}", "nothing to plot", status=2,
                          alone=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("bad_lines, shown", [(3, 3), (10, 10), (11, 10), (500, 10)])
def test_warnings_name_the_first_bad_lines_then_count_the_rest(bad_lines, shown, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    lines = [json.dumps(e) for e in train_events(2)] + ["torn {"] * bad_lines
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert len(plot_metrics.read_metrics(tmp_path / "run")) == 2
    warnings = capsys.readouterr().err.splitlines()
    named = [w for w in warnings if " skipped: " in w]
    assert [int(w.split(" line ")[1].split()[0]) for w in named] == list(range(3, 3 + shown))
    rest = [w for w in warnings if w not in named]
    assert rest == ([f"warning: {tmp_path / 'run' / 'metrics.jsonl'}: {bad_lines - shown:,} more lines skipped "
                     f"(lines {3 + shown} to {2 + bad_lines})"] if bad_lines > shown else [])


def test_every_bad_path_is_named_in_one_line_for_the_user(tmp_path, capsys):
    """/nope --out foreign.txt named only the run; a good run with --out foreign.txt ended with the source place
    '(in plot_metrics.py:163 (write_plots))'."""
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("keep me")
    error = run_main([tmp_path / "nope", "--out", foreign], capsys)
    assert_one_line_error(error, f"no metrics at {tmp_path / 'nope'}", f"--out {foreign} is a file", status=2,
                          alone=True)
    write_events(tmp_path / "run", train_events(3))
    line = assert_one_line_error(run_main([tmp_path / "run", "--out", foreign], capsys), status=2, alone=True)
    assert line == f"error: --out {foreign} is a file; give a folder for the PNGs"
    assert foreign.read_text() == "keep me" and not (tmp_path / "nope").exists()
