"""What every command-line script here shares: user errors as one clear line, and the run header."""
import argparse
import contextlib
import functools
import os
import platform
import subprocess
import sys
import traceback
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent


class UserError(Exception):
    """A mistake the user can fix (bad path, flag, corrupt file). Scripts print it as one line, no traceback."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main_entry(main=None, *, memory_hint: str = "use a smaller batch"):
    """Wrap a script's main(): a UserError, or running out of GPU memory, becomes `error: ...` on stderr and exit
    status 2. `@main_entry(memory_hint=...)` names the flags that lower the script's memory use."""
    if main is None:
        return functools.partial(main_entry, memory_hint=memory_hint)

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Exception as e:
            if not is_device_out_of_memory(e):
                raise
            detail, where = (str(e).splitlines() or [""])[0], repo_frame(e)
            print(f"error: out of GPU memory{f' ({detail})' if detail else ''}{f' in {where}' if where else ''}; "
                  f"{memory_hint}", file=sys.stderr)
            sys.exit(2)
    return wrapper


def repo_frame(error: Exception) -> str:
    """'train.py:497 (train_step)': the innermost frame of this repo's code in the error's traceback, or ''."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if Path(f.filename).parent == REPO_DIR and Path(f.filename).name != "cli.py"]  # not main_entry's own
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""


def is_device_out_of_memory(error: Exception) -> bool:
    torch = sys.modules.get("torch")  # only a script that imported torch can run out of GPU memory
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Write `path` all or nothing: yields a temporary file beside it; on success it is fsynced and renamed over
    `path` and the folder fsynced, so a reader (or a crash) sees the old file or the whole new one, never a part.
    On an error the temporary file is removed. Used for checkpoints, shards, manifests and result files."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def git_commit() -> str:
    """The repo's commit (with '-dirty' when the tree has changes), or 'unknown' outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def hardware_name(device) -> str:
    """'NVIDIA H100 80GB HBM3' for a GPU; 'cpu (x86_64, 2 threads)' otherwise."""
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_header(device) -> list[str]:
    """The first lines of every run's log: commit, library versions, hardware."""
    import numpy
    import torch
    hardware = hardware_name(device)
    if device.type == "cuda":
        hardware += f" x{torch.cuda.device_count()} (CUDA {torch.version.cuda})"
    return [
        f"commit: {git_commit()}",
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}",
        f"host: {platform.node()}, device: {hardware}",
    ]
