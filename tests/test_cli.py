"""cli.py's shared pieces, in-process: the flag types, one error line from rank 0 only, the writable-folder probe, atomic_write's sync before the rename."""
import argparse
import errno
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from cli import UserError
from helpers import assert_one_line_error


def test_positive_int_and_finite_float_refuse_their_edges():
    assert cli.positive_int("1") == 1
    for text in ("0", "-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            cli.positive_int(text)
    assert cli.finite_float("1e3") == 1000.0 and cli.finite_float("-0.5") == -0.5
    for text in ("nan", "inf", "-inf", "1e999"):
        with pytest.raises(argparse.ArgumentTypeError, match="finite number"):
            cli.finite_float(text)


@pytest.mark.parametrize("local_rank, printed", [(None, True), ("0", True), ("1", False), ("3", False)])
def test_user_error_is_one_line_from_each_nodes_local_rank_0_only(monkeypatch, capsys, local_rank, printed):
    """Under torchrun every process of a node meets the same error: its local rank 0 says it, the others exit with
    the same status (per node: on a second node, global rank 2 is local rank 0 and checks that node's own files)."""
    monkeypatch.setenv("RANK", "2")  # the global rank plays no part
    waits = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)

    @cli.main_entry
    def main():
        raise UserError("the flag is wrong")
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: the flag is wrong\n" if printed else "")
    # a quiet process exits after a while: torchrun, stopping every worker once one has exited, took local rank 0
    # down before it printed (a flake of test_faults' torchrun case, 1 run in 10)
    assert waits == ([] if printed else [cli.QUIET_RANK_EXIT_DELAY_S]) and cli.QUIET_RANK_EXIT_DELAY_S >= 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_a_folder_that_takes_no_file_is_refused_before_work(tmp_path):
    # /proc exists but no file can be created in it, whoever runs the test (root too)
    with pytest.raises(UserError, match="--out /proc/self is not writable"):
        cli.ensure_writable_dir(Path("/proc/self"), "--out")
    assert cli.ensure_writable_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []  # the probe is gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_the_check_of_an_output_folder_makes_nothing(tmp_path):
    """check_writable_dir: the same refusals as ensure_writable_dir, but a missing folder is judged by its nearest
    existing parent and not made (a run that then stops on another problem leaves nothing behind)."""
    assert cli.check_writable_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="--out /proc/self/x is not writable"):
        cli.check_writable_dir(Path("/proc/self/x"), "--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"--out {tmp_path}/file/sub is not writable: {tmp_path}/file is not a fold"):
        cli.check_writable_dir(tmp_path / "file" / "sub", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_text_file_a_flag_names_is_read_as_lines_of_utf8(tmp_path):
    """A byte order mark and Windows line ends are not part of the text; only a newline ends a line (a form feed or
    U+2028 inside one does not); bytes that are not UTF-8 are named by line and byte."""
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffone\r\ntwo\x0c and\u2028 three\n".encode())
    assert cli.read_text_lines(path, "--prompts-file") == ["one", "two\x0c and\u2028 three"]
    path.write_bytes(b"\xef\xbb\xbfok\nno \xff here\n")
    with pytest.raises(UserError, match=f"--prompts-file {path} line 2: not UTF-8 at byte 9 "):
        cli.read_text_lines(path, "--prompts-file")


def test_atomic_write_syncs_every_byte_before_the_rename(tmp_path, monkeypatch):
    """The file is fsynced whole (Python's buffer flushed first), then renamed: after a crash the name holds the old
    file or all of the new one."""
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            synced.append((os.fstat(fd).st_size, (tmp_path / "out.bin").exists()))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    data = b"x" * 10_000 + b"tail"
    with cli.atomic_write(tmp_path / "out.bin") as f:
        for start in range(0, len(data), 1000):  # small writes: Python's buffer holds the last of them
            f.write(data[start:start + 1000])
    assert synced == [(len(data), False)]  # all bytes on disk, under the temporary name
    assert (tmp_path / "out.bin").read_bytes() == data and os.listdir(tmp_path) == ["out.bin"]


def no_space(path, mode="r"):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("what, expected", [
    ("missing", "{path}: No such file or directory [Errno 2]; check the path"),
    ("folder", "{path}: Is a directory [Errno 21]; it is a folder; give a file path"),
    ("full disk", "{path}: No space left on device [Errno 28]; free disk space or choose another location"),
])
def test_a_filesystem_fault_is_one_line_for_the_user_without_source_lines(what, expected, tmp_path, monkeypatch,
                                                                          capsys):
    """main_entry's line for an OSError raised in the repo's code: the path, what failed and what to do. It ended
    with '(in shards.py:87 (file_sha256))', a place in the source that tells the user nothing."""
    import shards
    path = tmp_path / "missing" if what == "missing" else tmp_path
    if what == "full disk":
        monkeypatch.setattr(shards, "open", no_space, raising=False)  # the builtin, as shards.py calls it

    @cli.main_entry
    def main():
        shards.file_sha256(path)  # raises inside shards.py, a module of the repo
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {expected.format(path=path)}\n"


# A bad value for a typed flag of every script with a parser (and each bench.py mode), plus an unknown flag: one line
# naming the flag, status 2, no usage block. All started at once (helpers.run_scripts).
BAD_FLAG_CASES = [
    ("train.py", "--config", "debug", "--check", "0"),
    ("train.py", "--config", "debug", "--check", "-1"),
    ("train.py", "--config", "debug", "--check", "abc"),
    ("train.py", "--max-steps", "abc"),
    ("hellaswag_eval.py", "--limit", "0"),
    ("hellaswag_eval.py", "--batch-size", "0"),
    ("bench.py", "gpu", "--deadline-s", "nan"),
    ("bench.py", "generate", "--new-tokens", "0"),
    ("bench.py", "nosuchmode"),
    ("bench_data_prep.py", "--corpus-mb", "nan"),
    ("memory_estimate.py", "--gpus", "abc"),
    ("generate.py", "--max-new-tokens", "abc"),
    ("generate.py", "--temperature", "abc"),
    ("data_prep.py", "--shard-tokens", "0"),
    ("data_prep.py", "--workers", "abc"),
    ("export_hf.py", "--checkpoint", "c", "--out", "x", "--no-such-flag"),
    ("export_hf.py", "--out", "x"),  # --checkpoint or --from-hf missing
    ("plot_metrics.py", "run", "--no-such-flag"),
]


def test_every_flag_value_that_does_not_convert_is_named_with_a_leftover_flag(capsys):
    """argparse stops at the first bad value; cli.Parser names them all, and an unknown flag in the same line."""
    parser = cli.Parser(prog="tool.py")
    parser.add_argument("--steps", type=cli.positive_int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--name")
    for argv, named in ((["--steps", "0", "--lr", "fast"], ["--steps: must be a positive integer, got 0",
                                                            "--lr: invalid float value: 'fast'"]),
                        (["--steps", "0", "--lr", "x", "--nope"], ["--steps", "--lr", "unrecognized arguments: --nope"]),
                        (["--lr", "x", "--nope", "1"], ["--lr", "unrecognized arguments: --nope 1"])):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert_one_line_error(subprocess.CompletedProcess(argv, exit_info.value.code, "", capsys.readouterr().err),
                              *named, "tool.py", "see tool.py --help", status=2, alone=True)
    ok = parser.parse_args(["--steps", "2", "--lr", "0.5"])
    assert (ok.steps, ok.lr, ok.name) == (2, 0.5, None)
    program = cli.Parser(prog="bench.py")  # a subcommand's parser: the same rule
    program.add_subparsers(dest="mode").add_parser("run").add_argument("--steps", type=cli.positive_int)
    with pytest.raises(SystemExit):
        program.parse_args(["run", "--steps", "0", "--nope"])
    assert_one_line_error(subprocess.CompletedProcess([], 2, "", capsys.readouterr().err), "bench.py run",
                          "--steps: must be a positive integer, got 0", "unrecognized arguments: --nope", alone=True)


@pytest.fixture(scope="module")
def bad_flag_runs():
    from helpers import run_scripts
    return dict(zip(BAD_FLAG_CASES, run_scripts(*BAD_FLAG_CASES, timeout=600)))


@pytest.mark.parametrize("case", BAD_FLAG_CASES, ids=" ".join)
def test_a_bad_flag_value_is_one_error_line_without_usage(case, bad_flag_runs):
    proc = bad_flag_runs[case]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert lines[0].startswith("error: ") and "usage:" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    flags = [a for a in case[1:] if a.startswith("--")]
    named = flags[-1] if flags and flags[-1] != "--out" else ("--checkpoint" if flags else case[-1])
    assert named in lines[0] and f"{case[0]}" in lines[0] and "--help" in lines[0], lines[0]


# --- an empty path ------------------------------------------------------------------------------------------------

PATH_DEST = re.compile(r"(^|_)(out|checkpoint|data|files|dir|file|root|run|hf)$")  # the flags that name a path
# (bench_gpu.py's flags are bench.py gpu's; train.py's path flags default to "", which means not given)
SCRIPTS_WITH_PATHS = ["bench", "bench_data_prep", "data_prep", "export_hf", "generate", "hellaswag_eval",
                      "memory_estimate", "plot_metrics"]


class Captured(Exception):
    pass


def parsers_of(script: str) -> list:
    """The cli.Parser objects of a script (a bench.py mode's own too), caught as the script parses its argv."""
    import importlib
    from unittest import mock
    module = importlib.import_module(script)
    entry = getattr(module, "parse_args", None) or module.main

    def capture(self, *args, **kwargs):
        raise Captured(self)
    with mock.patch.object(cli.Parser, "parse_known_args", capture), pytest.raises(Captured) as caught:
        entry([]) if entry is not module.main else module.main.__wrapped__([])
    parser = caught.value.args[0]
    modes = [a.choices.values() for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser, *(mode for group in modes for mode in group)]


def path_options():
    """(parser, action) of every flag that takes a path, but TrainConfig's (bench.py train shares train.py's)."""
    import dataclasses

    from config import TrainConfig
    train_flags = {field.name for field in dataclasses.fields(TrainConfig)}
    for script in SCRIPTS_WITH_PATHS:
        for parser in parsers_of(script):
            for action in parser._actions:
                mode = parser.prog.split()[-1] if script == "bench" and " " in parser.prog else ""
                if (PATH_DEST.search(action.dest) and action.nargs != 0
                        and not (mode == "train" and action.dest in train_flags and action.dest != "out")):
                    yield pytest.param(parser, action, id=" ".join(filter(None, [script, mode, action.dest])))


@pytest.mark.parametrize("parser, action", list(path_options()))
def test_an_empty_path_is_refused_naming_its_flag(parser, action, capsys):
    """--out '' (a shell variable never set) wrote nothing (hellaswag_eval.py), or read '.' as the path: the repo
    folder named by data_prep.py, an export read from 'checkpoints' (export_hf.py --checkpoint '')."""
    option = action.option_strings[0] if action.option_strings else None
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([option, ""] if option else [""])
    line = assert_one_line_error(subprocess.CompletedProcess([], exit_info.value.code, "", capsys.readouterr().err),
                                 status=2, alone=True)
    assert f"argument {option or action.dest}: an empty path; give a file or folder" in line, line
