"""Faults a user meets: an output on a read-only filesystem or under a file, a file size limit, Ctrl-C, damaged
manifests, metrics lines and input files, out-of-range and bad arguments. Each is one line on stderr and a non-zero
exit, and leaves nothing behind that looks finished. (A checkpoint on a full disk, damaged or killed mid-write:
test_checkpoint.py.)"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (REPO, TINY, assert_one_line_error, copy_run, free_port, limited_run, run_script, run_scripts,
                     save_tiny_checkpoint, train)

SAMPLE_HELLASWAG = REPO / "assets" / "hellaswag" / "hellaswag_val_head10.jsonl"


@pytest.fixture
def unwritable(tmp_path):
    """(folder no file can be written in, the reason the error names): a read-only tmpfs where the test may mount
    one (root), else a path under a regular file (which fails for root too)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        (tmp_path / "a_file").write_text("x")
        yield tmp_path / "a_file" / "sub", "Not a directory"
        return
    try:
        yield folder, "Read-only file system"
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "step_000000.pt"
    save_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def run_with_metrics(tmp_path_factory):
    run = tmp_path_factory.mktemp("plots") / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 10.0}) + "\n")
    return run


# --- output locations that cannot be written -------------------------------------------------------------------

def test_unwritable_outputs_are_one_line_before_work(unwritable, embedded_data, tiny_checkpoint, run_with_metrics):
    folder, reason = unwritable
    runs = {
        "train.py": ("train.py", *TINY, "--data", embedded_data, "--out", folder / "run"),
        "train.py --check": ("train.py", *TINY, "--data", embedded_data, "--out", folder / "run", "--check"),
        "data_prep.py": ("data_prep.py", "--source", "embedded", "--out", folder / "data", "--workers", "1"),
        "hellaswag_eval.py": ("hellaswag_eval.py", "--checkpoint", tiny_checkpoint, "--data", SAMPLE_HELLASWAG,
                              "--out", folder / "hellaswag.json"),
        "export_hf.py": ("export_hf.py", "--checkpoint", tiny_checkpoint, "--out", folder / "export"),
        "export_hf.py --from-hf": ("export_hf.py", "--from-hf", tiny_checkpoint.parent, "--out", folder / "c.pt"),
        "plot_metrics.py": ("plot_metrics.py", run_with_metrics, "--out", folder / "plots"),
        "bench.py": ("bench.py", "generate", "--new-tokens", "2", "--repeats", "1", "--block-size", "8",
                     "--out", folder / "bench.json"),
    }
    for name, proc in zip(runs, run_scripts(*runs.values())):
        line = assert_one_line_error(proc, reason, argparse=True)
        assert str(folder) in line, (name, line)
        assert "HellaSwag (" not in proc.stdout and "tokenizing" not in proc.stderr, name  # refused before the work


# --- a full disk or a file size limit ---------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["data_prep.py", "plot_metrics.py", "export_hf.py"])
def test_file_size_limit_elsewhere_is_one_line(script, tmp_path, run_with_metrics, tiny_checkpoint):
    args = {"data_prep.py": ["--source", "embedded", "--out", tmp_path / "data", "--workers", "1"],
            "plot_metrics.py": [run_with_metrics, "--out", tmp_path / "plots"],
            "export_hf.py": ["--checkpoint", tiny_checkpoint, "--out", tmp_path / "export"]}[script]
    proc = limited_run([script, *args], 20_000)
    assert_one_line_error(proc, "File too large", tmp_path, argparse=True)
    assert not (tmp_path / "data" / "manifest.json").exists()
    assert not [p for p in tmp_path.rglob(".*tmp*")], "a temporary file was left"


def test_atomic_write_names_the_path_and_its_cleanup_never_raises_twice(tmp_path):
    from cli import atomic_write
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError) as info:  # opening and removing the temporary file both fail
        with atomic_write(tmp_path / "a_file" / "out.json", "w") as f:
            f.write("{}")
    assert info.value.__context__ is None  # the cleanup's own failure does not chain a second error on it

    class DiskFull:  # a write() error names no file: atomic_write adds the path
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")
    with pytest.raises(OSError) as info:
        with atomic_write(tmp_path / "out.bin") as f:
            DiskFull(f).write(b"x")
    assert info.value.errno == 28 and info.value.filename == str(tmp_path / "out.bin")
    assert os.listdir(tmp_path) == ["a_file"]


# --- Ctrl-C -----------------------------------------------------------------------------------------------------

def test_ctrl_c_stops_data_prep_and_its_pool_with_one_line(tmp_path):
    corpus = tmp_path / "corpus.txt"
    # 40M tokens: tens of seconds of tokenizing, so the interrupt, sent as soon as the first train shard is written
    # (well under a second in), finds the pool busy however loaded the machine is
    corpus.write_text((REPO / "assets" / "corpus" / "tinyshakespeare.txt").read_text() * 120)
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:  # a file, not a pipe: every wait below has a deadline, a hung process included
        # SIGINT at its default, as in a terminal: a suite started in the background (`./run_tests.sh &`) passes on
        # SIGINT ignored, and Python then never turns it into KeyboardInterrupt
        proc = subprocess.Popen([sys.executable, "data_prep.py", "--source", "files", "--files", corpus, "--out",
                                 out, "--workers", "2", "--shard-tokens", "50000", "--val-tokens", "50000"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*/train_*.bin")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"data_prep.py ended before the interrupt:\n{log.read_text()}"
        os.killpg(proc.pid, signal.SIGINT)  # as the terminal does: the whole process group
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert status == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted (Ctrl-C)"
    assert not out.exists()  # the build folder, and --out made for it, removed: --out is left as it was
    deadline = time.monotonic() + 60
    while (alive := subprocess.run(["ps", "-o", "pid=", "-g", str(proc.pid)], capture_output=True,
                                   text=True).stdout.split()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"workers still running: {alive}"


def test_a_bug_while_handling_a_file_error_keeps_its_traceback():
    """Only the OS fault itself (or one a library re-raised from it) becomes one line: a different error raised
    while an OSError was being handled is a bug of its own and must not be hidden behind the file's message."""
    from cli import main_entry

    @main_entry
    def main():
        try:
            open("/nonexistent/settings.json")
        except FileNotFoundError:
            return {}["fallback"]  # a bug in the fallback
    with pytest.raises(KeyError):
        main()


# --- damaged manifests, metrics lines and input files -----------------------------------------------------------

BAD_MANIFEST_ENTRIES = [("file", 5), ("split", ["val"]), ("tokens", "100"), ("sha256", None)]


@pytest.fixture(scope="module")
def runs_on_bad_manifests(embedded_data, tmp_path_factory):
    """{repr((field, value)): the train.py run on a copy of the data whose first manifest entry has that value}, the
    runs side by side."""
    import shutil
    runs = []
    for field, value in BAD_MANIFEST_ENTRIES:
        data = tmp_path_factory.mktemp("bad_manifest") / "data"
        shutil.copytree(embedded_data, data)
        manifest = json.loads((data / "manifest.json").read_text())
        manifest["shards"][0][field] = value
        (data / "manifest.json").write_text(json.dumps(manifest))
        runs.append(("train.py", *TINY, "--data", data, "--out", data.parent / "run"))
    return dict(zip(map(repr, BAD_MANIFEST_ENTRIES), run_scripts(*runs)))


@pytest.mark.parametrize("field, value", BAD_MANIFEST_ENTRIES)
def test_manifest_entry_of_the_wrong_type_is_one_line(runs_on_bad_manifests, field, value):
    assert_one_line_error(runs_on_bad_manifests[repr((field, value))], "manifest.json", argparse=True)


def test_unusable_metrics_lines_are_skipped_with_their_numbers(tmp_path, capsys):
    from plot_metrics import read_metrics
    lines = [b'{"step": 0, "loss": 10.0}', b"[1, 2]", b'{"loss": 9.0}', b'{"step": "3", "loss": 9.0}',
             b'{"step": 1, "loss": "low"}', b'{"step": 2, "val_loss": 8.5}', b'\xff\xfe{"step": 4}', b'{"step": 5, "lo']
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines))
    assert read_metrics(tmp_path) == [{"step": 0, "loss": 10.0}, {"step": 2, "val_loss": 8.5}]
    warnings = capsys.readouterr().err.splitlines()
    assert [int(w.split(" line ")[1].split()[0]) for w in warnings] == [2, 3, 4, 5, 7, 8]
    proc = run_script("plot_metrics.py", tmp_path, "--out", tmp_path / "plots")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(list((tmp_path / "plots").glob("*.png"))) == 3


def test_resume_over_a_damaged_metrics_file_keeps_the_lines_it_cannot_read(run_at_step_4, embedded_data, tmp_path):
    """Lines that are no events (a hand edit, a line a crash tore) are kept, each on a line of its own, and said to
    be kept (they were deleted while the warning said 'skipped'); the events past the checkpoint are logged again."""
    out = copy_run(run_at_step_4, tmp_path / "run")
    unreadable = [b"[]", b'{"step": "x"}', b"\xff", b'{"step": 3, "lo']
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b"\n".join(unreadable))  # a hand edit, then a crash mid-line
    proc = train(embedded_data, out, "--resume", "--stop-at-step", "5")
    assert "4 line(s) of metrics.jsonl are no events train.py can read" in proc.stdout and "kept" in proc.stdout
    lines = (out / "metrics.jsonl").read_bytes().splitlines()
    assert [line for line in lines if line in unreadable] == unreadable
    events = [json.loads(line) for line in lines if line not in unreadable]
    assert [e["step"] for e in events if "loss" in e] == list(range(5))


@pytest.mark.parametrize("name, content, expected", [
    ("bad.txt", b"hello\n\nworld \xff\xfe bad\n", "bad.txt line 3: not UTF-8 at byte 13"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b"\n', "bad.jsonl line 2: not JSON"),
], ids=["invalid-utf8", "broken-json-line"])
@pytest.mark.parametrize("streaming", [False, True], ids=["prepared", "streamed"])
def test_undecodable_input_file_names_the_file_and_line(tmp_path, name, content, expected, streaming):
    (tmp_path / name).write_bytes(content)
    proc = run_script("data_prep.py", "--source", "files", "--files", tmp_path / name, "--out", tmp_path / "out",
                      "--workers", "1", "--cache-dir", tmp_path / "cache", *(["--streaming"] if streaming else []))
    assert_one_line_error(proc, expected, argparse=True)


# --- out-of-range arguments -------------------------------------------------------------------------------------

OUT_OF_RANGE = [
    ("generate.py", ["--temperature", "nan"], "--temperature"),
    ("generate.py", ["--temperature", "inf"], "--temperature"),
    ("generate.py", ["--seed", "100000000000000000000000"], "--seed"),
    ("generate.py", ["--seed", "-1"], "--seed"),
    ("bench.py", ["generate", "--block-size", "0"], "--block-size"),
    ("bench_data_prep.py", ["--corpus-mb", "nan"], "--corpus-mb"),
    ("train.py", ["--max-lr", "inf"], "--max-lr inf: must be a finite number"),
    ("train.py", ["--seed", "100000000000"], "--seed"),
]


@pytest.fixture(scope="module")
def runs_with_out_of_range_arguments(tiny_checkpoint, embedded_data, tmp_path_factory):
    """{(script, *args): its run}, the runs side by side."""
    def argv(script, args):
        out = tmp_path_factory.mktemp("out_of_range") / "run"
        extra = {"generate.py": ["--checkpoint", tiny_checkpoint, "--max-new-tokens", "2"],
                 "train.py": [*TINY, "--data", embedded_data, "--out", out], "bench.py": [],
                 "bench_data_prep.py": []}[script]
        return (script, *extra, *args)
    runs = run_scripts(*[argv(script, args) for script, args, _ in OUT_OF_RANGE])
    return {(script, *args): proc for (script, args, _), proc in zip(OUT_OF_RANGE, runs)}


@pytest.mark.parametrize("script, args, needle", OUT_OF_RANGE)
def test_non_finite_and_out_of_range_arguments_are_one_line(runs_with_out_of_range_arguments, script, args, needle):
    assert_one_line_error(runs_with_out_of_range_arguments[(script, *args)], needle, argparse=True)


# --- every train.py flag fed a bad value: refused before the first optimizer step -------------------------------
# The cases are generated from TrainConfig's fields: a value of the wrong type for each int and float field (and NaN
# and inf for each float), plus the bad values of each field's own rules below. A field that is in neither table
# fails test_every_train_flag_has_bad_values, so a new flag is covered when it is added.

BAD_VALUES = {  # field: [(the flag's arguments, what the error line names when not the flag itself)]
    "model": [("nope", None)],
    "data": [("{missing}", "{missing}"), ("", None)],  # "": read as the current folder
    "out": [("{file}", None)],
    "total_batch_tokens": [("0", None), ("100", None)],  # 100: not a multiple of --seq-len 32
    "micro_batch": [("0", None), ("x", None), ("3", None)],  # 3 does not divide the 8 sequences per step
    "seq_len": [("0", None), ("100000", None)],
    "max_steps": [("0", None)],
    "max_lr": [("0", None)],
    "min_lr": [("-1", None), ("1", None)],  # 1: above --max-lr
    "warmup_steps": [("-1", None)],
    "weight_decay": [("-0.1", None)],
    "beta1": [("1", None)],
    "beta2": [("-0.5", None)],
    "eps": [("0", None)],
    "grad_clip": [("0", None)],
    "attn_dropout": [("1", None)],
    "ffn_dropout": [("-0.1", None)],
    "pad_vocab_to": [("0", None)],
    "attn_backend": [("nope", None), ("cudnn", None)],  # cudnn: a CUDA kernel, and these runs are on the CPU
    "loss_chunk_rows": [("-1", None)],
    "fp8": [("", None)],  # needs a CUDA GPU
    "fsdp": [("", None)],  # needs torchrun
    "peak_flops": [("-1", None)],
    "log_every": [("0", None)],
    "eval_every": [("-1", None)],
    "val_tokens": [("-1", None)],
    "final_val_tokens": [("-1", None)],
    "hellaswag_every": [("-1", None)],
    "hellaswag_data": [("{missing}", None), ("{not_hellaswag}", "{not_hellaswag}"),  # evaluated at the last step
                       ("{empty}", "is a folder")],
    "hellaswag_limit": [("-1", None)],
    "sample_every": [("-1", None)],
    "sample_prompts": [(["hello", ""], None)],  # an empty prompt, sampled at the last step
    "sample_tokens": [("0", None), (str(10 ** 12), None)],  # 10**12: its token ids alone outgrow any memory
    "sample_temperature": [("-1", None), ("1e-45", None)],  # 1e-45: logits / temperature overflow (NaN)
    "sample_top_k": [("-1", None)],
    "ckpt_every": [("-1", None)],
    "keep_checkpoints": [("-1", None)],
    "tracker": [("nope", None)],
    "seed": [("-1", None), ("4294967296", None)],
    "device": [("tpu", None)],
    "stop_at_step": [("-1", None)],
    "resume": [("", "--allow-fresh-start")],  # no checkpoint to resume
    "allow_fresh_start": [("", None)],  # without --resume
    "allow_token_batch_change": [("", None)],  # without --resume
    "init_from": [("{missing}", "{missing}"), (["{file}", "--resume"], None), ("{empty}", "no checkpoint in"),
                  ("{file}", "is corrupt or truncated"), ("{foreign}", "not a checkpoint of this repo"),
                  ("{cut}", "is corrupt or truncated"), ("{damaged_run}", "every checkpoint in"),
                  ("{run_checkpoints}", "is the checkpoint folder of the run directory")],
}
ANY_VALUE_WORKS = {  # field: why no value of it is wrong
    "compile": "on or off, on every device", "autocast": "on or off (used on CUDA only)",
    "activation_checkpointing": "on or off", "verify_data": "on or off",
    "wandb_project": "any name", "wandb_run_name": "any name",
}
# Values that are right for a fresh run only: with --resume they are fine
FRESH_RUN_ONLY = {"resume", "allow_fresh_start", "allow_token_batch_change", "init_from", "data"}


def bad_flag_cases() -> list[tuple[str, list[str], str | None]]:
    """(field, its flag and bad value as arguments, what the error names or None: the flag) for every field."""
    import dataclasses
    import typing

    import config
    hints = typing.get_type_hints(config.TrainConfig)
    cases = []
    for field in dataclasses.fields(config.TrainConfig):
        flag, kind = "--" + field.name.replace("_", "-"), config._flag_type(hints[field.name])
        wrong_type = {int: ["1.5"], float: ["nan", "inf", "x"]}.get(kind, [])
        for value, needle in [(v, None) for v in wrong_type] + BAD_VALUES.get(field.name, []):
            values = value if isinstance(value, list) else [value] if value else []
            cases.append((field.name, [flag, *values], needle))
    return cases


def test_every_train_flag_has_bad_values():
    import dataclasses

    import train
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert not fields - set(BAD_VALUES) - set(ANY_VALUE_WORKS), "give these new fields bad values in BAD_VALUES"
    assert not (set(BAD_VALUES) | set(ANY_VALUE_WORKS)) - fields, "fields that are gone"


class ReachedStep1(Exception):
    """Raised in place of the first optimizer step: the run accepted its flags."""


def train_until_step_1(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    """train.main(argv) in this process, stopped at its first optimizer step: (exit status, stderr). A run that
    gets there fails the test: its flags were accepted."""
    import train

    def first_step(self):
        raise ReachedStep1(" ".join(argv))
    monkeypatch.setattr(train.Trainer, "train_step", first_step)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """{placeholder: path} for the cases: a missing path, a plain file, a file that is not HellaSwag's jsonl, an
    empty folder, and what --init-from cannot start from: a torch file of another program, a checkpoint cut short, a
    run directory whose only checkpoint is damaged, a run's checkpoints/ folder given for the run."""
    import torch
    folder = tmp_path_factory.mktemp("bad_inputs")
    (folder / "a_file").write_text("not a folder, not a checkpoint\n")
    (folder / "not_hellaswag.jsonl").write_text('{"ctx": "only a context"}\n')
    (folder / "empty").mkdir()
    lines = (REPO / "assets/hellaswag/hellaswag_val_head10.jsonl").read_text().splitlines()[:3]
    long = json.loads(lines[1])
    long["endings"][2] = "and on " * 200  # 401 tokens: past the debug model's context of 128
    (folder / "long_ending.jsonl").write_text("\n".join([lines[0], json.dumps(long), lines[2]]) + "\n")
    torch.save({"weights": torch.ones(2)}, folder / "foreign.pt")
    save_tiny_checkpoint(folder / "cut.pt")
    (folder / "cut.pt").write_bytes((folder / "cut.pt").read_bytes()[:(folder / "cut.pt").stat().st_size // 2])
    (folder / "damaged_run" / "checkpoints").mkdir(parents=True)
    (folder / "damaged_run" / "checkpoints" / "step_000002.pt").write_text("not a checkpoint\n")
    save_tiny_checkpoint(folder / "run" / "checkpoints" / "step_000002.pt")
    flipped = folder / "flipped_run" / "checkpoints" / "step_000002.pt"  # a byte inverted inside a tensor
    save_tiny_checkpoint(flipped)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    return {"{missing}": str(folder / "missing"), "{file}": str(folder / "a_file"),
            "{not_hellaswag}": str(folder / "not_hellaswag.jsonl"), "{empty}": str(folder / "empty"),
            "{foreign}": str(folder / "foreign.pt"), "{cut}": str(folder / "cut.pt"),
            "{damaged_run}": str(folder / "damaged_run"), "{run_checkpoints}": str(folder / "run" / "checkpoints"),
            "{other_model}": str(folder / "run"), "{flipped_run}": str(folder / "flipped_run"), "{long_ending}": str(folder / "long_ending.jsonl")}  # (its checkpoint: tiny_config's model, not the debug preset's)


def fill(args, paths: dict) -> list[str]:
    return [paths.get(a, a) for a in args]


@pytest.mark.parametrize("field, args, needle", bad_flag_cases(), ids=lambda v: v if isinstance(v, str) else None)
def test_bad_train_flag_fails_before_step_1_in_one_line(field, args, needle, bad_inputs, embedded_data, tmp_path,
                                                         monkeypatch, capsys):
    """Also: --check (what the e2e script runs before torchrun) refuses it, except what only the launch shows (no
    checkpoint to resume, --fsdp outside torchrun)."""
    out = tmp_path / "run"
    argv = [*TINY, "--data", str(embedded_data), "--out", str(out), *fill(args, bad_inputs)]
    status, err = train_until_step_1(monkeypatch, capsys, argv)
    lines = err.strip().splitlines()
    assert status == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") or ": error: " in lines[-1], err  # ours, or argparse's after its usage
    assert (fill([needle], bad_inputs)[0] if needle else args[0]) in lines[-1], lines[-1]
    assert not [p for p in (out / "checkpoints").glob("*")] if out.is_dir() else True
    events = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""
    assert '"loss"' not in events
    if field not in ("resume", "fsdp"):
        import train
        with pytest.raises(SystemExit) as checked:
            train.main([*argv, "--check", "2"])
        assert checked.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_bad_flags_on_resume_leave_the_run_and_data_byte_identical(run_at_step_4, embedded_data, bad_inputs,
                                                                   tmp_path, monkeypatch, capsys):
    """Every bad value that is bad for a resume too, given to `--resume` of a run with checkpoints: refused, and
    every file of the run and of the data set keeps its sha256."""
    import hashlib
    out = copy_run(run_at_step_4, tmp_path / "run")

    def hashes():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for folder in (out, embedded_data)
                for p in sorted(folder.rglob("*")) if p.is_file()}
    before = hashes()
    for field, args, _ in bad_flag_cases():
        if field in FRESH_RUN_ONLY:
            continue
        argv = [*TINY, "--data", str(embedded_data), "--out", str(out), "--resume", *fill(args, bad_inputs)]
        status, err = train_until_step_1(monkeypatch, capsys, argv)
        assert status == 2 and "Traceback" not in err, (args, err)
    assert hashes() == before


def test_flags_used_only_at_the_last_step_are_refused_before_anything_is_written(embedded_data, bad_inputs,
                                                                                 tmp_path):
    """A mistyped --hellaswag-data, an empty --sample-prompts entry and --sample-temperature 1e-45 used to fail after
    the whole run had trained: as real runs, each is one line and the run directory is never made."""
    cases = [(["--hellaswag-data", bad_inputs["{missing}"]], "--hellaswag-data"),
             (["--sample-prompts", "hello", ""], "--sample-prompts"),
             (["--sample-temperature", "1e-45"], "--sample-temperature 1e-45")]
    outs = [tmp_path / f"run{i}" for i in range(len(cases))]
    runs = run_scripts(*[("train.py", *TINY, "--data", embedded_data, "--out", out, *args)
                         for out, (args, _) in zip(outs, cases)])
    for out, proc, (_, needle) in zip(outs, runs, cases):
        assert_one_line_error(proc, needle, status=2, argparse=True)
        assert not out.exists()


# What check_run finds, one kind per flag (several for some): (its arguments, what the line must hold). Every case
# below is some of them at once: all named in one line, before the run directory is made.
LONG_PROMPT = "a long prompt " * 220  # ~3 KB, 661 tokens: past the debug model's context of 128
RUN_PROBLEMS = {
    "tracker": [(["--tracker", "typo"], ["--tracker 'typo': unknown typo"]),
                (["--tracker", "wandb"], ["--tracker wandb needs the wandb package"])],  # (imports as missing here)
    "data": [(["--data", "{missing}"], ["--data '{missing}'", "data_prep.py"])],
    "init_from": [(["--init-from", "{empty}"], ["--init-from '{empty}': no checkpoint in {empty}/checkpoints"]),
                  (["--init-from", "{file}"], ["--init-from '{file}'", "{file} is corrupt or truncated"]),
                  (["--init-from", "{foreign}"], ["--init-from '{foreign}'", "not a checkpoint of this repo"]),
                  (["--init-from", "{cut}"], ["--init-from '{cut}'", "{cut} is corrupt or truncated"]),
                  (["--init-from", "{damaged_run}"], ["every checkpoint in {damaged_run}/checkpoints is corrupt (",
                                                     "{damaged_run}/checkpoints/step_000002.pt is corrupt or truncated"]),
                  (["--init-from", "{run_checkpoints}"], ["no checkpoint in {run_checkpoints}: it is the checkpoint "
                                                         "folder of the run directory"]),
                  (["--init-from", "{other_model}"], ["--init-from '{other_model}'", "different model config"]),
                  (["--init-from", "{flipped_run}"], ["every checkpoint in {flipped_run}/checkpoints is corrupt"])],
    "resume": [(["--resume"], ["--resume: no checkpoint in", "--allow-fresh-start"])],
    "hellaswag_data": [(["--hellaswag-data", "{empty}"], ["--hellaswag-data '{empty}': is a folder", ".jsonl file"]),
                       (["--hellaswag-data", "{long_ending}"], ["{long_ending}:2: ending 2 has 401 tokens"])],
    "sample_prompts": [(["--sample-prompts", "hello", LONG_PROMPT],
                        ["--sample-prompts, entry 2 of 2", f"{LONG_PROMPT[:30]!r}...", "661 tokens"])],
    "max_lr": [(["--max-lr", "0"], ["--max-lr 0.0: must be > 0"])],
}


def run_problem_cases() -> list[list[tuple[list[str], list[str]]]]:
    """Each problem alone; every pair of flags; every flag at once (the kinds of a flag taking turns)."""
    import itertools
    alone = [[kind] for kinds in RUN_PROBLEMS.values() for kind in kinds]
    pairs = [[RUN_PROBLEMS[a][i % len(RUN_PROBLEMS[a])], RUN_PROBLEMS[b][i % len(RUN_PROBLEMS[b])]]
             for i, (a, b) in enumerate(itertools.combinations(RUN_PROBLEMS, 2))]
    every = [[kinds[i % len(kinds)] for kinds in RUN_PROBLEMS.values()] for i in range(6)]
    return alone + pairs + every


@pytest.mark.parametrize("problems", run_problem_cases(),
                         ids=lambda ps: " ".join("LONG" if a == LONG_PROMPT else a for args, _ in ps for a in args))
def test_every_problem_a_run_can_see_up_front_is_in_one_line_and_nothing_is_written(problems, bad_inputs,
                                                                                    embedded_data, tmp_path,
                                                                                    monkeypatch, capsys):
    """An --init-from folder without a checkpoint was found when loaded, after the run directory was made (it was
    left holding an empty checkpoints/ and train.log), and beside a bad --tracker only the tracker was named; a
    --hellaswag-data folder was 'no such file'; an over-long --sample-prompts entry was echoed whole (~3 KB)."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as where it is not installed
    out = tmp_path / "run"
    args = [arg for arguments, _ in problems for arg in fill(arguments, bad_inputs)]
    status, err = train_until_step_1(monkeypatch, capsys, [*TINY, "--data", str(embedded_data), "--out", str(out),
                                                           *args])
    line = assert_one_line_error(subprocess.CompletedProcess(args, status, "", err), status=2, alone=True)
    for _, needles in problems:
        for needle in needles:
            for placeholder, path in bad_inputs.items():
                needle = needle.replace(placeholder, path)
            assert needle in line, (needle, line)
    assert LONG_PROMPT not in line and len(line) < 2500, line  # (the prompt alone is 3,080 characters)
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [(["--micro-batch", "3"], "--micro-batch 3 does not divide the 8 sequences"),
                                          (["--micro-batch", "3", "--resume"], "--resume: no checkpoint in")])
def test_a_run_whose_batch_does_not_split_or_that_has_nothing_to_resume_writes_nothing(args, needle, embedded_data,
                                                                                      tmp_path, monkeypatch, capsys):
    """Both were found after the run directory was made (an empty checkpoints/ and train.log were left); the split
    of the batch is judged once the values it reads hold, and then named beside any other problem (test_train)."""
    out = tmp_path / "run"
    status, err = train_until_step_1(monkeypatch, capsys, [*TINY, "--data", str(embedded_data), "--out", str(out),
                                                           *args])
    assert_one_line_error(subprocess.CompletedProcess(args, status, "", err), needle, status=2, alone=True)
    assert not out.exists()


@pytest.mark.parametrize("problem", ["bad flag", "unwritable --out", "--out in use"])
def test_a_user_error_under_torchrun_is_printed_once(problem, embedded_data, tmp_path, unwritable):
    """Every rank meets the problem; rank 0 prints it, rank 1 exits with the same status quietly (no traceback of a
    worker; torchrun's own report of the failed workers follows). An --out no file can be written in was found by
    rank 0 alone, when it made the run folder, and rank 1 died at the next collective with a gloo traceback. An
    --out another run holds (rank 0 takes its lock) was trained into by both runs."""
    folder, reason = unwritable
    out = folder / "run" if problem == "unwritable --out" else tmp_path / "run"
    flag = ["--sample-temperature", "1e-45"] if problem == "bad flag" else []
    if problem == "--out in use":
        out.mkdir()
    holder = hold_run_dir(out) if problem == "--out in use" else contextlib.nullcontext()
    with holder:
        proc = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                          "train.py", *TINY, "--micro-batch", "2", "--device", "cpu", "--data", embedded_data,
                          "--out", out, *flag)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    expected = {"bad flag": "error: --sample-temperature 1e-45: must be 0 (greedy) or a finite number >= 0.0001",
                "unwritable --out": f"error: --out {out} is not writable: ",
                "--out in use": f"error: --out {out} is in use by another train.py run (pid {os.getpid()})"}[problem]
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr
    assert problem != "unwritable --out" or reason in errors[0], proc.stderr
    assert 'train.py", line' not in proc.stderr, proc.stderr  # (torchrun's own traceback follows)
    assert "exitcode  : 2" in proc.stderr, proc.stderr


def test_check_mode_writes_nothing_and_names_the_layout_problem(embedded_data, tmp_path, capsys):
    """train.py --check N: exit 0 for a configuration that starts on N processes, without making the run directory;
    a token batch that N processes cannot split is the same line the run would print."""
    import train
    argv = [*TINY, "--data", str(embedded_data), "--out", str(tmp_path / "run")]
    assert train.main([*argv, "--check"]) == 0
    assert train.main([*argv, "--check", "2"]) == 0
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_info:
        train.main([*argv, "--check", "3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --total-batch-tokens 256 is not a multiple of seq-len 32 x 3")


def test_elastic_resume_logs_the_saved_layout_with_its_own_token_batch(run_at_step_4, embedded_data, tmp_path):
    """The saved layout's accumulation steps come from the saved token batch, not the new one: 1 process x 4 x 2
    (256 tokens) -> 1 x 1 x 1 at --total-batch-tokens 32 (it used to log '0 accumulation steps', and a saved layout
    the new token batch does not divide was refused, blaming its process count)."""
    out = copy_run(run_at_step_4, tmp_path / "run")
    proc = train(embedded_data, out, "--resume", "--total-batch-tokens", "32", "--micro-batch", "1",
                 "--allow-token-batch-change", "--stop-at-step", "5")
    assert "layout changed: 1 processes x micro-batch 4 x 2 accumulation steps -> 1 x 1 x 1." in proc.stdout


# --- tools replace only what they wrote -------------------------------------------------------------------------

def sha256_tree(folder) -> dict:
    import hashlib
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_bench_data_prep_refuses_a_work_dir_it_did_not_make(run_at_step_4, tmp_path, capsys):
    """--work-dir at a run directory: refused in one line, every file byte-identical (it used to be removed)."""
    import bench_data_prep
    run = copy_run(run_at_step_4, tmp_path / "run")
    before = sha256_tree(run)
    with pytest.raises(SystemExit) as exit_info:
        bench_data_prep.main(["--corpus-mb", "0.1", "--work-dir", str(run)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --work-dir {run} holds files bench_data_prep.py did not write")
    assert sha256_tree(run) == before


def test_export_force_never_replaces_a_training_checkpoint(run_at_step_4, tmp_path, capsys):
    """`--from-hf EXPORT --out RUN/checkpoints/step_N.pt --force` is refused (it used to leave weights only, which
    --resume then refused); a file an earlier import wrote is replaced."""
    import export_hf
    run = copy_run(run_at_step_4, tmp_path / "run")
    export = export_hf.export_checkpoint(run, tmp_path / "export")
    target = run / "checkpoints" / "step_000004.pt"
    before = sha256_tree(run)
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main(["--from-hf", str(export), "--out", str(target), "--force"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: --out {target} is not a checkpoint export_hf.py --from-hf wrote")
    assert sha256_tree(run) == before
    imported = tmp_path / "imported.pt"
    export_hf.main(["--from-hf", str(export), "--out", str(imported)])
    export_hf.main(["--from-hf", str(export), "--out", str(imported), "--force"])
    assert imported.is_file()


# --- sampling values that are finite but extreme ------------------------------------------------------------------

def test_extreme_sampling_values_work_or_are_refused_up_front(tiny_checkpoint, capsys):
    """A top-k beyond the vocabulary and the lowest allowed temperature sample; a temperature below it (1e-45
    overflowed the logits into NaN probabilities) is one line; so is --num-samples beyond the machine's memory."""
    import generate
    from model import MIN_TEMPERATURE
    generate.main(["--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "3", "--num-samples", "2",
                   "--temperature", str(MIN_TEMPERATURE), "--top-k", str(10 ** 9), "--prompt", "Hello"])
    assert capsys.readouterr().out.count("=== prompt 1/1") == 2
    refused = [(["--temperature", "1e-45"], "error: --temperature 1e-45: must be 0 (greedy) or a finite number")]
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "0":  # else a huge allocation may succeed
        refused.append((["--num-samples", str(10 ** 12)], "error: out of memory ("))
    for args, start in refused:
        with pytest.raises(SystemExit) as exit_info:
            generate.main(["--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "3", "--prompt", "Hello", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(start), err
        assert "lower --max-new-tokens or --num-samples" in err[0] or "--temperature" in err[0]


@pytest.mark.parametrize("args, needle", [
    (["--resume", "--max-steps", "2"], "past this run's last step"),
    (["--resume", "--stop-at-step", "3"], "--stop-at-step above 4"),
    (["--resume", "--out", "{empty}"], "no checkpoint in"),
    (["--init-from", "{empty}"], "no checkpoint in"),
], ids=["resume-past-max-steps", "resume-past-stop-at-step", "resume-nothing", "init-from-no-checkpoint"])
def test_check_applies_the_runs_resume_and_init_from_rules_and_changes_nothing(args, needle, run_at_step_4,
                                                                              embedded_data, tmp_path, capsys):
    """--check (run before torchrun, whose --max-restarts cannot fix it) finds the checkpoint the run would resume
    or start from, as the run does: one line, status 2, and every file of the run keeps its sha256."""
    import hashlib

    import train
    out, empty = copy_run(run_at_step_4, tmp_path / "run"), tmp_path / "empty"
    empty.mkdir()

    def hashes():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for folder in (out, empty)
                for p in sorted(folder.rglob("*")) if p.is_file()}
    before = hashes()
    args = [a.replace("{empty}", str(empty)) for a in args]
    argv = [*TINY, "--data", str(embedded_data), "--out", str(out if "--init-from" not in args else tmp_path / "new"),
            *args, "--check", "2"]
    with pytest.raises(SystemExit) as checked:
        train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert checked.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert hashes() == before and not (tmp_path / "new").exists()
    ok = [*TINY, "--data", str(embedded_data), "--out", str(out), "--resume", "--check", "2"]
    train.main(ok)  # a resume the run would take: accepted
    assert "holds for 2 process" in capsys.readouterr().out and hashes() == before


# --- a run directory is one run's: locked, refused when another tool's, settings judged up front -------------------

def hold_run_dir(out: Path):
    """Take a run directory's lock (in this process) as a live train.py run holds it; close the returned file to
    release it."""
    import fcntl
    lock = open(out / "train.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return lock


def test_a_run_directory_in_use_is_refused_by_the_run_and_check_then_free_once_released(
        run_at_step_4, embedded_data, tmp_path, monkeypatch, capsys):
    """Two runs on one --out both trained (interleaved metrics, each overwriting the other's checkpoints). A second
    run, and --check, are one line naming the holder's pid, with every file unchanged; once the holder is gone (its
    process ended: the kernel drops the lock) the folder is free again, with no stale lock."""
    import train
    out = copy_run(run_at_step_4, tmp_path / "run")
    argv = [*TINY, "--data", str(embedded_data), "--out", str(out), "--resume"]
    lock = hold_run_dir(out)
    before = sha256_tree(out)
    needle = (f"error: --out {out} is in use by another train.py run (pid {os.getpid()}); wait for it or choose "
              "another --out")
    status, err = train_until_step_1(monkeypatch, capsys, argv)
    assert status == 2 and err.strip() == needle, err
    with pytest.raises(SystemExit) as checked:
        train.main([*argv, "--check", "2"])
    assert checked.value.code == 2 and capsys.readouterr().err.strip() == needle
    assert sha256_tree(out) == before
    lock.close()
    assert train.main([*argv, "--check", "2"]) == 0
    with pytest.raises(ReachedStep1):
        train.main(argv)
    with pytest.raises(ReachedStep1):  # the refused and the stopped run above released the folder
        train.main(argv)


@pytest.mark.parametrize("flags", [["--resume"], ["--resume", "--allow-fresh-start"], []],
                         ids=["resume", "resume or start", "start"])
def test_a_run_folder_in_use_before_its_first_checkpoint_is_named_in_use(flags, embedded_data, tmp_path,
                                                                           monkeypatch, capsys):
    """A run that has not checkpointed yet: a second train.py --resume was told 'no checkpoint; add
    --allow-fresh-start', and doing so met 'in use'. The folder in use is the problem named, up front, and nothing
    about the checkpoints that run is still to write."""
    import train
    out = tmp_path / "run"
    out.mkdir()
    lock = hold_run_dir(out)
    try:
        argv = [*TINY, "--data", str(embedded_data), "--out", str(out), *flags]
        for check in ([], ["--check"]):
            with pytest.raises(SystemExit) as exit_info:
                train.main([*argv, *check])
            line = assert_one_line_error(subprocess.CompletedProcess(argv, exit_info.value.code, "",
                                                                     capsys.readouterr().err), status=2, alone=True)
            assert line == (f"error: --out {out} is in use by another train.py run (pid {os.getpid()}); wait for it "
                            "or choose another --out"), line
        assert sorted(p.name for p in out.iterdir()) == ["train.lock"]
    finally:
        lock.close()


def fake_export(folder: Path) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (folder / "model.safetensors").write_bytes(b"weights")


def fake_data_set(folder: Path) -> None:
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    (folder / "train_000000.bin").write_bytes(b"tokens")


def run_dir_with_other_tools_files(run_at_step_4, folder: Path) -> None:
    """A run directory that plot_metrics.py, hellaswag_eval.py and the trackers wrote into too."""
    copy_run(run_at_step_4, folder)
    (folder / "plots").mkdir()
    (folder / "plots" / "loss.png").write_bytes(b"png")
    (folder / "hellaswag.json").write_text(json.dumps({"written_by": "hellaswag_eval.py", "acc": 0.25}))
    (folder / "events.out.tfevents.1.host").write_bytes(b"tb")
    (folder / "wandb").mkdir()
    (folder / "wandb_run_id.txt").write_text("abc123\n")


OUT_FOLDERS = {  # --out's state: (how to make it, the flags the run adds, what the error line says or None)
    "an export_hf.py output": (fake_export, [], "holds a config.json that train.py did not write"),
    "a data set": (fake_data_set, [], "holds files but none of a train.py run directory"),
    "a run directory with checkpoints, without --resume": (None, [], "already holds checkpoints (the newest "
                                                                     "step_000004.pt); add --resume"),
    "an empty folder": (lambda f: f.mkdir(), [], None),
    "a run directory other tools wrote into": (None, ["--resume"], None),
}


@pytest.mark.parametrize("mode", ["run", "--check"])
@pytest.mark.parametrize("state", OUT_FOLDERS)
def test_an_out_folder_train_py_did_not_make_is_refused_before_anything_is_written(
        state, mode, run_at_step_4, embedded_data, tmp_path, monkeypatch, capsys):
    """An export_hf.py output given as --out had its config.json overwritten; a rerun without --resume over a run's
    checkpoints was refused only after the shards were hashed and the model built (and --check passed it). Both
    are one line up front, every file unchanged; a new or empty folder and a run directory that plot_metrics.py,
    hellaswag_eval.py and the trackers also wrote into are accepted."""
    import train
    make, args, needle = OUT_FOLDERS[state]
    out = tmp_path / "out"
    (make or (lambda f: run_dir_with_other_tools_files(run_at_step_4, f)))(out)
    before = sha256_tree(out)
    argv = [*TINY, "--data", str(embedded_data), "--out", str(out), *args]
    if needle is None:
        if mode == "--check":
            assert train.main([*argv, "--check"]) == 0
        else:
            monkeypatch.setattr(train.Trainer, "train_step", lambda self: (_ for _ in ()).throw(ReachedStep1()))
            with pytest.raises(ReachedStep1):
                train.main(argv)
        return
    status, err = refused_start(mode, argv, monkeypatch, capsys)
    line = assert_one_line_error(subprocess.CompletedProcess(argv, status, "", err), f"--out {out}", needle,
                                 status=2, alone=True)
    assert "choose " in line
    assert sha256_tree(out) == before


def refused_start(mode: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """(exit status, stderr) of train.py `argv` refused at its start: by `--check`, or by the run ("run"), which
    must stop before its first step."""
    import train
    if mode == "--check":
        with pytest.raises(SystemExit) as checked:
            train.main([*argv, "--check"])
        return checked.value.code, capsys.readouterr().err
    return train_until_step_1(monkeypatch, capsys, argv)


RESUME_REFUSALS = {  # flags the checkpoint (TINY's, step 4) cannot continue under: what the error line names
    "--seq-len 64": (["--seq-len", "64"], "the saved loader state has seq_len 32 but this run has 64"),
    "--seed 1": (["--seed", "1"], "the saved loader state has seed 1337 but this run has 1"),
    "--total-batch-tokens 512": (["--total-batch-tokens", "512"], "was trained with --total-batch-tokens 256"),
    "--model lf_llm_269m": (["--model", "lf_llm_269m"], "is from a different model config"),
    "--resume without --out": (["--out", ""], "--resume True: needs --out"),
}


@pytest.mark.parametrize("mode", ["run", "--check"])
@pytest.mark.parametrize("case", RESUME_REFUSALS)
def test_a_resume_its_checkpoint_cannot_take_is_refused_before_anything_moves(
        case, mode, run_at_step_4, embedded_data, tmp_path, monkeypatch, capsys):
    """--check passed these; the run refused them after hashing the shards and building the model, and after it had
    moved a damaged newer checkpoint aside (logging its steps as 'trained again'). Without --out a resume made a new
    empty run folder at each attempt. Now one line, the damaged checkpoint and every other file as they were."""
    out = copy_run(run_at_step_4, tmp_path / "run")
    (out / "checkpoints" / "step_000006.pt").write_bytes(b"damaged")
    before = sha256_tree(out)
    args, needle = RESUME_REFUSALS[case]
    monkeypatch.chdir(tmp_path)  # (where a run without --out would make temp_data/runs)
    argv = [*TINY, "--data", str(embedded_data), "--out", str(out), "--resume", *args]
    status, err = refused_start(mode, argv, monkeypatch, capsys)
    assert_one_line_error(subprocess.CompletedProcess(argv, status, "", err), needle, status=2, alone=True)
    assert sha256_tree(out) == before
    assert not (tmp_path / "temp_data").exists()


@pytest.mark.parametrize("failing", ["eval_val_loss", "eval_hellaswag", "eval_samples"])
def test_a_final_evaluation_that_fails_loses_no_training_and_a_resume_runs_what_is_missing(
        failing, embedded_data, tmp_path, monkeypatch, capsys):
    """The last step saved its checkpoint after its evaluations: one failing there (out of memory) lost the whole
    run, and --resume trained it all again, failing the same way. Now the checkpoint is there, and a resume runs the
    last step's evaluations metrics.jsonl lacks (those logged before the failure are not repeated), then has nothing
    left to do (it said 'nothing to train' with the evaluations missing for good)."""
    import train
    out = tmp_path / "run"
    argv = [*TINY, "--data", str(embedded_data), "--out", str(out), "--max-steps", "2", "--eval-every", "0"]

    def out_of_memory(self, step, model):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 TB")
    monkeypatch.setattr(train.Trainer, failing, out_of_memory)
    with pytest.raises(SystemExit) as failed:
        train.main(argv)
    assert failed.value.code == 2 and "out of memory" in capsys.readouterr().err
    assert (out / "checkpoints" / "step_000002.pt").is_file()
    monkeypatch.undo()
    assert train.main([*argv, "--resume"]) == 0
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["step"] == 2 and "loss" not in json.loads(line)]
    assert sorted(key for event in final for key in event if key in ("val_loss", "hellaswag_acc", "samples")) == \
        ["hellaswag_acc", "samples", "val_loss"]  # each once
    with pytest.raises(SystemExit) as resumed:
        train.main([*argv, "--resume"])
    assert resumed.value.code == 0 and "nothing to train" in capsys.readouterr().out


def test_a_pair_rule_waits_for_both_values_and_a_device_error_names_the_value_given():
    """--max-lr nan also said '--min-lr ...: above --max-lr nan'; --device cuda:x was reported as '--device cuda'."""
    import math

    import devices
    from config import TrainConfig
    assert set(TrainConfig(max_lr=math.nan).problems()) == {"max_lr"}
    assert set(TrainConfig(min_lr=math.inf).problems()) == {"min_lr"}
    assert TrainConfig(min_lr=1.0, max_lr=0.5).problems()["min_lr"].endswith("above --max-lr 0.5; the schedule "
                                                                            "decays to it")
    if not devices.torch.cuda.is_available():
        with pytest.raises(devices.UserError, match="^--device cuda:x: no CUDA device"):
            devices.checked_device("cuda:x")


def test_the_e2e_summary_prints_what_a_run_without_validation_has(run_at_step_4, tmp_path, capsys, monkeypatch):
    """run_pre_training_e2e_debug.sh's summary stage raised StopIteration on a run without a val-loss event (a resume
    with TRAIN_ARGS --eval-every 0 of a run that never evaluated)."""
    script = (REPO / "run_pre_training_e2e_debug.sh").read_text()
    summary = script[script.index("<<'PY'\n") + len("<<'PY'\n"):script.index("\nPY\n")]
    out = copy_run(run_at_step_4, tmp_path / "run")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 10.0}) + "\n")
    monkeypatch.setattr(sys, "argv", ["-", str(out), "75"])
    exec(compile(summary, "summary", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    assert "val loss      : not evaluated" in printed and "step_000004.pt" in printed and "1 min 15 s" in printed


@pytest.mark.parametrize("cached", [False, True])
def test_check_fetches_the_official_hellaswag_split_the_last_step_scores(cached, embedded_data, tmp_path, monkeypatch,
                                                                          capsys):
    """--hellaswag-data '' (the official split, as the full preset has it): offline, the run trained to its last
    step, then failed there naming hellaswag_eval.py's --data. --check (run before torchrun) fetches it now, and
    offline says so naming train.py's flag; with the split cached it holds."""
    import hellaswag_eval
    import train
    cache = tmp_path / "hellaswag" / "hellaswag_val.jsonl"
    monkeypatch.setattr(hellaswag_eval, "CACHE_FILE", cache)
    monkeypatch.setattr(hellaswag_eval, "OFFICIAL_URL", "http://127.0.0.1:9/hellaswag_val.jsonl")  # nothing listens
    if cached:
        cache.parent.mkdir()
        cache.write_text(SAMPLE_HELLASWAG.read_text())
        monkeypatch.setattr(hellaswag_eval, "OFFICIAL_EXAMPLES", 10)
    argv = [*TINY, "--data", str(embedded_data), "--out", str(tmp_path / "run"), "--hellaswag-data", "", "--check"]
    if cached:
        assert train.main(argv) == 0
        return
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert_one_line_error(subprocess.CompletedProcess(argv, exit_info.value.code, "", capsys.readouterr().err),
                          "cannot download the HellaSwag validation set", "train.py --hellaswag-data", status=2,
                          alone=True)
    assert not (tmp_path / "run").exists() and not cache.parent.exists()
