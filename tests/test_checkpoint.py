"""Checkpoints: the fault matrix (every reader x every damage x both formats), pruning, setting aside, a sharded
save on a full disk, and a resume at or past the run's last step.

The matrix works on tiny checkpoints built once: a .pt file and a sharded folder (written by sharding.py in this
process, no process group), each with the training keys a resume needs. Each cell damages one file of a copy. A
reader of one checkpoint must fail with one line naming the damaged file (never torch's weights_only advice); a
reader of a run directory must fall back to the older good checkpoint and name what it skipped. Most cells call the
reader functions in this process; a few run the CLI readers for the 'no traceback' property."""
import dataclasses
import errno
import hashlib
import pickle
import random
import re
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import checkpoint
import export_hf
import sharding
import train
from cli import UserError
from conftest import run_script, run_scripts
from model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=101, block_size=16, n_layer=1, n_head=2, n_embd=16, ffn_hidden=32)
GOOD, DAMAGED = 2, 4  # a run directory holds a good checkpoint at step 2 and the damaged one at step 4


def training_state(step: int) -> tuple[GPT, torch.optim.Optimizer, dict]:
    model = GPT(CONFIG, seed=step)
    optimizer = model.configure_optimizer(1e-3, 0.1)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()  # AdamW moments to save
    extra = {"model_config": dataclasses.asdict(CONFIG),
             "train_config": {"total_batch_tokens": 64, "seq_len": 16}, "step": step, "tokens_seen": 0,
             "world_size": 1, "micro_batch": 1, "loader": {"window": 0}, "rng": [checkpoint.rng_state()]}
    return model, optimizer, extra


def write_checkpoint(run_dir: Path, step: int, sharded: bool) -> Path:
    model, optimizer, extra = training_state(step)
    path = checkpoint.checkpoint_path(run_dir, step, sharded)
    if sharded:
        sharding.save_sharded_checkpoint(path, model, optimizer, extra)
    else:
        checkpoint.save_checkpoint({**extra, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A run directory per format with good checkpoints at steps GOOD and DAMAGED (the cells damage a copy)."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}
    for kind, sharded in (("pt", False), ("sharded", True)):
        for step in (GOOD, DAMAGED):
            write_checkpoint(root / kind, step, sharded)
        made[kind] = root / kind
    return made


# --- the damage kinds: each rewrites (or removes) one file ----------------------------------------------------

def truncated(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


def zero_bytes(file: Path) -> None:
    file.write_bytes(b"")


def garbled(file: Path) -> None:
    """Its middle half overwritten with random bytes: the size is kept."""
    data, rng = bytearray(file.read_bytes()), random.Random(file.name)
    for i in range(len(data) // 4, 3 * len(data) // 4):
        data[i] = rng.randrange(256)
    file.write_bytes(bytes(data))


def missing(file: Path) -> None:
    file.unlink()


def foreign_pickle(file: Path) -> None:
    """Another program's pickle under the name: a plain pickle of an object no checkpoint holds. (A torch.save file
    whose objects this torch refuses is not damage: test_faults pins that a resume stops at it.)"""
    file.write_bytes(pickle.dumps(Namespace(weights=[1.0, 2.0])))


DAMAGES = [truncated, zero_bytes, garbled, missing, foreign_pickle]
# (format, the file of a checkpoint to damage: "" = the .pt file itself)
TARGETS = [("pt", ""), ("sharded", checkpoint.METADATA_FILE), ("sharded", "__0_0.distcp"),
           ("sharded", checkpoint.STATE_FILE)]


def damaged_copy(runs, kind: str, name: str, damage, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(run directory, its damaged checkpoint at step DAMAGED, the damaged file) in a copy of the run of `kind`."""
    run = shutil.copytree(runs[kind], tmp_path / kind)
    ckpt = checkpoint.checkpoint_path(run, DAMAGED, sharded=kind == "sharded")
    file = ckpt / name if name else ckpt
    damage(file)
    return run, ckpt, file


def assert_names_file(message: str, file: Path) -> None:
    """One line naming the damaged file (by its path, or by its name next to its folder's path), without torch's
    advice to load unsafely."""
    assert "\n" not in message and "weights_only=False" not in message, message
    assert str(file) in message or (str(file.parent) in message and file.name in message), message


# --- readers of one checkpoint: generate.py and hellaswag_eval.py (checkpoint.load_model),
# export_hf.py (export_checkpoint), train.py --init-from (checkpoint.load_checkpoint) -------------------------------

SINGLE_READERS = {
    "load_model": lambda path, tmp_path: checkpoint.load_model(path),
    "export_hf": lambda path, tmp_path: export_hf.export_checkpoint(path, tmp_path / "export"),
    "init_from": lambda path, tmp_path: checkpoint.load_checkpoint(path),
}


@pytest.mark.parametrize("kind, name", TARGETS, ids=[f"{k}:{n or 'file'}" for k, n in TARGETS])
@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__ for d in DAMAGES])
@pytest.mark.parametrize("reader", SINGLE_READERS)
def test_a_damaged_checkpoint_is_one_line_naming_its_file(reader, damage, kind, name, runs, tmp_path):
    run, ckpt, file = damaged_copy(runs, kind, name, damage, tmp_path)
    with pytest.raises(UserError) as error:
        SINGLE_READERS[reader](ckpt, tmp_path)
    assert_names_file(str(error.value), file)
    assert not (tmp_path / "export").exists()


# --- readers of a run directory: --resume (one process, DDP, FSDP: checkpoint.newest_valid_checkpoint, weights on
# disk) and the scripts given a run directory (checkpoint.load_checkpoint) -----------------------------------------

def resume_reader(run: Path, capsys) -> tuple[Path, str]:
    state, found, damaged = checkpoint.newest_valid_checkpoint(run, weights=False)
    assert state["step"] == GOOD
    return found, " ".join(damaged.values())


def scripts_reader(run: Path, capsys) -> tuple[Path, str]:
    state, found = checkpoint.load_checkpoint(run)
    assert state["step"] == GOOD and "model" in state
    return found, capsys.readouterr().err


@pytest.mark.parametrize("kind, name", TARGETS, ids=[f"{k}:{n or 'file'}" for k, n in TARGETS])
@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__ for d in DAMAGES])
@pytest.mark.parametrize("reader", [resume_reader, scripts_reader], ids=["resume", "scripts"])
def test_a_run_directory_falls_back_past_a_damaged_checkpoint_naming_it(reader, damage, kind, name, runs, tmp_path,
                                                                       capsys):
    run, ckpt, file = damaged_copy(runs, kind, name, damage, tmp_path)
    found, warning = reader(run, capsys)
    assert found == checkpoint.checkpoint_path(run, GOOD, sharded=kind == "sharded")
    if ckpt.exists():  # (a removed .pt file is no checkpoint: nothing to skip)
        assert_names_file(warning.strip().splitlines()[-1] if warning.strip() else "", file)


# --- the schema: a valid torch file whose entries are not what the saving code writes is damaged too -------------

# Every entry any saving code writes (train.Trainer.state_dict, save_checkpoint's format mark, export_hf --from-hf's
# imported_from) x wrong values for it. Generated from those keys: a new entry fails test_every_entry_has_a_rule
# until checkpoint.STATE_RULES and BAD_VALUES have it.
SAVED_KEYS = ("format", *train.Trainer.STATE_KEYS, "imported_from")
BAD_VALUES = {
    "format": [None, "lf-llm-checkpoint-v0"],
    "model_config": ["debug", None, {**dataclasses.asdict(CONFIG), "n_layer": "1"},
                     {**dataclasses.asdict(CONFIG), "bogus": 1}],
    "model": ["x", None, {"w": [1.0]}],
    "optimizer": ["x", None, {}],
    "train_config": [None, "x", {}],
    "step": ["4", None, [4], 4.5, -3, True],
    "tokens_seen": ["0", -1],
    "world_size": ["1", 0, True],
    "micro_batch": ["1", 0],
    "loader": ["x", None, []],
    "rng": [[], None, [{}], "rng_of_two"],  # rng_of_two: two good RNG states for world_size 1
    "imported_from": [None, 4],
    "unknown": [1],  # an entry no saving code writes
}
SCHEMA_CASES = [(kind, key, i) for kind in ("pt", "sharded") for key in BAD_VALUES
                for i in range(len(BAD_VALUES[key]))]


def test_every_entry_has_a_rule_and_bad_values(runs):
    saved = torch.load(checkpoint.checkpoint_path(runs["pt"], GOOD), weights_only=True)
    assert set(saved) <= set(SAVED_KEYS) and set(SAVED_KEYS) == set(checkpoint.STATE_RULES)
    assert set(BAD_VALUES) == set(SAVED_KEYS) | {"unknown"}
    assert checkpoint.state_problems(saved) == []


def crafted_copy(runs, kind: str, key: str, value, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(run directory, its checkpoint at step DAMAGED, the file changed): the file torch.load-ed, `key` set to
    `value`, torch.save-d again (a valid torch file)."""
    def craft(file: Path) -> None:
        state = torch.load(file, weights_only=True)
        state[key] = state["rng"] * 2 if value == "rng_of_two" else value
        torch.save(state, file)
    return damaged_copy(runs, kind, checkpoint.STATE_FILE if kind == "sharded" else "", craft, tmp_path)


@pytest.mark.parametrize("kind, key, i", SCHEMA_CASES, ids=[f"{k}:{key}:{BAD_VALUES[key][i]!r:.20}"
                                                           for k, key, i in SCHEMA_CASES])
def test_a_checkpoint_breaking_the_schema_is_damaged_for_every_reader(kind, key, i, runs, tmp_path, capsys):
    """Each reader of one checkpoint: one line naming the file and the entry. Each reader of the run directory:
    falls back to the good checkpoint, naming the file."""
    run, ckpt, file = crafted_copy(runs, kind, key, BAD_VALUES[key][i], tmp_path)
    for reader in SINGLE_READERS.values():
        with pytest.raises(checkpoint.CheckpointDamaged) as error:
            reader(ckpt, tmp_path)
        assert_names_file(str(error.value), file)
        assert repr(key) in str(error.value) if key == "unknown" else key in str(error.value) or (
            key == "format" and "not a checkpoint of this repo" in str(error.value)), str(error.value)
        assert not (tmp_path / "export").exists()
    for reader in (resume_reader, scripts_reader):
        found, warning = reader(run, capsys)
        assert found == checkpoint.checkpoint_path(run, GOOD, sharded=kind == "sharded")
        assert_names_file(warning.strip().splitlines()[-1], file)


def test_a_step_of_the_wrong_type_is_named_with_its_type(runs, tmp_path):
    run, ckpt, file = crafted_copy(runs, "pt", "step", "4", tmp_path)
    with pytest.raises(checkpoint.CheckpointDamaged, match=r"holds step '4' \(a str\), not a step count"):
        checkpoint.load_checkpoint(ckpt)


# --- a symbolic link under a checkpoint name that does not resolve: damaged --------------------------------------

def dangling(link: Path) -> None:
    link.symlink_to(link.parent / "gone.pt")


def loop(link: Path) -> None:
    link.symlink_to(link.name)  # itself


@pytest.mark.parametrize("sharded", [False, True], ids=["pt", "folder"])
@pytest.mark.parametrize("make", [dangling, loop])
def test_a_symlink_that_does_not_resolve_is_a_damaged_checkpoint(make, sharded, runs, tmp_path, capsys):
    """The newest name (step 6) a link to nothing: a reader of it is one line naming it, a run directory falls back
    to step 4 naming it."""
    kind = "sharded" if sharded else "pt"
    run = shutil.copytree(runs[kind], tmp_path / kind)
    link = checkpoint.checkpoint_path(run, 6, sharded)
    make(link)
    for reader in SINGLE_READERS.values():
        with pytest.raises(checkpoint.CheckpointDamaged) as error:
            reader(link, tmp_path)
        assert_names_file(str(error.value), link)
        assert "symbolic link" in str(error.value)
    state, found, damaged = checkpoint.newest_valid_checkpoint(run, weights=False)
    assert found == checkpoint.checkpoint_path(run, DAMAGED, sharded) and list(damaged) == [link]
    state, found = checkpoint.load_checkpoint(run)
    assert found == checkpoint.checkpoint_path(run, DAMAGED, sharded)
    assert_names_file(capsys.readouterr().err.strip().splitlines()[-1], link)


# --- the CLI readers: one line, no traceback ------------------------------------------------------------------

HELLASWAG_SAMPLE = "assets/hellaswag/hellaswag_val_head10.jsonl"


def test_cli_readers_of_a_garbled_shard_file_print_one_line(runs, tmp_path):
    run, ckpt, file = damaged_copy(runs, "sharded", "__0_0.distcp", garbled, tmp_path)
    procs = run_scripts(("generate.py", "--checkpoint", ckpt, "--prompt", "a", "--max-new-tokens", "1"),
                        ("hellaswag_eval.py", "--checkpoint", ckpt, "--data", HELLASWAG_SAMPLE),
                        ("export_hf.py", "--checkpoint", ckpt, "--out", tmp_path / "export"))
    for proc in procs:
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert_names_file(lines[0], file)


# --- pruning, setting aside -----------------------------------------------------------------------------------

def fake_checkpoints(run: Path, steps) -> list[Path]:
    """Files and folders under checkpoint names (pruning and setting aside never read them)."""
    paths = []
    for step in steps:
        path = checkpoint.checkpoint_path(run, step, sharded=step % 2 == 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        if step % 2:
            path.mkdir()
            (path / "__0_0.distcp").write_bytes(b"x")
        else:
            path.write_bytes(b"x")
        paths.append(path)
    return paths


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_pruning_keeps_the_checkpoint_just_saved_and_newer_ones(keep, tmp_path):
    """Saved step 4 is the newest good checkpoint; damaged newer ones (5, 6) are still there. Pruning deletes only
    older ones, keeping `keep` checkpoints up to the saved one."""
    paths = fake_checkpoints(tmp_path, [1, 2, 3, 4, 5, 6])
    checkpoint.prune_checkpoints(tmp_path, keep, saved=paths[3])
    assert checkpoint.list_checkpoints(tmp_path) == paths[4 - keep:]
    assert [p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir() if p.name.startswith(".")] == []


def test_setting_aside_the_same_name_three_times_keeps_every_copy(tmp_path):
    """The README promises damaged checkpoints are never deleted: a name set aside again (a checkpoint of that step
    written and damaged again) takes a new name each time, for a file and for a folder."""
    moved = {}
    for round_ in range(3):
        for path in fake_checkpoints(tmp_path, [2, 3]):
            (path / "__0_0.distcp" if path.is_dir() else path).write_bytes(f"round {round_}".encode())
            moved.setdefault(path.name, []).extend(checkpoint.set_aside([path], ".damaged"))
    for name, copies in moved.items():
        assert len(set(copies)) == 3 and all(p.name.startswith(f"{name}.damaged") for p in copies)
        assert [(p / "__0_0.distcp" if p.is_dir() else p).read_bytes() for p in copies] == [b"round 0", b"round 1",
                                                                                           b"round 2"]
    assert checkpoint.list_checkpoints(tmp_path) == []


# --- a sharded save on a full disk ----------------------------------------------------------------------------

def test_sharded_save_on_a_full_disk_is_one_line_with_sizes_and_leaves_no_temporary_folder(runs, tmp_path,
                                                                                         monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    def no_space(self, plan, planner):
        (Path(self.path) / "__0_0.distcp").write_bytes(b"part of a shard")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(FileSystemWriter, "write_data", no_space)
    run = shutil.copytree(runs["sharded"], tmp_path / "run")
    before = checkpoint.list_checkpoints(run)
    with pytest.raises(UserError) as error:
        write_checkpoint(run, 6, sharded=True)
    message = str(error.value)
    assert re.fullmatch(r"cannot save checkpoint \S*step_000006: No space left on device; a checkpoint needs about "
                        r"[\d.]+ MB \([\d.]+ [MG]B free there\), more than the free space allows\. Earlier checkpoints "
                        r"are intact: .*", message), message
    assert sorted(checkpoint.checkpoint_dir(run).iterdir()) == before  # no temporary folder, nothing else touched


# --- a resume at or past the run's last step ------------------------------------------------------------------

# The debug model, 4 sequences of 32 tokens a step, checkpoints every 2 steps, no evaluation before step 8
TRAIN = ["--config", "debug", "--micro-batch", "4", "--seq-len", "32", "--total-batch-tokens", "128", "--max-steps",
         "8", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "0", "--hellaswag-every", "0",
         "--sample-every", "0", "--ckpt-every", "2", "--keep-checkpoints", "1"]


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_at_step_4(embedded_data, tmp_path_factory) -> Path:
    """A run stopped after step 4 (its one kept checkpoint), with a damaged step 6 beside it."""
    run = tmp_path_factory.mktemp("resume") / "run"
    run_script("train.py", *TRAIN, "--data", embedded_data, "--out", run, "--stop-at-step", "4", check=True)
    (checkpoint.checkpoint_path(run, 6)).write_bytes(b"damaged")
    return run


def test_a_resume_at_or_past_the_last_step_trains_nothing_and_touches_nothing(run_at_step_4, embedded_data,
                                                                              tmp_path):
    """Past the last step (--max-steps 2, or --stop-at-step 3, below the checkpoint's step 4): one line naming the
    flag to raise, exit 2. At it (--stop-at-step 4): one line, exit 0. Either way no step is trained and every file
    of the run is byte for byte what it was (the damaged step 6 is not even set aside)."""
    before = file_hashes(run_at_step_4)
    cases = {("--max-steps", "2"): "--max-steps above 4", ("--stop-at-step", "3"): "--stop-at-step above 4",
             ("--stop-at-step", "4"): None}
    runs = [shutil.copytree(run_at_step_4, tmp_path / f"run{i}") for i in range(len(cases))]
    checkpoint.checkpoint_path(runs[2], 8, sharded=True).mkdir()  # an empty folder: damaged too, newest
    procs = run_scripts(*[("train.py", *TRAIN, "--data", embedded_data, "--out", run, "--resume", *flags)
                          for run, flags in zip(runs, cases)])
    for run, proc, remedy in zip(runs, procs, cases.values()):
        assert "Traceback" not in proc.stderr, proc.stderr
        if remedy:
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: --resume: the newest good checkpoint "), lines
            assert "step_000004.pt is at step 4" in lines[0] and lines[0].endswith(remedy), lines[0]
        else:
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.strip().endswith("is at step 4, this run's last step: nothing to train, nothing "
                                                "changed"), proc.stdout
            # every damaged file skipped is named, though left in place
            warnings = proc.stderr.strip().splitlines()
            assert len(warnings) == 2 and all(line.startswith("warning: skipping ") for line in warnings), warnings
            assert_names_file(warnings[0], checkpoint.checkpoint_path(run, 8, sharded=True))
            assert_names_file(warnings[1], checkpoint.checkpoint_path(run, 6))
            checkpoint.checkpoint_path(run, 8, sharded=True).rmdir()  # (not a file: kept out of the hashes)
        assert file_hashes(run) == before, proc.args


@pytest.mark.parametrize("local_rank, printed", [(None, True), ("0", True), ("1", False)])
def test_a_skipped_checkpoint_is_warned_by_local_rank_0_only(local_rank, printed, runs, tmp_path, capsys,
                                                             monkeypatch):
    """hellaswag_eval.py / generate.py under torchrun: every process falls back past the damaged checkpoint, and the
    `warning: skipping ...` line is printed once per node (LOCAL_RANK 0, as cli.fail), not once per process."""
    run, _, _ = damaged_copy(runs, *TARGETS[0], DAMAGES[0], tmp_path)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    state, found = checkpoint.load_checkpoint(run)
    assert state["step"] == GOOD
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipping ")]
    assert len(warnings) == (1 if printed else 0), warnings
