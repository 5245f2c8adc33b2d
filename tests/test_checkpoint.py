"""Checkpoints: the fault matrix (every reader x every damage x both formats), the sharded checkpoint of two FSDP
processes read whole and damaged, listing, pruning and setting aside, a save on a full disk or past the file size
limit, a resume at or past the run's last step, a resume whose checkpoints are damaged (the fallback, setting aside,
pruning after it), a save killed mid-write, and the saved optimizer state loaded under a run's settings.

The matrix works on tiny checkpoints built once: a .pt file and a sharded folder (written by checkpoint.py in this
process, no process group), each with the training keys a resume needs. Each cell damages one file of a copy. A
reader of one checkpoint must fail with one line naming the damaged file (never torch's weights_only advice); a
reader of a run directory must fall back to the older good checkpoint and name what it skipped. Most cells call the
reader functions in this process; a few run the CLI readers for the 'no traceback' property."""
import contextlib
import dataclasses
import errno
import hashlib
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import checkpoint
import export_hf
from cli import UserError
from helpers import (FSDP_WORKER_STEP, REPO, TINY, assert_one_line_error, assert_same_tensors, copy_run, garble,
                     limited_run, run_script, run_scripts, train, train_losses)
from model import GPT, GPTConfig
from train import Trainer

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
        checkpoint.save_sharded_checkpoint(path, model, optimizer, extra)
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


def flipped_bytes(file: Path) -> None:
    """64 bytes in the middle inverted, nothing else: inside a tensor's data, where a load sees no broken structure
    (only the CRC-32 stored with each record of a torch.save archive tells)."""
    data, middle = bytearray(file.read_bytes()), file.stat().st_size // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    file.write_bytes(bytes(data))


def missing(file: Path) -> None:
    file.unlink()


def foreign_pickle(file: Path) -> None:
    """Another program's pickle under the name: a plain pickle of an object no checkpoint holds. (A torch.save file
    whose objects this torch refuses is not damage: test_only_a_damaged_file_is_skipped_or_set_aside pins that a
    resume stops at it.)"""
    file.write_bytes(pickle.dumps(Namespace(weights=[1.0, 2.0])))


DAMAGES = [truncated, zero_bytes, garbled, flipped_bytes, missing, foreign_pickle]
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


# What train.py's check before a run sees of a checkpoint without building its tensors (load_checkpoint's peek): a
# .pt file is judged as a load judges it (its CRCs read); a damage in a sharded folder's shard files and index (the
# load reads those) may pass it. Whatever passes, the load still refuses.
PEEK_BLIND = {("sharded", name, damage.__name__) for damage in DAMAGES
              for name in (checkpoint.METADATA_FILE, "__0_0.distcp")
              if (name, damage) != (checkpoint.METADATA_FILE, missing)}


@pytest.mark.parametrize("kind, name", TARGETS, ids=[f"{k}:{n or 'file'}" for k, n in TARGETS])
@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__ for d in DAMAGES])
def test_a_peek_refuses_a_damaged_checkpoint_as_the_load_does_unless_the_damage_is_in_bytes_it_does_not_read(
        damage, kind, name, runs, tmp_path):
    run, ckpt, file = damaged_copy(runs, kind, name, damage, tmp_path)
    try:
        checkpoint.load_checkpoint(ckpt, peek=True)
        passed = True
    except UserError as error:
        assert_names_file(str(error), file)
        passed = False
    if passed:
        assert (kind, name, damage.__name__) in PEEK_BLIND
        with pytest.raises(UserError) as error:
            checkpoint.load_checkpoint(ckpt)
        assert_names_file(str(error.value), file)
    state, found = checkpoint.load_checkpoint(run, peek=True)  # the run directory: the newest that passes
    assert found == checkpoint.checkpoint_path(run, DAMAGED if passed else GOOD, sharded=kind == "sharded")
    assert state["step"] == checkpoint.checkpoint_step(found)


@pytest.mark.parametrize("field, value", [(8, 1), (10, 99), (8, 0x20), (10, 8)],
                         ids=["encrypted", "unknown-compression", "patched", "deflated"])
@pytest.mark.parametrize("kind", ["pt", "sharded"])
def test_a_changed_zip_index_entry_is_damage_and_a_run_falls_back_past_it(kind, field, value, runs, tmp_path,
                                                                          capsys):
    """One field of a record's entry in the zip's central directory changed (general flags at +8, compression at
    +10): zipfile then raises RuntimeError, NotImplementedError or zlib.error, which were tracebacks."""
    run, ckpt, _ = damaged_copy(runs, kind, "", lambda file: None, tmp_path)
    file = ckpt / checkpoint.STATE_FILE if kind == "sharded" else ckpt
    data = bytearray(file.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the first record's central directory entry
    data[entry + field] |= value
    file.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointDamaged) as error:
        checkpoint.load_checkpoint(ckpt)
    assert_names_file(str(error.value), file)
    assert checkpoint.load_checkpoint(run)[1] == checkpoint.checkpoint_path(run, GOOD, sharded=kind == "sharded")


@pytest.mark.parametrize("fmt", ["no CRC", "legacy"])
def test_a_good_checkpoint_in_another_torch_save_format_loads_and_passes_the_peek(fmt, runs, tmp_path):
    """torch.save without CRCs (compute_crc32=False: every record's CRC stored as 0) and its pre-zip format are not
    damage: the CRC check and the peek refused them."""
    state = torch.load(checkpoint.checkpoint_path(runs["pt"], GOOD), weights_only=True)
    path = tmp_path / "step_000002.pt"
    if fmt == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        config = pytest.importorskip("torch.utils.serialization").config.save
        previous, config.compute_crc32 = config.compute_crc32, False
        try:
            torch.save(state, path)
        finally:
            config.compute_crc32 = previous
    for peek in (True, False):
        assert checkpoint.load_checkpoint(path, peek=peek)[0]["step"] == GOOD


def test_a_peek_passes_good_checkpoints_and_reads_no_shard_file(runs, tmp_path):
    for kind in ("pt", "sharded"):
        state, found = checkpoint.load_checkpoint(runs[kind], peek=True)
        assert found == checkpoint.checkpoint_path(runs[kind], DAMAGED, sharded=kind == "sharded")
        assert state["step"] == DAMAGED and state["model_config"] == dataclasses.asdict(CONFIG)
    folder = shutil.copytree(checkpoint.checkpoint_path(runs["sharded"], GOOD, sharded=True), tmp_path / "step_000002")
    for file in [*folder.glob("*.distcp"), folder / checkpoint.METADATA_FILE]:
        file.write_bytes(b"")  # a peek that read one would fail, as the load does
    assert checkpoint.load_checkpoint(folder, peek=True)[0]["step"] == GOOD
    with pytest.raises(checkpoint.CheckpointDamaged):
        checkpoint.load_checkpoint(folder)


# --- readers of a run directory: --resume (one process, DDP, FSDP: checkpoint.newest_valid_checkpoint, weights on
# disk) and the scripts given a run directory (checkpoint.load_checkpoint) -----------------------------------------

def resume_reader(run: Path, capsys) -> tuple[Path, str]:
    state, found, damaged = checkpoint.newest_valid_checkpoint(run, weights=False)
    assert state["step"] == GOOD
    return found, " ".join(damaged.values())


def scripts_reader(run: Path, capsys) -> tuple[Path, str]:
    state, found = checkpoint.load_checkpoint(run)
    assert state["step"] == GOOD and "model" in state
    warning = capsys.readouterr().err
    assert "use an earlier checkpoint" not in warning  # (the damage message's advice: the fallback is taking one)
    return found, warning


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
SAVED_KEYS = ("format", *Trainer.STATE_KEYS, "imported_from")
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
        assert_names_file(assert_one_line_error(proc, status=2, alone=True), file)


# --- the sharded checkpoint two FSDP processes wrote (conftest's fsdp_worker): read whole without a process
# group, and a damaged shard file named in one line -----------------------------------------------------------

def test_single_process_readers_get_the_full_model_without_a_process_group(fsdp_worker):
    """checkpoint.load_checkpoint (generate.py, hellaswag_eval.py, export_hf.py, load_model) on a sharded
    folder, or on its run directory, gives what a .pt file holds: format, model_config, the model as full tensors
    (the uneven embedding shards joined), and the extra state the trainer passed."""
    trained = torch.load(fsdp_worker / "loaded.pt", weights_only=True)["trained"]["model"]
    run = fsdp_worker / "run"
    for source in (run, checkpoint.checkpoint_path(run, FSDP_WORKER_STEP, sharded=True)):
        state, found = checkpoint.load_checkpoint(source)
        assert found == checkpoint.checkpoint_path(run, FSDP_WORKER_STEP, sharded=True)
        assert state["format"] == checkpoint.FORMAT and state["step"] == FSDP_WORKER_STEP
        assert state["tokens_seen"] == 12345  # passed through untouched
        assert_same_tensors(state["model"], trained)
    model = checkpoint.load_model(run)
    assert_same_tensors(model.state_dict(), trained)
    assert "model" not in checkpoint.load_checkpoint_file(found, weights=False)


@pytest.fixture
def damaged_run(fsdp_worker, tmp_path):
    """A run with the good step 3 and a copy of it as step 5, for the test to damage."""
    run = tmp_path / "run"
    good = checkpoint.checkpoint_path(run, FSDP_WORKER_STEP, sharded=True)
    shutil.copytree(checkpoint.checkpoint_path(fsdp_worker / "run", FSDP_WORKER_STEP, sharded=True), good)
    shutil.copytree(good, checkpoint.checkpoint_path(run, 5, sharded=True))
    return run, checkpoint.checkpoint_path(run, 5, sharded=True)


@pytest.mark.parametrize("damage, needle", [("missing", "missing its shard file __1_0.distcp"),
                                            ("truncated", "__0_0.distcp is truncated"),
                                            ("garbled", "__1_0.distcp is corrupt or truncated"),
                                            ("no_state", "has no train_state.pt"),
                                            ("bad_index", ".metadata is corrupt or truncated")])
def test_damaged_sharded_checkpoint_is_one_line_and_a_resume_falls_back(damaged_run, damage, needle):
    run, newer = damaged_run
    if damage == "missing":
        (newer / "__1_0.distcp").unlink()
    elif damage == "truncated":
        shard = newer / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "garbled":
        garble(newer / "__1_0.distcp")
    elif damage == "no_state":
        (newer / "train_state.pt").unlink()
    else:
        (newer / ".metadata").write_bytes((newer / ".metadata").read_bytes()[:50])
    with pytest.raises(checkpoint.CheckpointDamaged) as error:
        checkpoint.load_checkpoint_file(newer)
    assert needle in str(error.value) and "\n" not in str(error.value)
    state, found, damaged = checkpoint.newest_valid_checkpoint(run, weights=False)
    assert found.name == f"step_{FSDP_WORKER_STEP:06d}" and list(damaged) == [newer] and needle in damaged[newer]


def test_reader_script_names_the_missing_shard_in_one_line(damaged_run):
    run, newer = damaged_run
    (newer / "__1_0.distcp").unlink()
    proc = run_script("generate.py", "--checkpoint", newer, "--prompt", "a", "--max-new-tokens", "1")
    assert assert_one_line_error(proc) == (f"error: sharded checkpoint {newer} is missing its shard file "
                                           "__1_0.distcp; use an earlier checkpoint")


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


def test_listing_pruning_and_setting_aside_treat_folders_like_files(tmp_path):
    """Folders and .pt files in one run: listed by step, pruned (a folder entirely, no temporary name left),
    quarantined and set aside by renaming."""
    folder = checkpoint.checkpoint_dir(tmp_path)
    for step, sharded in ((1, True), (2, False), (3, True), (4, True), (5, False)):
        path = checkpoint.checkpoint_path(tmp_path, step, sharded)
        if sharded:
            path.mkdir(parents=True)
            (path / "__0_0.distcp").write_bytes(b"x")
        else:
            path.write_bytes(b"x")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step_000001", "step_000002.pt", "step_000003", "step_000004", "step_000005.pt"]
    checkpoint.prune_checkpoints(tmp_path, keep=3, saved=folder / "step_000005.pt")
    assert sorted(p.name for p in folder.iterdir()) == ["step_000003", "step_000004", "step_000005.pt"]
    checkpoint.quarantine_checkpoints(tmp_path, from_step=4)
    assert sorted(p.name for p in folder.iterdir()) == ["step_000003", "step_000004.nonfinite",
                                                       "step_000005.pt.nonfinite"]
    assert (folder / "step_000004.nonfinite" / "__0_0.distcp").exists()
    assert checkpoint.list_checkpoints(tmp_path) == [folder / "step_000003"]


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


# --- a .pt save past the file size limit or on a full disk: one line, the earlier checkpoints kept ---------

@contextlib.contextmanager
def tmpfs(path, options: str):
    """A tmpfs mounted at `path` for the test (root only: skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_checkpoint_beyond_the_file_size_limit_is_one_line_and_keeps_the_previous_ones(run_at_step_4,
                                                                                       embedded_data, tmp_path):
    from checkpoint import load_checkpoint_file
    run = copy_run(run_at_step_4, tmp_path / "run")
    saved = run / "checkpoints" / "step_000004.pt"
    proc = limited_run(["train.py", *TINY, "--data", embedded_data, "--out", run, "--resume", "--ckpt-every", "2"],
                       saved.stat().st_size // 2)  # the logs fit, a checkpoint does not
    assert_one_line_error(proc, "step_000006.pt", "File too large", "a checkpoint needs about 89.9 MB",
                          "ulimit -f")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002.pt", "step_000004.pt"]
    assert load_checkpoint_file(saved)["step"] == 4


def test_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_previous_one(embedded_data, tmp_path):
    from checkpoint import load_checkpoint_file
    # a filesystem with room for one checkpoint (about 90 MB) and the logs, not two
    with tmpfs(tmp_path / "small", "size=140m") as small:
        run = small / "run"
        train(embedded_data, run, "--ckpt-every", "2", "--keep-checkpoints", "1", "--stop-at-step", "2")
        saved = run / "checkpoints" / "step_000002.pt"
        assert 80e6 < saved.stat().st_size < 100e6  # (the tmpfs size above assumes it)
        proc = train(embedded_data, run, "--ckpt-every", "2", "--keep-checkpoints", "1", "--resume", "--stop-at-step",
                     "4", check=False)
        assert_one_line_error(proc, "step_000004.pt", "No space left on device",
                              "a checkpoint needs about 89.9 MB")
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002.pt"]  # no temporary file
        assert load_checkpoint_file(saved)["step"] == 2


# --- a resume at or past the run's last step ------------------------------------------------------------------

# The debug model, 4 sequences of 32 tokens a step, checkpoints every 2 steps, no evaluation before step 8
TRAIN = ["--config", "debug", "--micro-batch", "4", "--seq-len", "32", "--total-batch-tokens", "128", "--max-steps",
         "8", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "0", "--hellaswag-every", "0",
         "--sample-every", "0", "--ckpt-every", "2", "--keep-checkpoints", "1"]


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_stopped_at_4(embedded_data, tmp_path_factory) -> Path:
    """A run stopped after step 4 (its one kept checkpoint), with a damaged step 6 beside it."""
    run = tmp_path_factory.mktemp("resume") / "run"
    run_script("train.py", *TRAIN, "--data", embedded_data, "--out", run, "--stop-at-step", "4", check=True)
    (checkpoint.checkpoint_path(run, 6)).write_bytes(b"damaged")
    return run


def test_a_resume_at_or_past_the_last_step_trains_nothing_and_touches_nothing(run_stopped_at_4, embedded_data,
                                                                              tmp_path):
    """Past the last step (--max-steps 2, or --stop-at-step 3, below the checkpoint's step 4): one line naming the
    flag to raise, exit 2. At it (--stop-at-step 4): one line, exit 0. Either way no step is trained and every file
    of the run is byte for byte what it was (the damaged step 6 is not even set aside)."""
    before = file_hashes(run_stopped_at_4)
    cases = {("--max-steps", "2"): "--max-steps above 4", ("--stop-at-step", "3"): "--stop-at-step above 4",
             ("--stop-at-step", "4"): None}
    runs = [shutil.copytree(run_stopped_at_4, tmp_path / f"run{i}") for i in range(len(cases))]
    checkpoint.checkpoint_path(runs[2], 8, sharded=True).mkdir()  # an empty folder: damaged too, newest
    procs = run_scripts(*[("train.py", *TRAIN, "--data", embedded_data, "--out", run, "--resume", *flags)
                          for run, flags in zip(runs, cases)])
    for run, proc, remedy in zip(runs, procs, cases.values()):
        assert "Traceback" not in proc.stderr, proc.stderr
        if remedy:
            line = assert_one_line_error(proc, "step_000004.pt is at step 4", status=2, alone=True)
            assert line.startswith("error: --resume: the newest good checkpoint ") and line.endswith(remedy), line
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


# --- resuming a run whose checkpoints are damaged ---------------------------------------------------------------

def not_a_checkpoint(path):
    path.write_bytes(b"not a checkpoint" * 100)


def test_resume_when_every_checkpoint_is_damaged_without_fresh_start_changes_nothing(run_at_step_4, embedded_data,
                                                                                     tmp_path):
    out = copy_run(run_at_step_4, tmp_path / "run")
    for path in (out / "checkpoints").iterdir():
        not_a_checkpoint(path)
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    proc = train(embedded_data, out, "--resume", check=False)
    assert_one_line_error(proc, "every checkpoint", "step_000002.pt", "step_000004.pt",
                          "--allow-fresh-start")
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before


def test_resume_when_every_checkpoint_is_damaged_under_torchrun_restarts_from_step_0(run_at_step_4, embedded_data,
                                                                                     tmp_path):
    """As run_pre_training_e2e.sh runs it: torchrun --max-restarts ... --resume --allow-fresh-start."""
    out = copy_run(run_at_step_4, tmp_path / "run")
    for path in (out / "checkpoints").iterdir():
        not_a_checkpoint(path)
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2",
                      "train.py", *TINY, "--data", embedded_data, "--out", out, "--ckpt-every", "2",
                      "--max-steps", "4", "--resume", "--allow-fresh-start")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "already holds checkpoints" not in output
    assert output.count("moved a damaged checkpoint aside") == 2 and "training starts from step 0" in output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_000002.pt", "step_000002.pt.damaged", "step_000004.pt", "step_000004.pt.damaged"]
    assert (out / "checkpoints" / "step_000002.pt.damaged").read_bytes() == b"not a checkpoint" * 100  # kept
    assert sorted(train_losses(out)) == list(range(4))


def test_damaged_newer_checkpoint_is_moved_aside_so_pruning_keeps_the_good_ones(run_at_step_4, embedded_data,
                                                                                tmp_path):
    out = copy_run(run_at_step_4, tmp_path / "run")
    not_a_checkpoint(out / "checkpoints" / "step_000004.pt")
    train(embedded_data, out, "--resume", "--ckpt-every", "1", "--keep-checkpoints", "1", "--stop-at-step", "3")
    # the resume continued from step 2 and saved step 3; keeping one checkpoint must keep that one, not the
    # damaged step 4 that is newer by name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003.pt", "step_000004.pt.damaged"]


class NotAllowed:  # a global that weights_only refuses, as a file written by another version's code may hold
    pass


def test_only_a_damaged_file_is_skipped_or_set_aside(tmp_path, monkeypatch):
    """A resume falls back past a checkpoint only when the file itself is damaged. The machine failing while it
    loads (no memory, a disk error) or a file this torch version refuses stops the lookup with the newer file in
    place: falling back would silently throw away the steps after the older checkpoint."""
    from checkpoint import newest_valid_checkpoint, save_checkpoint, set_aside
    run = tmp_path / "run"
    for step in (2, 4):
        save_checkpoint({"model_config": {}, "model": {"w": torch.full((2,), float(step))}},
                        checkpoint.checkpoint_path(run, step))
    newest = checkpoint.checkpoint_path(run, 4)
    real_load = torch.load
    for failure in (MemoryError(), OSError(5, "Input/output error"),
                    RuntimeError("DefaultCPUAllocator: can't allocate memory")):
        def failing_load(path, *args, _failure=failure, **kwargs):
            if Path(path) == newest:
                raise _failure
            return real_load(path, *args, **kwargs)
        monkeypatch.setattr(torch, "load", failing_load)
        with pytest.raises(type(failure)):
            newest_valid_checkpoint(run)
    monkeypatch.setattr(torch, "load", real_load)
    torch.save({"format": checkpoint.FORMAT, "model_config": {}, "model": {}, "extra": NotAllowed()}, newest)
    with pytest.raises(UserError, match="not damaged"):
        newest_valid_checkpoint(run)
    not_a_checkpoint(newest)
    state, path, damaged = newest_valid_checkpoint(run)
    assert path.name == "step_000002.pt" and list(damaged) == [newest]
    first = set_aside([newest], ".damaged")[0]
    not_a_checkpoint(newest)  # damaged again after a later save: the first one set aside is kept as well
    second = set_aside([newest], ".damaged")[0]
    assert first != second and first.exists() and second.exists()


# --- a save killed mid-write ------------------------------------------------------------------------------------

SLOW_SAVE = """
import sys, time
import torch
sys.path.insert(0, {repo!r})
from checkpoint import checkpoint_path, save_checkpoint


class Slow:  # pickled inside torch.save, after the temporary file is open
    def __reduce__(self):
        print("writing", flush=True)
        time.sleep(120)
        return (int, (0,))


save_checkpoint({{"model": {{"w": torch.zeros(1000)}}, "slow": Slow()}}, checkpoint_path({run!r}, 6))
"""


def test_save_killed_mid_write_leaves_no_orphan_after_the_next_start(run_at_step_4, embedded_data, tmp_path):
    out = copy_run(run_at_step_4, tmp_path / "run")
    saver = subprocess.Popen([sys.executable, "-c", SLOW_SAVE.format(repo=str(REPO), run=str(out))],
                             stdout=subprocess.PIPE, text=True)
    assert saver.stdout.readline() == "writing\n"
    orphan = out / "checkpoints" / f".step_000006.pt.tmp{saver.pid}"
    assert orphan.exists()
    saver.kill()  # kill -9 during the save
    saver.wait()
    live = out / "checkpoints" / f".step_000007.pt.tmp{os.getpid()}"  # a save in progress by a live process
    live.write_bytes(b"partial")
    proc = train(embedded_data, out, "--resume", "--stop-at-step", "5")
    assert f"removed {orphan}" in proc.stdout
    assert not orphan.exists() and live.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        live.name, "step_000002.pt", "step_000004.pt", "step_000005.pt"]
    assert torch.load(out / "checkpoints" / "step_000005.pt", weights_only=True)["step"] == 5


# --- a resume loads the saved optimizer state into this run's optimizer ----------------------------------

def test_resumed_optimizer_keeps_saved_moments_under_this_runs_settings():
    """A checkpoint's AdamW state (here: plain for-loop AdamW, other betas and weight decay) loaded into this run's
    optimizer (fused, as on CUDA): the moments and step counts come from the checkpoint, every setting from the run."""
    from checkpoint import load_training_state
    model = GPT(GPTConfig.from_preset("debug"))
    saved_optimizer = torch.optim.AdamW(model.param_groups(0.2), lr=1e-3, betas=(0.8, 0.9), foreach=False)
    model(torch.zeros((1, 8), dtype=torch.long), torch.zeros((1, 8), dtype=torch.long))[1].backward()
    saved_optimizer.step()
    saved = saved_optimizer.state_dict()
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3, betas=(0.9, 0.95), fused=True)
    load_training_state(model, optimizer, {"model": model.state_dict(), "optimizer": saved}, "step_000001.pt")
    for group in optimizer.param_groups:
        assert group["fused"] is True and group["foreach"] is None and tuple(group["betas"]) == (0.9, 0.95)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    first = model.wte.weight
    assert torch.equal(optimizer.state[first]["exp_avg"], saved_optimizer.state[first]["exp_avg"])
    assert float(optimizer.state[first]["step"]) == 1.0
    model(torch.zeros((1, 8), dtype=torch.long), torch.zeros((1, 8), dtype=torch.long))[1].backward()
    optimizer.step()  # the fused kernel accepts the loaded state
    assert float(optimizer.state[first]["step"]) == 2.0
