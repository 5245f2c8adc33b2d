"""Checkpoint files: atomic writes, discovery of the newest valid one in a run directory, validated loads.

A checkpoint is one `torch.save` file, RUN_DIR/checkpoints/step_NNNNNN.pt, holding a dict with at least
`format`, `model_config` (GPTConfig as a dict) and `model` (a plain, uncompiled state_dict); train.py adds the
optimizer, step, loader and RNG state. Files are written to a temporary name (.step_NNNNNN.pt.tmpPID), fsynced
and renamed, so a kill during a save never leaves a damaged file under a checkpoint name; the temporary file such a
kill leaves behind is removed by the next training start or save (remove_orphaned_temp_files).

An FSDP run's checkpoint is a folder, RUN_DIR/checkpoints/step_NNNNNN/ (written the same way: a temporary
.step_NNNNNN.tmpPID folder renamed when complete): torch.distributed.checkpoint files with the model and
optimizer state, sharded as the processes held them, plus train_state.pt with the rest of the dict. Every function
here treats it like a file: load_checkpoint_file gives the same dict, the model as full tensors; DCP reshards on
load, so load_training_state continues any checkpoint in any layout (a sharded one on another process count, under
DDP or on one process, and a DDP run's .pt file under FSDP).

RunCheckpoints is a training run's view of all this: the checkpoint to resume (past damaged ones, which rank 0 sets
aside before the other processes look), saving, pruning and the temporary files of killed saves.

torch.distributed.checkpoint is imported inside the functions that read or write a sharded folder: its import adds
to a script's start (1.8 s after torch, measured on a busy 2-core machine), which the .pt readers never need.
"""
import dataclasses
import errno
import io
import os
import random
import re
import shutil
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cli import UserError, atomic_write, fsync_dir, warn
from devices import Dist
from model import GPT, GPTConfig

FORMAT = "lf-llm-checkpoint-v1"
_NAME = re.compile(r"^step_(\d{6,})(?:\.pt)?$")  # a file, or a sharded checkpoint's folder
# cli.atomic_write's temporary file of a checkpoint, or the temporary folder of a sharded one (also the name a pruned
# folder takes while it is deleted)
_TEMP_NAME = re.compile(r"^\.step_\d{6,}(?:\.pt)?\.tmp(\d+)$")
STATE_FILE = "train_state.pt"  # a sharded checkpoint's dict, without the model and optimizer state
METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's index of the shard files


class CheckpointDamaged(UserError):
    """The file under a checkpoint name is truncated, garbled or not one of ours: a resume may skip it."""


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir, step: int, sharded: bool = False) -> Path:
    return checkpoint_dir(run_dir) / (f"step_{step:06d}" if sharded else f"step_{step:06d}.pt")


def is_sharded_checkpoint(path) -> bool:
    """Whether `path` is a sharded checkpoint's folder (a run directory is not)."""
    path = Path(path)
    return path.is_dir() and (_NAME.match(path.name) is not None or (path / STATE_FILE).is_file())


def list_checkpoints(run_dir) -> list[Path]:
    """Checkpoint files (and sharded checkpoint folders) of a run directory, oldest step first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict, path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`. A disk too full (or a
    file size limit too low) for it is one line saying how much a checkpoint needs; earlier files stay intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path) as f:
            torch.save({"format": FORMAT, **state}, f)
    except OSError as e:
        raise no_room_error(e, path, tensor_bytes(state)) from e


def no_room_error(error: OSError, path: Path, needed: int) -> OSError | UserError:
    """A save of `path` (about `needed` bytes) that failed with `error`: a disk too full (or a file size limit too
    low) becomes one line with the sizes; any other error is returned as it is."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return error
    limit = "the file size limit (ulimit -f)" if error.errno == errno.EFBIG else "the free space"
    return UserError(f"cannot save checkpoint {path}: {error.strerror}; a checkpoint needs about {human_size(needed)} "
                     f"({human_size(shutil.disk_usage(path.parent).free)} free there), more than {limit} allows. "
                     "Earlier checkpoints are intact: make room, then run again (train.py: with --resume)")


def tensor_bytes(obj) -> int:
    """Bytes of all tensors in a nested dict/list/tuple: about the size of its torch.save file."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def human_size(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def remove_orphaned_temp_files(run_dir) -> list[Path]:
    """Delete the temporary files that killed saves left in the run's checkpoint folder, and return them. Only
    rank 0 of a run saves, one save at a time, so a temporary file is an orphan unless a live process other than
    this one wrote it (a process of this id before this one was a killed earlier attempt)."""
    folder = checkpoint_dir(run_dir)
    orphans = [p for p in (folder.iterdir() if folder.is_dir() else [])
               if (m := _TEMP_NAME.match(p.name)) and not _is_other_live_process(int(m.group(1)))]
    for path in orphans:
        _delete(path)
    return orphans


def _delete(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _is_other_live_process(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # (no process can have an id too large for kill())
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def prune_checkpoints(run_dir, keep: int, saved: Path) -> None:
    """After `saved` was written: delete the checkpoints older than it but the newest `keep` (counting `saved`;
    keep <= 0 keeps all). The one just saved is the newest good checkpoint, so it and any newer one (damaged or
    not: never this run's to judge) stay. A folder first takes a temporary name: a kill while its files are deleted
    leaves an orphan for the next start to remove, not a damaged checkpoint."""
    if keep > 0:
        older = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) < checkpoint_step(saved)]
        for path in older[:max(0, len(older) - (keep - 1))]:
            if path.is_dir():
                path = path.rename(path.with_name(f".{path.name}.tmp{os.getpid()}"))
            _delete(path)


def quarantine_checkpoints(run_dir, from_step: int) -> None:
    """Rename checkpoints of step >= from_step to *.nonfinite (kept for inspection, never picked by a resume)."""
    set_aside([p for p in list_checkpoints(run_dir) if int(_NAME.match(p.name).group(1)) >= from_step], ".nonfinite")


def set_aside(paths: list[Path], suffix: str) -> list[Path]:
    """Rename each file (or sharded checkpoint folder) to NAME+suffix: kept for inspection, but no longer a checkpoint
    name that a resume, a lookup or the pruning would see. Returns the new paths."""
    moved = []
    for path in paths:
        new, n = path.with_name(path.name + suffix), 1
        while new.exists():  # an earlier file set aside under the same name is kept too
            new, n = path.with_name(f"{path.name}{suffix}.{n}"), n + 1
        path.rename(new)
        moved.append(new)
    return moved


def load_checkpoint_file(path, map_location="cpu", weights: bool = True, peek: bool = False) -> dict:
    """Load and validate one checkpoint file or sharded checkpoint folder; UserError when it is missing, truncated
    or not one of ours. weights=False leaves a sharded checkpoint's model and optimizer state on disk (no 'model'
    key): load_training_state reads them straight into a run's shards. peek=True (a check before a run starts)
    judges a .pt file as a load does without building its tensors: a zip archive's are memory-mapped, its records'
    CRCs read (one pass over the file, seconds for gigabytes); a sharded folder's shard files are only looked for;
    the dict and its entries are validated as a load does."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return load_sharded_checkpoint(path, map_location, weights=weights and not peek, peek=peek)
    if path.is_symlink() and not path.exists():  # dangling, or a loop: a damaged entry under a checkpoint name
        raise CheckpointDamaged(f"checkpoint {path} is a symbolic link that does not resolve (to {_link_target(path)}); "
                                "use an earlier checkpoint")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    # peek: a zip archive's tensors mapped, not read (their CRCs are checked all the same); torch.load cannot map
    # any other file (an older torch.save format, or something else: then read, and refused if it does not load)
    state = _torch_load(path, path, "cpu" if peek else map_location, mmap=peek and zipfile.is_zipfile(path))
    if not isinstance(state, dict) or state.get("format") != FORMAT or not {"model", "model_config"} <= state.keys():
        raise CheckpointDamaged(f"{path} is not a checkpoint of this repo (no '{FORMAT}' model state in it)")
    _check_schema(state, path)
    return state


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _check_schema(state: dict, file: Path) -> None:
    """CheckpointDamaged naming `file` when an entry of its loaded dict breaks its STATE_RULES rule."""
    problems = state_problems(state)
    if problems:
        raise CheckpointDamaged(f"checkpoint {file} " + "; ".join(problems) + "; use an earlier checkpoint")


# --- the schema of a loaded checkpoint: one rule per entry any saving code writes (train.Trainer.state_dict, via
# save_checkpoint or save_sharded_checkpoint; export_hf.py --from-hf). A file breaking one is damaged. ---

def _is_count(value, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_mapping(value) -> bool:
    return isinstance(value, dict) and all(isinstance(key, str) for key in value)


def _describe(value) -> str:
    """A value, short, with its type: "'4' (a str)"; a long one by its type alone."""
    shown, kind = repr(value), type(value).__name__
    kind = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    return f"{shown} ({kind})" if len(shown) <= 40 else f"({kind} of {len(value)})" if hasattr(value, "__len__") \
        else f"({kind})"


def _model_config_problem(value) -> str | None:
    if not _is_mapping(value):
        return "not a model config (a mapping of GPTConfig fields)"
    fields = {f.name: f.type for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        return f"unknown GPTConfig fields {unknown}"
    for name, kind in fields.items():
        if name in value and not (_is_count(value[name], 1) if kind in (int, "int") else
                                  isinstance(value[name], (int, float)) and not isinstance(value[name], bool)):
            return f"field {name} {_describe(value[name])}, not a{' positive int' if kind in (int, 'int') else ' number'}"
    return None


def _optimizer_ok(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("state"), dict) and isinstance(value.get("param_groups"),
                                                                                           list)


def _train_config_ok(value) -> bool:
    return _is_mapping(value) and all(_is_count(value.get(key), 1) for key in ("total_batch_tokens", "seq_len"))


def _loader_ok(value) -> bool:  # this repo's loader state, or a v1 checkpoint's list of them (one per rank)
    return _is_mapping(value) or (isinstance(value, list) and len(value) > 0 and all(map(_is_mapping, value)))


def _one_rng_ok(value) -> bool:
    """One rank's rng_state(): python (version, 625 ints, gauss), torch's byte tensor, numpy (kind, the key as an
    int64 tensor, pos, has_gauss, cached_gaussian), and maybe cuda's byte tensor."""
    if not (isinstance(value, dict) and {"python", "torch", "numpy"} <= value.keys() <= {"python", "torch", "numpy",
                                                                                          "cuda"}):
        return False
    python, numpy = value["python"], value["numpy"]
    return (isinstance(python, (list, tuple)) and len(python) == 3 and isinstance(python[1], (list, tuple))
            and all(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for k, v in value.items()
                    if k in ("torch", "cuda"))
            and isinstance(numpy, (list, tuple)) and len(numpy) == 5 and isinstance(numpy[0], str)
            and isinstance(numpy[1], torch.Tensor) and numpy[1].dtype == torch.int64)


# entry -> (what it must be, the check); an entry without a rule is refused (a new entry needs a rule here)
STATE_RULES = {
    "format": (f"the format mark '{FORMAT}'", lambda v: v == FORMAT),
    "model_config": ("a model config", lambda v: _model_config_problem(v) is None),
    "model": ("a state_dict (names -> tensors)", lambda v: _is_mapping(v) and all(isinstance(t, torch.Tensor)
                                                                                  for t in v.values())),
    "optimizer": ("an optimizer state_dict (state, param_groups)", _optimizer_ok),
    "train_config": ("a training config (with total_batch_tokens and seq_len)", _train_config_ok),
    "step": ("a step count", lambda v: _is_count(v)),
    "tokens_seen": ("a token count", lambda v: _is_count(v)),
    "world_size": ("a process count", lambda v: _is_count(v, 1)),
    "micro_batch": ("a micro-batch size", lambda v: _is_count(v, 1)),
    "loader": ("a loader state", _loader_ok),
    "rng": ("one RNG state per process", lambda v: isinstance(v, list) and len(v) > 0 and all(map(_one_rng_ok, v))),
    "imported_from": ("the folder a model was imported from", lambda v: isinstance(v, str)),
}


def state_problems(state: dict) -> list[str]:
    """What is wrong with the entries of a loaded checkpoint dict, one phrase each (empty: nothing): each entry
    checked by its STATE_RULES rule, an entry without one refused, and the RNG states one per process."""
    problems = []
    for key, value in state.items():
        if key not in STATE_RULES:
            problems.append(f"holds an entry {key!r} no checkpoint of this repo has")
            continue
        what, ok = STATE_RULES[key]
        if not ok(value):
            detail = _model_config_problem(value) if key == "model_config" and _is_mapping(value) else None
            problems.append(f"holds {key} {_describe(value)}, not {what}" + (f" ({detail})" if detail else ""))
    rng, world_size = state.get("rng"), state.get("world_size")
    if STATE_RULES["rng"][1](rng) and _is_count(world_size, 1) and len(rng) != world_size:
        problems.append(f"holds rng with {len(rng)} RNG states for world_size {world_size}, not one per process")
    return problems


def _torch_load(source, path: Path, map_location, mmap: bool = False):
    """torch.load (weights only) of a checkpoint's file, or of `source` (bytes of `path`, a sharded checkpoint's
    shard file): CheckpointDamaged naming `path` when the file is damaged or not one of ours. The one classification
    of a checkpoint file's damage, for .pt files and every file of a sharded folder. `mmap`: the tensors are mapped
    from the file, not read (a zip archive only)."""
    garbled = _first_garbled_record(source)
    if garbled:
        raise CheckpointDamaged(f"checkpoint {path} is garbled: its record {garbled} fails the CRC-32 check of its "
                                "bytes; use an earlier checkpoint")
    try:
        with warnings.catch_warnings():  # (a pickle of another protocol than torch's: refused below, if not ours)
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for truncated/garbled files
        if not is_damaged_file_error(e):
            raise  # the disk or the machine failed, not the file: never a reason to fall back to an older checkpoint
        if "Unsupported global" in str(e):  # (torch's message advises weights_only=False: unsafe, never repeated)
            raise UserError(f"checkpoint {path} holds objects this torch {torch.__version__} will not load "
                            "(weights_only); the file is not damaged: load it with the code and torch version that "
                            "wrote it") from None
        raise CheckpointDamaged(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); use an earlier "
                                "checkpoint") from None


def _first_garbled_record(source) -> str | None:
    """The first record of a torch.save zip archive (a path, or a file object) whose bytes no longer match the
    CRC-32 written with them, or None. torch.load does not check them: a flipped byte inside a tensor loads as a
    wrong weight. One more read of the file (seconds for gigabytes). A record written without a CRC (stored as 0:
    torch's serialization config compute_crc32=False) is not judged; what is no zip archive is left to torch.load."""
    try:
        with zipfile.ZipFile(source) as archive:
            for record in archive.infolist():
                if record.CRC == 0:
                    continue
                try:
                    with archive.open(record) as f:  # (zipfile checks the CRC once a record is read to its end)
                        while f.read(1 << 24):
                            pass
                # a changed index entry: another compression, an encryption or patch flag, a bad deflate stream
                except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError):
                    return record.filename
            return None
    except (zipfile.BadZipFile, EOFError, ValueError):  # (an OSError is the disk's: raised, as torch.load's is)
        return None
    finally:
        if hasattr(source, "seek"):
            source.seek(0)


def load_sharded_checkpoint(folder: Path, map_location="cpu", weights: bool = True, peek: bool = False) -> dict:
    """A sharded checkpoint's dict: train_state.pt's content plus, unless weights=False, the model as one plain
    state_dict of full tensors (what a .pt file holds). Needs no process group. Every shard file the index names must
    be there at its full length, with every entry loadable: else CheckpointDamaged naming the file. peek=True (with
    weights=False): the index and train_state.pt are only looked for, no shard file is read."""
    metadata = _sharded_files_present(folder) if peek else _sharded_metadata(folder)
    state = _torch_load(folder / STATE_FILE, folder / STATE_FILE, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model_config" not in state:
        raise CheckpointDamaged(f"{folder / STATE_FILE} is not a checkpoint of this repo (no '{FORMAT}' state in it)")
    _check_schema(state, folder / STATE_FILE)
    if weights:
        state["model"] = _read_full_model(folder, metadata, map_location)
    return state


def _sharded_metadata(folder: Path):
    """The DCP index of a sharded checkpoint, after checking that it and every file it names are complete and that
    every entry of every shard file loads (each is a torch.save of its own: all of the folder is read once)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata
    _sharded_files_present(folder)
    try:
        metadata = FileSystemReader(folder).read_metadata()
    except (OSError, MemoryError):
        raise
    except Exception as e:  # a truncated or garbled pickle
        raise CheckpointDamaged(f"checkpoint index {folder / METADATA_FILE} is corrupt or truncated "
                                f"({type(e).__name__}); use an earlier checkpoint") from None
    if not isinstance(metadata, Metadata) or not any(key.startswith("model.") for key in metadata.state_dict_metadata):
        raise CheckpointDamaged(f"{folder} is not a checkpoint of this repo (no model state in its index "
                                f"{folder / METADATA_FILE})")
    entries = {}  # shard file -> its entries
    for entry in metadata.storage_data.values():
        entries.setdefault(entry.relative_path, []).append(entry)
    for name, items in sorted(entries.items()):
        file, size = folder / name, max(entry.offset + entry.length for entry in items)
        if not file.is_file():
            raise CheckpointDamaged(f"sharded checkpoint {folder} is missing its shard file {name}; use an earlier "
                                    "checkpoint")
        if file.stat().st_size < size:
            raise CheckpointDamaged(f"shard file {file} is truncated ({file.stat().st_size:,} of {size:,} bytes); "
                                    "use an earlier checkpoint")
        with open(file, "rb") as f:
            for entry in sorted(items, key=lambda entry: entry.offset):
                f.seek(entry.offset)
                _torch_load(io.BytesIO(f.read(entry.length)), file, "cpu")
    return metadata


def _sharded_files_present(folder: Path) -> None:
    """CheckpointDamaged unless the sharded checkpoint `folder` holds its index and train_state.pt."""
    for name in (METADATA_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise CheckpointDamaged(f"sharded checkpoint {folder} has no {name}; use an earlier checkpoint")


def _read_full_model(folder: Path, metadata, map_location) -> dict:
    """The model's state_dict from a sharded checkpoint as full tensors, in this process alone (no_dist): every
    shard's piece of each tensor is read into one tensor of the saved shape."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    model = {key.removeprefix("model."): torch.empty(entry.size, dtype=entry.properties.dtype, device=map_location)
             for key, entry in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}
    state = {"model": model}
    with warnings.catch_warnings():  # a load in one process is what this is for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder, no_dist=True)
    return state["model"]


# torch.load's RuntimeErrors that mean a damaged file: its zip reader's, and (reading tensors memory-mapped) a
# tensor larger than the record a garbled zip header gives it
DAMAGE_MESSAGES = ("PytorchStreamReader", "zip archive", "Trying to resize storage that is not resizable")


def is_damaged_file_error(error: Exception) -> bool:
    """Whether torch.load's error says the file itself is damaged (truncated zip, garbled pickle or header), as
    opposed to the disk (an OSError) or the machine (out of memory: a RuntimeError from the allocator)."""
    if isinstance(error, OSError):  # torch's zip reader seeking before the start of a truncated file: EINVAL
        return error.errno == errno.EINVAL
    if isinstance(error, MemoryError):
        return False
    if isinstance(error, RuntimeError):
        return any(message in str(error) for message in DAMAGE_MESSAGES)
    return True


def newest_valid_checkpoint(run_dir, map_location="cpu", weights: bool = True,
                            peek: bool = False) -> tuple[dict | None, Path | None, dict[Path, str]]:
    """(state, path) of the newest checkpoint of a run directory that loads and validates, or (None, None) when
    none does, and {path: what is wrong} of the newer ones that did not (newest first). `weights`, `peek`: as in
    load_checkpoint_file."""
    damaged = {}
    for candidate in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint_file(candidate, map_location, weights, peek), candidate, damaged
        except CheckpointDamaged as e:  # anything else (the disk, memory, a version) stops the lookup
            damaged[candidate] = str(e)
    return None, None, damaged


def end_step(max_steps: int, stop_at_step: int) -> int:
    """The step a run ends at: --stop-at-step when set (0: not set) and below --max-steps, else --max-steps."""
    return min(max_steps, stop_at_step) if stop_at_step else max_steps


def steps_left(saved_step: int, path, max_steps: int, stop_at_step: int) -> int:
    """Steps a resume from the checkpoint `path`, taken after `saved_step` steps, trains to the run's last step: 0
    when it is there already. A checkpoint past it is one line naming the flags to raise: a run never trains past
    its last step (nor prunes, as it saves, the checkpoints it went past)."""
    left = end_step(max_steps, stop_at_step) - saved_step
    if left < 0:
        flags = [f"{flag} above {saved_step}" for flag, value in (("--max-steps", max_steps),
                                                                  ("--stop-at-step", stop_at_step))
                 if 0 < value <= saved_step]
        raise UserError(f"--resume: the newest good checkpoint {path} is at step {saved_step}, past this run's last "
                        f"step {saved_step + left} (--max-steps {max_steps}"
                        + (f", --stop-at-step {stop_at_step}" if stop_at_step else "") + "); nothing was changed: "
                        "to train on, resume with " + " and ".join(flags))
    return left


def check_model_config(model_config, state: dict, path: Path, ignore=()) -> None:
    """Refuse a checkpoint whose model config differs from a run's (in fields other than `ignore`)."""
    ours, theirs = dataclasses.asdict(model_config), state["model_config"]
    diff = {k: (v, theirs.get(k)) for k, v in ours.items() if theirs.get(k) != v and k not in ignore}
    if diff:
        raise UserError(f"checkpoint {path} is from a different model config (field: (ours, checkpoint's)): {diff}")


INIT_IGNORED_FIELDS = ("attn_dropout", "ffn_dropout")  # --init-from: a new run may change these


def skipping_line(candidate: Path, error: str) -> str:
    """The warning for a damaged checkpoint a reader falls back past: its damage message without the path said
    twice and without the advice to use an earlier checkpoint, which the fallback is doing."""
    reason = error.removesuffix("; use an earlier checkpoint")
    for named in (f"sharded checkpoint {candidate} ", f"checkpoint {candidate} ", f"{candidate} "):
        if reason.startswith(named):
            reason = "it " + reason.removeprefix(named)
    return f"skipping {candidate}: {reason}; an earlier checkpoint is used"


def load_checkpoint(path, map_location="cpu", peek: bool = False) -> tuple[dict, Path]:
    """Load a checkpoint file (or sharded checkpoint folder), or the newest valid checkpoint of a run directory
    (corrupt ones skipped, with a warning). Returns (state, file path). peek=True: the check before a run that will
    load it (load_checkpoint_file's peek; read-only, cheap, no warning: the load warns)."""
    path = Path(path)
    if not path.is_dir() or is_sharded_checkpoint(path):
        return load_checkpoint_file(path, map_location, peek=peek), path
    state, found, damaged = newest_valid_checkpoint(path, map_location, peek=peek)
    if state is None:
        if damaged:
            raise UserError(f"every checkpoint in {checkpoint_dir(path)} is corrupt ("
                            + "; ".join(error.removesuffix("; use an earlier checkpoint") for error in damaged.values())
                            + "); start a new run")
        if path.name == "checkpoints" and list_checkpoints(path.parent):  # a run's checkpoint folder itself
            raise UserError(f"no checkpoint in {path}: it is the checkpoint folder of the run directory {path.parent}; "
                            "give that, or one checkpoint in it")
        raise UserError(f"no checkpoint in {checkpoint_dir(path)}; train first, or pass a checkpoint file")
    for candidate, error in damaged.items() if not peek else ():  # once per node under torchrun, not per process
        warn(skipping_line(candidate, error))
    return state, found


# ----------------------------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP), written with torch.distributed.checkpoint (DCP)

def save_sharded_checkpoint(path, model, optimizer, extra: dict, group=None) -> None:
    """Write the checkpoint folder `path` (checkpoint_path(..., sharded=True)); every process calls this.
    Each writes its shards into a temporary sibling folder .step_NNNNNN.tmpPID (PID: rank 0's), rank 0 adds
    train_state.pt ({"format", **extra}), then renames the complete folder to `path`: a kill at any point leaves the
    earlier checkpoints as they were and at most the temporary folder (remove_orphaned_temp_files); a
    failure removes the temporary folder (a full disk: one line with the sizes, as for a .pt file).
    `group`: the process group for DCP's host-side coordination (gloo), None for the default one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    path = Path(path)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tmp = path.with_name(f".{path.name}.tmp{_rank0_value(os.getpid(), group)}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    error = None
    try:
        _dcp_call(dcp.save, state, tmp, group, path)
        if rank0:  # every shard and DCP's index are written (dcp.save returns after rank 0 wrote the index)
            with atomic_write(tmp / STATE_FILE) as f:
                torch.save({"format": FORMAT, **extra}, f)
            fsync_dir(tmp)
            tmp.rename(path)
            fsync_dir(path.parent)
    except BaseException as e:
        error = e
    failed = _rank0_value(f"{type(error).__name__}: {error}" if error and rank0 else None, group)
    if error is not None and rank0:  # every process is done with the folder (a collective failed on all)
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(error, OSError):
        raise no_room_error(error, path, tensor_bytes(state)) from error
    if error is not None:
        raise error
    if failed:  # rank 0 failed after the shards were written: every process stops with it
        raise UserError(f"checkpoint {path} was not written: rank 0 failed ({failed})")


def _rank0_value(value, group):
    """Rank 0's `value`, on every process (host objects over `group`)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _dcp_call(function, state: dict, folder: Path, group, what: Path) -> None:
    """dcp.save or dcp.load of `state` in `folder`. A file system fault on any process (DCP collects every
    process's errors into one CheckpointException, which is no Exception) becomes one line naming it."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        function(state, checkpoint_id=folder, process_group=group)
    except CheckpointException as e:
        failures = [failure[0] for failure in e.failures.values()]
        os_error = next((f for f in failures if isinstance(f, OSError)), None)
        if os_error is not None:
            raise os_error
        first = failures[0] if failures else e
        raise RuntimeError(f"checkpoint {what}: {type(first).__name__}: {first}") from first


# ----------------------------------------------------------------------------------------------------------------
# Loading a checkpoint's training state into any layout

def load_training_state(model, optimizer, state: dict, path, group=None) -> None:
    """Put a checkpoint's weights and AdamW moments (and step counts) into this run's model and optimizer; every
    process calls this. `path` is a sharded checkpoint folder (read with DCP: each process reads just its shards,
    or full tensors for a plain model) or a .pt file whose loaded dict is `state` (full tensors: each process keeps
    its slice). `model` is FSDP-sharded or plain (one process, or the module DDP will wrap). The optimizer keeps
    this run's settings (betas, eps, weight decay, fused/foreach): only moments and step counts are loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    # torch's helpers build the AdamW state to load into (a step at lr 0) only while no gradient is held: without
    # this, held gradients would leave that state empty and the checkpoint's moments unloaded
    optimizer.zero_grad(set_to_none=True)
    names = _param_names(model, optimizer)
    path = Path(path)
    if path.is_dir():
        saved = {"model": get_model_state_dict(model),  # this run's tensors (shards or full), filled in place
                 "optimizer": {"state": get_optimizer_state_dict(model, optimizer)["state"]}}
        _dcp_call(dcp.load, saved, path, group, path)
        options = StateDictOptions()
    else:
        saved = {"model": state["model"], "optimizer": {"state": _state_by_name(names, state["optimizer"])}}
        options = StateDictOptions(full_state_dict=True)  # full tensors: each process keeps its slice
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": group_names}
              for group, group_names in zip(optimizer.param_groups, names)]  # this run's settings, by name
    set_model_state_dict(model, saved["model"], options=options)
    set_optimizer_state_dict(model, optimizer, {"state": saved["optimizer"]["state"], "param_groups": groups},
                             options=options)


def _param_names(model, optimizer) -> list[list[str]]:
    """The parameter names of each of the optimizer's groups, in the optimizer's order."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _state_by_name(names: list[list[str]], saved: dict) -> dict:
    """A torch optimizer state_dict's per-parameter state, keyed by position in its param groups, keyed by
    parameter name instead. Positions follow model.configure_optimizer's groups, which built this run's optimizer
    (`names`) too."""
    shape = [len(g["params"]) for g in saved["param_groups"]]
    if shape != [len(group) for group in names]:
        raise UserError(f"the checkpoint's optimizer has parameter groups of {shape} tensors, this model's "
                        f"{[len(group) for group in names]}; resume with the code that wrote it")
    flat_names = [name for group in names for name in group]
    positions = [i for g in saved["param_groups"] for i in g["params"]]
    return {name: saved["state"][i] for name, i in zip(flat_names, positions) if i in saved["state"]}


# ----------------------------------------------------------------------------------------------------------------
# A training run's checkpoints: what to resume, saving, pruning

RESUME_STATE_KEYS = ("model_config", "model", "optimizer", "train_config", "step", "tokens_seen", "world_size",
                     "micro_batch", "loader", "rng")  # a training checkpoint's entries, in the order a save writes them


def checkpoint_to_resume(run_dir, max_steps: int, stop_at_step: int,
                         allow_fresh_start: bool) -> tuple[dict | None, Path | None, dict[Path, str], int]:
    """--resume's choice, read-only (a run and train.py --check both use it): (state, path, damaged, steps left) of
    the newest valid checkpoint of `run_dir` ({path: what is wrong} of newer damaged ones). Refused (UserError): a
    checkpoint without training state (a weights-only file), one past the run's last step (steps_left), and, without
    `allow_fresh_start`, a run directory whose checkpoints are all damaged or that has none. Nothing is moved."""
    folder = checkpoint_dir(run_dir)
    # a sharded checkpoint's weights stay on disk: load_training_state reads them straight into the run's layout
    state, path, damaged = newest_valid_checkpoint(run_dir, map_location="cpu", weights=False)
    if state is not None:
        in_shard_files = ("model", "optimizer") if is_sharded_checkpoint(path) else ()
        missing = [key for key in RESUME_STATE_KEYS if key not in state and key not in in_shard_files]
        if missing:  # a weights-only file (export_hf --from-hf) is refused before anything is touched
            raise UserError(f"checkpoint {path} holds no training state ({', '.join(missing)} missing); start a new "
                            f"run from its weights with --init-from {path}")
        return state, path, damaged, steps_left(state["step"], path, max_steps, stop_at_step)
    if damaged and not allow_fresh_start:
        raise UserError(f"--resume: every checkpoint in {folder} is damaged (" + "; ".join(damaged.values())
                        + "). Nothing was changed: add --allow-fresh-start to move them aside (renamed "
                        "*.damaged) and train again from step 0")
    if not allow_fresh_start:
        raise UserError(f"--resume: no checkpoint in {folder}; add --allow-fresh-start to start from scratch "
                        "when there is none")
    return None, None, damaged, 0


class RunCheckpoints:
    """One process's handle on a training run's checkpoints. Rank 0 alone moves and deletes files; the other
    processes wait for it where they must read what it left. `log` prints on rank 0 (train.py's RunLog.info)."""

    def __init__(self, run_dir: Path, d: Dist, log, sharded: bool, keep: int):
        self.run_dir, self.d, self.log, self.sharded, self.keep = run_dir, d, log, sharded, keep

    def remove_orphans(self) -> None:
        """Rank 0 deletes the temporary files of killed saves (at the start, and before each save: their space may
        be what it needs)."""
        if self.d.is_main:
            for path in remove_orphaned_temp_files(self.run_dir):
                self.log(f"removed {path}, the temporary file of a save that was killed")

    def to_resume(self, max_steps: int, stop_at_step: int, allow_fresh_start: bool,
                  accept=lambda state, path: None, finished: bool = True) -> tuple[dict, Path] | None:
        """(state, path) of the newest valid checkpoint, or None for a fresh start (only with allow_fresh_start).
        Damaged checkpoints newer than it are moved aside (renamed *.damaged, never deleted) and the steps they held
        are named as lost; rank 0 does this first, then every process finds the same. A checkpoint already at the
        run's last step ends the process (status 0), touching nothing, when the run is `finished` (its last
        evaluations logged: else the run resumes to run them); so does `accept(state, path)` raising (the
        run's settings cannot continue it: a UserError on every process, each finding the same checkpoint)."""
        if not self.d.is_main:
            self.d.barrier()
        try:
            state, path, damaged, left = checkpoint_to_resume(self.run_dir, max_steps, stop_at_step,
                                                              allow_fresh_start)
            if state is not None and left == 0 and (finished or state["step"] != max_steps):
                self._nothing_to_train(state, path, damaged)
            if state is not None:
                accept(state, path)
            if damaged and self.d.is_main:
                self._set_aside_damaged(damaged, state)
        finally:
            if self.d.is_main:
                self.d.barrier()
        if state is None:
            self.log(f"resume: WARNING: no valid checkpoint in {checkpoint_dir(self.run_dir)}, training starts from "
                     "step 0" + (" (every checkpoint was damaged)" if damaged else ""))
            return None
        return state, path

    def _nothing_to_train(self, state: dict, path: Path, damaged: dict[Path, str]):
        if self.d.is_main:
            for candidate, error in damaged.items():  # named, though left in place: nothing is touched
                print(f"warning: {skipping_line(candidate, error)}", file=sys.stderr)
            print(f"resume: {path} is at step {state['step']}, this run's last step: nothing to train, nothing changed")
        raise SystemExit(0)

    def _set_aside_damaged(self, damaged: dict[Path, str], state: dict | None) -> None:
        for error, new in zip(damaged.values(), set_aside(list(damaged), ".damaged")):
            self.log(f"resume: WARNING: moved a damaged checkpoint aside to {new}: {error}")
        lost = max(checkpoint_step(p) for p in damaged)
        self.log(f"resume: WARNING: steps {state['step'] + 1 if state else 1}-{lost} are lost and will be trained "
                 "again: the newest good checkpoint is " + (f"step {state['step']}" if state else "none"))

    def save(self, state: dict, model, optimizer) -> Path:
        """state (a Trainer's state_dict) as a .pt file written by rank 0, or sharded: a folder every process writes
        its shards of `model` and `optimizer` into. Then rank 0 prunes to the newest `keep`. Every process calls
        this and returns once the checkpoint is complete."""
        path = checkpoint_path(self.run_dir, state["step"], sharded=self.sharded)
        self.remove_orphans()
        if self.sharded:
            extra = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
            save_sharded_checkpoint(path, model, optimizer, extra, group=self.d.control)
        elif self.d.is_main:
            save_checkpoint(state, path)
        if self.d.is_main:
            prune_checkpoints(self.run_dir, self.keep, saved=path)
            self.log(f"step {state['step']:6d} | checkpoint {path}")
        self.d.barrier()
        return path


# ----------------------------------------------------------------------------------------------------------------
# Models from checkpoints

def load_model(path, device="cpu"):
    """The GPT of a checkpoint file, or of a run directory's newest valid checkpoint, in eval mode."""
    state, file = load_checkpoint(path, map_location="cpu")
    return model_from_state(state, file, device)


def model_from_state(state: dict, source, device="cpu"):
    """The GPT of a loaded checkpoint dict (`source` names it in errors), in eval mode. The model is built on the
    meta device and materialized once on `device`: no random init of weights that are overwritten anyway."""
    try:
        config = GPTConfig.from_dict(state["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointDamaged(f"checkpoint {source} has an invalid model config: {e}") from e
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointDamaged(f"checkpoint {source} does not match its model config: {str(e).splitlines()[0]}")
    model.reset_rope_tables()
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# RNG states (one per rank in a training checkpoint)

def rng_state() -> dict:
    """This process's Python, numpy, torch (and CUDA) generator states, as types weights_only loading accepts."""
    np_state = np.random.get_state()  # numpy arrays are not allowed in a weights_only file: the key becomes a tensor
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() packed (a saved CUDA state only where CUDA is available)."""
    def to_tuples(x):  # torch.load gives back Python's state as nested lists
        return tuple(to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
    random.setstate(to_tuples(state["python"]))
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def checkpoint_step(path) -> int:
    """The step a checkpoint's name says it holds: step_000250.pt (or a step_000250 folder) -> 250."""
    return int(re.match(r"step_(\d+)", Path(path).name).group(1))
