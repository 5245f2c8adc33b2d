"""Both notebooks run top to bottom headless (nbclient), in this interpreter, the metrics one on a real train.py run."""
import json
import sys

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from helpers import REPO, run_script
from model import GPT, PRESETS

NOTEBOOKS = REPO / "notebooks"

# 6 optimizer steps of 2 x 4 x 32 tokens with validation and HellaSwag at steps 0, 3 and 6 and samples at the end.
TINY_RUN = ["--config", "debug", "--micro-batch", "4", "--seq-len", "32", "--total-batch-tokens", "256",
            "--max-steps", "6", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "3", "--val-tokens", "512",
            "--hellaswag-every", "3", "--hellaswag-limit", "2", "--sample-every", "0", "--sample-tokens", "4",
            "--final-val-tokens", "512"]


@pytest.fixture
def this_python_kernel(tmp_path, monkeypatch):
    """A 'python3' kernelspec that runs this interpreter, found first through JUPYTER_PATH (a user-level 'python3'
    kernelspec could otherwise point the notebooks at another Python without torch)."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))


def execute(name: str) -> nbformat.NotebookNode:
    """Run every cell in notebooks/ as Jupyter would (a failing cell raises), then report the kernel's Python."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells), f"{name} is committed with outputs: clear them"
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    NotebookClient(nb, kernel_name="python3", timeout=120,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable
    return nb


def outputs(nb, kind: str) -> list[str]:
    """Every output of a MIME type ('image/png', 'text/markdown') or the printed text ('stream')."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "stream" and out["output_type"] == "stream":
                found.append(out["text"])
            elif kind in out.get("data", {}):
                found.append(out["data"][kind])
    return found


def test_metric_graphs_on_a_debug_run(embedded_data, tmp_path, monkeypatch, this_python_kernel):
    run = tmp_path / "run"
    run_script("train.py", *TINY_RUN, "--data", embedded_data, "--out", run, check=True)
    monkeypatch.setenv("METRICS_RUN", str(run))  # the kernel inherits this process's environment

    nb = execute("metric_graphs.ipynb")

    printed = "".join(outputs(nb, "stream"))
    assert f"run: {run}" in printed and "last logged step 5 of 6" in printed
    assert "HTML stands for" in printed  # the samples written at the last step
    assert len(outputs(nb, "image/png")) == 3  # training panel, train vs validation, HellaSwag
    (table,) = [md for md in outputs(nb, "text/markdown") if md.startswith("| metric | value | step |")]
    for metric in ("loss", "lr", "grad_norm", "val_loss", "hellaswag_acc_norm"):
        assert f"\n| {metric} | " in table


def test_parameters_tuning_counts_come_from_model_py(this_python_kernel):
    nb = execute("parameters_tuning.ipynb")

    tables = "\n".join(outputs(nb, "text/markdown"))
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            model = GPT(cfg)
        assert f"| `{name}` |" in tables
        assert f"| {model.num_params():,} | {model.num_params(include_embedding=False):,} |" in tables
    for published in ("GPT-2 small", "GPT-3 Medium", "Llama-3.2-1B", "OLMo-1B", "OpenELM-270M", "LF_LLM-269M"):
        assert f"| {published}" in tables
    # OLMo-1B's shape without biases or norm weights, 50,304 tied embedding rows: 16 x (4 x 2048^2 + 3 x 2048 x 8192)
    # + 50,304 x 2048, next to the preset built on it
    assert "| OLMo-1B (its shape, counted here) | 1,176,764,416 | 1,073,741,824 |" in tables
    assert "| `lf_llm_1b` (model.py) | 1,177,161,728 | 1,074,235,392 | 7.865 | 493,568 |" in tables
    assert len(outputs(nb, "image/png")) == 1  # the LR schedules
    assert "implied MFU" in "".join(outputs(nb, "stream"))
