"""What every command-line script here shares: user errors as one clear line, and the run header."""
import argparse
import contextlib
import errno
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
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


def path_arg(text: str) -> str:
    """argparse type: a file or folder path. An empty one (a shell variable that was never set, say) is refused: as
    a Path it reads '.', the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a file or folder")
    return text


def finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or infinite (float() accepts 'nan' and 'inf')."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors (a bad flag value, an unknown flag, a missing argument) are one line,
    `error: PROG: MESSAGE; see PROG --help`, status 2, no usage block: the same as every other user error (fail).
    Every flag value that does not convert is named, not only the first (argparse stops at the first). Subparsers
    (add_subparsers) are of this class too."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_values = []  # what the parse under way found wrong so far (flag values that do not convert)

    def parse_known_args(self, args=None, namespace=None):
        self.bad_values = []
        namespace, extras = super().parse_known_args(args, namespace)
        if self.bad_values:  # named with the flags left over, which no parser of the program takes
            self.error(f"unrecognized arguments: {' '.join(extras)}" if extras else self.bad_values.pop())
        return namespace, extras

    def _get_values(self, action, arg_strings):
        try:
            return super()._get_values(action, arg_strings)
        except argparse.ArgumentError as e:
            if action.nargs in (argparse.PARSER, argparse.REMAINDER):  # a subcommand: nothing to go on with
                raise
            self.bad_values.append(str(e))  # noted; the parse goes on to find the others
            return action.default

    def error(self, message: str):
        fail(f"{self.prog}: {'; '.join([*self.bad_values, message])}; see {self.prog} --help")


def main_entry(main=None, *, memory_hint: str = "use a smaller batch"):
    """Wrap a script's main(): a UserError, a filesystem fault (no space, read-only, permission, ...), or running out
    of GPU memory becomes `error: ...` on stderr and exit status 2; Ctrl-C becomes one line and exit status 130.
    `@main_entry(memory_hint=...)` names the flags that lower the script's memory use."""
    if main is None:
        return functools.partial(main_entry, memory_hint=memory_hint)

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted (Ctrl-C)", status=130)
        except Exception as e:
            if is_device_out_of_memory(e):
                detail, where = (str(e).splitlines() or [""])[0], repo_frame(e)
                fail(f"out of GPU memory{f' ({detail})' if detail else ''}{f' in {where}' if where else ''}; "
                     f"{memory_hint}")
            if is_host_out_of_memory(e):
                fail(f"out of memory ({str(e).split('DefaultCPUAllocator: ')[-1].splitlines()[0]}) in "
                     f"{repo_frame(e)}; {memory_hint}")
            os_error = os_error_in(e)
            if os_error is None:
                raise
            fail(os_error_text(os_error))  # the path, what failed, what to do: no source line, the user has none
    return wrapper


def raise_all(*checks) -> list:
    """Run every check (a callable that raises UserError for a problem) and name every problem found in one
    UserError, "; "-joined, in the order given; a single one is raised as it is (its type kept: CheckpointDamaged).
    So a command line with a bad checkpoint, a bad --out and a bad flag names all three, not the first. When none
    fails: what each check returned, in order (a check that reads something hands it on)."""
    results, errors = [], []
    for check in checks:
        try:
            results.append(check())
        except UserError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise UserError("; ".join(map(str, errors)))
    return results


def utf8_lines(lines):
    """(line number, text, problem) for each line of an iterable of byte lines, each with its line end (a file
    opened "rb", io.BytesIO): the decoded text and "", or None and 'not UTF-8 at byte B (REASON)' (B counted from
    the start of the file). The one place an input file's undecodable bytes are located."""
    offset = 0
    for number, raw in enumerate(lines, start=1):
        try:
            yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8"), ""  # (a byte order mark is no text)
        except UnicodeDecodeError as e:
            yield number, None, f"not UTF-8 at byte {offset + e.start} ({e.reason})"
        offset += len(raw)


def read_text_lines(path, what: str) -> list[str]:
    """The lines of a UTF-8 text file a flag names (without their line ends), or a UserError naming `what` (the
    flag) and the file: a folder, a missing file, or the line and byte offset of the first bytes that are not UTF-8.
    (Another OSError, such as a file without read permission, is main_entry's one line.)"""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a UTF-8 text file")
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    with open(path, "rb") as f:
        lines = []
        for number, text, problem in utf8_lines(f):
            if problem:
                raise UserError(f"{what} {path} line {number}: {problem}; save the file as UTF-8")
            lines.append(text.rstrip("\r\n"))
    return lines


QUIET_RANK_EXIT_DELAY_S = 5.0  # how long a torchrun worker that prints no error waits before it exits (fail)


def fail(message: str, status: int = 2):
    """`error: MESSAGE` on stderr and exit `status`. Under torchrun every process of a node meets the same error (the
    checks run on every rank, and ranks raise together): each node's local rank 0 says it once, the others exit with
    the same status quietly. Per node, not per job: a node's own files (its data copy, its output folder) can fail
    there alone, and its local rank 0 is the process that checks them (the shards' sha256, say)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    else:  # torchrun ends every worker once one has failed: a quiet one must not take local rank 0 down unheard
        time.sleep(QUIET_RANK_EXIT_DELAY_S)
    sys.exit(status)


def warn(message: str) -> None:
    """`warning: MESSAGE` on stderr, from each node's local rank 0 only (as fail): under torchrun every process meets
    the same damaged checkpoint, and the user needs to read about it once."""
    if os.environ.get("LOCAL_RANK", "0") != "0":  # another process of this node says it
        return
    print(f"warning: {message}", file=sys.stderr)


# What to do about the filesystem faults a user can fix; other OS errors get the system's message only.
OS_ERROR_ADVICE = {
    errno.ENOSPC: "free disk space or choose another location",
    errno.EDQUOT: "the disk quota is used up; free space or choose another location",
    errno.EFBIG: "the file size limit (ulimit -f) is lower than this file; raise it or choose another location",
    errno.EROFS: "the filesystem is read-only; choose a writable location",
    errno.EACCES: "check the permissions, or choose another location",
    errno.EPERM: "check the permissions, or choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a folder; fix the path",
    errno.EISDIR: "it is a folder; give a file path",
    errno.ENOENT: "check the path",
    errno.EEXIST: "something else is already there; choose another path",
}


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind `error`: itself or one in its __cause__ chain, or in the __context__ of a RuntimeError
    (libraries re-raise OS faults as their own types: torch.save's writer turns 'File too large' into a
    RuntimeError). Any other error raised while an OSError was being handled is a bug of its own: not followed."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or (error.__context__ if type(error) is RuntimeError else None)
    return None


def os_error_text(error: OSError) -> str:
    """'PATH: No space left on device [Errno 28]; free disk space ...': the path, what failed, what to do."""
    path = f"{error.filename}: " if error.filename is not None else ""
    reason = error.strerror or str(error) or type(error).__name__
    code = f" [Errno {error.errno}]" if error.errno else ""
    advice = OS_ERROR_ADVICE.get(error.errno)
    return f"{path}{reason}{code}{f'; {advice}' if advice else ''}"


def ensure_writable_dir(folder, what: str) -> Path:
    """`folder` (and its parents) made, once check_writable_dir passed it, so that an output location that cannot be
    written is refused before long work starts, not after it. `what` names it ('--out')."""
    folder = check_writable_dir(folder, what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {folder} is not writable: {os_error_text(e)}") from e
    return folder


def first_new_folder(path: Path) -> Path | None:
    """The outermost folder of `path` (itself or a parent) that does not exist yet: the first mkdir creates it."""
    if path.exists() or path.is_symlink():
        return None
    while not (path.parent.exists() or path.parent == path):
        path = path.parent
    return path


def remove_empty_folders(out: Path, made: Path) -> None:
    """Remove `out` and its parents up to `made` while they are empty (rmdir never removes a folder holding
    anything, so a folder this run wrote into, or someone else's, stays)."""
    for folder in [out, *out.parents]:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == made:
            return


def lock_exclusively(path: Path):
    """`path` (made if missing) opened and holding an exclusive fcntl.flock, or None when another process holds a
    lock on it. The kernel drops a lock when its holder ends, however it ends (kill -9 too): none outlives its run."""
    import fcntl  # (here: POSIX only, and only the tools that lock need it)
    file = open(path, "a")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return file
    except BlockingIOError:
        file.close()
        return None


def locked_by_another(path: Path) -> str | None:
    """The pid of the process holding an exclusive lock of `path` ('unknown' off Linux), or None when `path` is free
    or missing; tried with a shared lock held for no time, nothing written (two such tries never see each other)."""
    import fcntl
    try:
        file = open(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return lock_holder(path)


def lock_holder(path: Path) -> str:
    """The pid holding the exclusive flock of `path`, as Linux lists it in /proc/locks ('unknown' elsewhere; matched
    by inode number alone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        inode = path.stat().st_ino
        for line in Path("/proc/locks").read_text().splitlines():  # "1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE .."
            fields = line.split()
            if fields[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and int(fields[5].split(":")[-1]) == inode:
                return fields[4]
    return "unknown"


def check_writable_dir(folder, what: str) -> Path:
    """That `folder`, or the nearest of its parents that exists (the rest is made when the output is written), is a
    folder a file can be created in; nothing is made or left behind (a probe file is created and removed), so it can
    run beside the other checks of a command line that may yet stop on another problem."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise UserError(f"{what} {folder} is not writable: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{what} {folder} is not writable: no file can be created in {existing} ({e.strerror})") \
            from e
    return folder


def repo_frame(error: Exception) -> str:
    """'train.py:497 (train_step)': the innermost frame of this repo's code in the error's traceback, or ''."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if Path(f.filename).parent == REPO_DIR and Path(f.filename).name != "cli.py"]  # not main_entry's own
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""


def is_host_out_of_memory(error: Exception) -> bool:
    """Whether torch failed to allocate a tensor in the machine's memory (its CPU allocator raises RuntimeError)."""
    return isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)


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
    except BaseException as e:
        with contextlib.suppress(OSError):  # a cleanup that fails must not hide the error that matters
            tmp.unlink(missing_ok=True)
        os_error = os_error_in(e)
        if os_error is not None and os_error.filename is None:  # a failed write() names no file: name it
            raise OSError(os_error.errno, os_error.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)


def fsync_dir(folder) -> None:
    """Make the entries of `folder` (files created or renamed in it) survive a crash."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path, obj, written_by: str | None = None) -> None:
    """`obj` as indented JSON, written all or nothing (atomic_write): results, manifests and configs. A result file
    (`written_by`, the tool: 'hellaswag_eval.py', 'bench.py gpu') carries it as its first key, RESULT_MARKER, and
    replaces only a result of the same tool (check_result_out, checked again here just before the rename)."""
    if written_by is not None:
        check_result_target(Path(path), written_by)
        obj = {RESULT_MARKER: written_by, **obj}
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # (check_result_out made none: the work might have failed)
    with atomic_write(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")


RESULT_MARKER = "written_by"  # the top-level key of a JSON result file: the tool that wrote it
MAX_RESULT_BYTES = 64 << 20  # no result is larger: a bigger file is not read to find out it is not one


def is_result_of(path: Path, written_by: str) -> bool:
    """Whether `path` is a JSON result file of the tool of `written_by` (its script: 'bench.py' for 'bench.py gpu'):
    a JSON object whose RESULT_MARKER names that script. A checkpoint, a run's config.json, metrics.jsonl, an older
    result without the marker are not."""
    script = written_by.split(" ")[0]
    try:
        if not path.is_file() or path.stat().st_size > MAX_RESULT_BYTES:
            return False
        with open(path, "rb") as f:
            if f.read(64).lstrip()[:1] != b"{":  # a checkpoint (zip), a shard: not read any further
                return False
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):  # ValueError: not UTF-8, not JSON
        return False
    marker = obj.get(RESULT_MARKER) if isinstance(obj, dict) else None
    return isinstance(marker, str) and marker.split(" ")[0] == script


def check_result_target(path: Path, written_by: str, what: str = "--out") -> None:
    """Refuse (UserError) a result path that is a folder, or an existing file that is not a result of this tool."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file path such as {path / 'result.json'}")
    if (path.exists() or path.is_symlink()) and not is_result_of(path, written_by):
        script = written_by.split(" ")[0]
        raise UserError(f"{what} {path} exists and is not a result {script} wrote (no \"{RESULT_MARKER}\": "
                        f"\"{script}...\" key): {script} replaces only its own results; remove it or choose another "
                        f"{what}")


def check_result_out(path, written_by: str, what: str = "--out") -> Path:
    """Check a JSON result's path up front, before any work: not a folder, not someone else's file (a checkpoint, a
    run's config.json: only a result of the same tool is replaced), and its folder writable (made only when the result
    is written)."""
    path = Path(path)
    check_result_target(path, written_by, what)
    check_writable_dir(path.parent, f"{what}'s folder")
    return path


def run_and_write_result(work, args, written_by: str) -> dict:
    """work(args)'s result, written to args.out (when given) as a JSON result of `written_by`: the path is checked
    before the work starts (check_result_out), so a bad --out costs nothing."""
    if args.out:
        check_result_out(args.out, written_by)
    result = work(args)
    if args.out:
        write_json(args.out, result, written_by=written_by)
        print(f"wrote {args.out}")
    return result


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
