"""JSON result files (--out) replace only what their tool wrote: every tool with a JSON --out (hellaswag_eval.py,
each bench.py mode, bench_data_prep.py, memory_estimate.py) x every foreign target (a training checkpoint, a run's
config.json, its metrics.jsonl, a folder, a JSON file without the "written_by" marker, another tool's result, a folder
that cannot be made; bench.py gpu also a <stem>_rows folder or file it did not make) is exit 2 and one line naming
--out before any work, the target byte-identical and nothing created; the tool's own earlier result is replaced."""
import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import REPO, run_main, run_script, save_tiny_checkpoint

SAMPLE_HELLASWAG = REPO / "assets" / "hellaswag" / "hellaswag_val_head10.jsonl"
TOOLS = ["hellaswag_eval.py", "bench.py train", "bench.py generate", "bench.py gpu", "bench_data_prep.py",
         "memory_estimate.py"]
TARGETS = ["checkpoint", "config.json", "metrics.jsonl", "folder", "unmarked result", "other tool's result",
           "folder not writable"]
GPU_ROWS_TARGETS = ["rows folder not made by bench", "rows path is a file"]
CASES = [(tool, target) for tool in TOOLS for target in TARGETS] + [("bench.py gpu", t) for t in GPU_ROWS_TARGETS]


def test_every_json_out_tool_is_in_the_matrix():
    """A new bench.py mode (each gets --out) must join TOOLS."""
    import bench
    assert {tool.split(" ")[1] for tool in TOOLS if tool.startswith("bench.py ")} == set(bench.MODES)


def tool_argv(tool: str, checkpoint: Path, data: Path, work: Path) -> list:
    """The cheapest complete run of `tool`, without --out."""
    return {
        "hellaswag_eval.py": ["hellaswag_eval.py", "--checkpoint", checkpoint, "--data", SAMPLE_HELLASWAG, "--limit", 1,
                              "--batch-size", 1, "--device", "cpu"],
        "bench.py train": ["bench.py", "train", "--config", "debug", "--micro-batch", 2, "--seq-len", 32, "--steps", 1,
                           "--warmup", 0, "--no-compile", "--data", data],
        "bench.py generate": ["bench.py", "generate", "--new-tokens", 2, "--repeats", 1, "--block-size", 8],
        "memory_estimate.py": ["memory_estimate.py", "--configs", "debug", "--micro-batch", 1, "--seq-len", 16,
                               "--gpus", 1],
        "bench_data_prep.py": ["bench_data_prep.py", "--corpus-mb", 0.01, "--workers", 1, "--schemes", "loop",
                               "--work-dir", work],
        "bench.py gpu": ["bench.py", "gpu", "--device", "cpu", "--config", "debug", "--rows", "generate",
                         "--new-tokens", 2, "--deadline-s", 120],
    }[tool]


def make_targets(root: Path, tool: str) -> dict:
    """A training run's files, an old result without the marker, another tool's result in `root`; their paths."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_tiny_checkpoint(run / "checkpoints" / "step_000002.pt")
    (run / "config.json").write_text(json.dumps({"model": {"n_layer": 2}, "train": {"max_steps": 8}}, indent=2))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in range(3)))
    (root / "old.json").write_text(json.dumps({"acc": 0.25, "total": 10}))
    other = "bench.py gpu" if tool == "hellaswag_eval.py" else "hellaswag_eval.py"
    (root / "other.json").write_text(json.dumps({"written_by": other, "acc": 0.25}))
    (root / "a_file").write_text("x")  # --out a_file/sub/r.json: its folder cannot be made (for root too)
    if tool == "bench.py gpu":
        (root / "a_rows").mkdir()
        (root / "a_rows" / "notes.txt").write_text("mine")
        (root / "b_rows").write_text("a file")
    return target_paths(root)


def target_paths(root: Path) -> dict:
    """{target name: the --out path} in a folder make_targets filled (bench.py gpu: a.json's rows folder, b.json's)."""
    run = root / "run"
    return {"checkpoint": run / "checkpoints" / "step_000002.pt", "config.json": run / "config.json",
            "metrics.jsonl": run / "metrics.jsonl", "folder": run / "checkpoints", "unmarked result": root / "old.json",
            "other tool's result": root / "other.json", "folder not writable": root / "a_file" / "sub" / "r.json",
            "rows folder not made by bench": root / "a.json",
            "rows path is a file": root / "b.json"}


def tree(folder: Path) -> dict:
    """Every path under `folder`: a file's sha256, a folder's None."""
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(a checkpoint to evaluate, a small random-token dataset) for the tools' own runs."""
    import bench_gpu
    root = tmp_path_factory.mktemp("inputs")
    save_tiny_checkpoint(root / "model.pt")
    return root / "model.pt", bench_gpu.random_token_data(root / "data", 2, 32)


@pytest.fixture(scope="module")
def refused(inputs, tmp_path_factory):
    """{(tool, target): (its run, the --out path, its folder's tree before, after)}: each case in a folder of its
    own (a copy of one made per tool), each tool's main run in this process (refused before any work, a run costs
    milliseconds where a fresh interpreter costs seconds of importing torch)."""
    checkpoint, data = inputs
    templates = {tool: tmp_path_factory.mktemp("template") for tool in TOOLS}
    for tool, template in templates.items():
        make_targets(template, tool)
    roots = {case: shutil.copytree(templates[case[0]], tmp_path_factory.mktemp("foreign") / "case") for case in CASES}
    targets = {case: target_paths(root)[case[1]] for case, root in roots.items()}
    before = {case: tree(root) for case, root in roots.items()}
    procs = [run_main(*tool_argv(case[0], checkpoint, data, roots[case] / "work"), "--out", targets[case])
             for case in CASES]
    return {case: (proc, targets[case], before[case], tree(roots[case])) for case, proc in zip(CASES, procs)}


@pytest.mark.parametrize("tool, target", CASES)
def test_a_foreign_out_target_is_one_line_before_work_and_left_alone(refused, tool, target):
    proc, out, before, after = refused[(tool, target)]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    expected = f"error: --out's folder {out.parent} is not writable" if target == "folder not writable" else \
        f"error: --out {out}"
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert proc.stdout == "", proc.stdout  # refused before any work: nothing measured, nothing printed
    assert after == before  # the target byte-identical, nothing created (no temporary file, no _rows folder)


# bench_data_prep.py sets environment variables for the processes it starts (they would outlive its run in this
# process): it runs in a process of its own, beside the others' mains, which run in the test's process.
OWN_PROCESS = "bench_data_prep.py"


def test_the_tools_own_earlier_result_is_replaced(inputs, tmp_path):
    """A result the same tool wrote (its "written_by" marker, whatever the bench.py mode) is replaced by the new one;
    bench.py gpu's per-row folder is made beside --out and marked, and a marked one is used again."""
    checkpoint, data = inputs
    outs = {tool: tmp_path / f"{tool.replace(' ', '_').replace('.', '_')}.json" for tool in TOOLS}
    for tool, out in outs.items():
        marker = "bench.py generate" if tool == "bench.py train" else tool  # another mode of the same script
        out.write_text(json.dumps({"written_by": marker, "stale": True}))
    argvs = {tool: [*tool_argv(tool, checkpoint, data, tmp_path / "work"), "--out", out] for tool, out in outs.items()}
    with ThreadPoolExecutor(1) as background:
        own_process = background.submit(run_script, *argvs[OWN_PROCESS], timeout=240)
        procs = {tool: run_main(*argv) for tool, argv in argvs.items() if tool != OWN_PROCESS}
        procs[OWN_PROCESS] = own_process.result()
    for tool, out in outs.items():
        proc = procs[tool]
        assert proc.returncode == 0, (tool, proc.stderr[-2000:])
        result = json.loads(out.read_text())
        assert result["written_by"] == tool and "stale" not in result, (tool, result)
    rows = tmp_path / "bench_py_gpu_rows"
    assert (rows / ".bench-gpu-rows").is_file() and json.loads((rows / "generate.json").read_text())[
        "written_by"] == "bench.py generate"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert leftovers == [], leftovers  # no temporary files of atomic_write
