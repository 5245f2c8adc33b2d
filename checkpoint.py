"""Checkpoint files: atomic writes, discovery of the newest valid one in a run directory, validated loads.

A checkpoint is one `torch.save` file, RUN_DIR/checkpoints/step_NNNNNN.pt, holding a dict with at least
`format`, `model_config` (GPTConfig as a dict) and `model` (a plain, uncompiled state_dict); train.py adds the
optimizer, step, loader and RNG state. Files are written to a temporary name, fsynced and renamed, so a kill
during a save never leaves a damaged file under a checkpoint name.
"""
import re
import sys
from pathlib import Path

import torch

from cli import UserError, atomic_write

FORMAT = "lf-llm-checkpoint-v1"
_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:06d}.pt"


def list_checkpoints(run_dir) -> list[Path]:
    """Checkpoint files of a run directory, oldest step first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict, path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, **state}, f)


def prune_checkpoints(run_dir, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all)."""
    if keep > 0:
        for path in list_checkpoints(run_dir)[:-keep]:
            path.unlink(missing_ok=True)


def quarantine_checkpoints(run_dir, from_step: int) -> None:
    """Rename checkpoints of step >= from_step to *.pt.nonfinite (kept for inspection, never picked by a resume)."""
    for path in list_checkpoints(run_dir):
        if int(_NAME.match(path.name).group(1)) >= from_step:
            path.rename(path.with_name(path.name + ".nonfinite"))


def load_checkpoint_file(path, map_location="cpu") -> dict:
    """Load and validate one checkpoint file; UserError when it is missing, truncated or not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated/garbled files
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); use an earlier checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT or not {"model", "model_config"} <= state.keys():
        raise UserError(f"{path} is not a checkpoint of this repo (no '{FORMAT}' model state in it)")
    return state


def load_checkpoint(path, map_location="cpu") -> tuple[dict, Path]:
    """Load a checkpoint file, or the newest valid checkpoint of a run directory (corrupt ones skipped, with a
    warning). Returns (state, file path)."""
    path = Path(path)
    if not path.is_dir():
        return load_checkpoint_file(path, map_location), path
    candidates = list_checkpoints(path)
    if not candidates:
        raise UserError(f"no checkpoint in {checkpoint_dir(path)}; train first, or pass a checkpoint file")
    for candidate in reversed(candidates):
        try:
            return load_checkpoint_file(candidate, map_location), candidate
        except UserError as e:
            print(f"warning: skipping {candidate}: {e}", file=sys.stderr)
    raise UserError(f"every checkpoint in {checkpoint_dir(path)} is corrupt; start a new run")
