"""Tokenize a text corpus into fixed-size uint16 shards plus a manifest.json (format: see shards.py).

  python data_prep.py --source hf --out data/fineweb_edu_10bt                 # FineWeb-Edu sample-10BT (download)
  python data_prep.py --source files --files 'corpus/*.jsonl' --out data/mine  # local .txt/.jsonl/.json/.parquet
  python data_prep.py --source embedded --out data/shakespeare                # the committed tiny-shakespeare text

Every source becomes a sequence of documents; each document is tokenized with the repo's GPT-2 BPE and written as
<|endoftext|> followed by its tokens. The first --val-tokens tokens of that stream form the val shards, the rest the
train shards, each --shard-tokens long (the last of each split shorter). Documents are tokenized in a process pool;
the results come back in input order, so the output is the same for any --workers.

Documents: a row of a Hugging Face / json / parquet dataset (its --text-field); a paragraph of a .txt file (text
between blank lines, datasets' sample_by="paragraph"); for the embedded corpus the same: one speech per document, so
`--source files --files assets/corpus/tinyshakespeare.txt` gives the same shards as `--source embedded`. Empty
documents are skipped.

Reading: --source hf has datasets resolve the files of --name/--split from the `configs:` of the dataset card
(datasets.load_dataset_builder), for a hub id (at one commit, pinned first) or a local copy alike. Parquet files
(FineWeb-Edu's) are downloaded with huggingface_hub, in order and ahead of the tokenizer, and read by the workers
themselves, a row-group slice a task: no Arrow cache is written, so the disk needed is the download plus the
shards. Local .parquet --files are read the same way. Other files (.txt, .json/.jsonl, non-parquet hub datasets)
go through datasets.load_dataset, which first converts them to an Arrow cache; --streaming reads any source through
datasets without a cache, in the main process.

Validation size: --val-tokens, or by default one shard's worth; a corpus smaller than that default gets the first
VAL_SHARE (10%) of its tokens for validation instead. The output says so, and the manifest records it (val_share).

Output: one directory per dataset. A build is written into a folder inside it (.data_prep-build) and moved into place
only once it is complete and usable, manifest.json last: a run that fails or is stopped leaves --out as it was, a
finished dataset included. A directory without a manifest is unfinished. A rerun on a finished directory with the
same settings (every shard hashing right) says so and exits 0; any other non-empty --out is refused unless
--overwrite, which replaces what data_prep.py wrote there (never other files).
"""
import argparse
import cli
import collections
import contextlib
import math
import multiprocessing
import os
import re
import signal
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

import shards
import tokenizer
from cli import (UserError, check_writable_dir, ensure_writable_dir, first_new_folder, fsync_dir, lock_exclusively,
                 locked_by_another, main_entry, path_arg, positive_int, remove_empty_folders, warn)
from data_sources import (DOCS_PER_TASK, ParquetSlice, load_texts, not_text, parquet_problems, source_record,
                          token_bound)

TOOL_VERSION = 1  # bump when the same input and settings would give different shards
# ~10% of the embedded corpus's ~338k tokens: one shard's worth (the default elsewhere) would leave no train split.
EMBEDDED_VAL_TOKENS = 32_768
DEFAULT_SHARD_TOKENS = 100_000_000
POOL_STOP_WAIT_S = 30  # how long an early stop waits for the tasks the workers hold
VAL_SHARE = 0.1  # of a corpus smaller than the default --val-tokens, taken for validation
# The least a split must hold to be used: one window of the smallest preset's context (debug, 128 tokens) plus the
# token after it, the last target (data_prep imports no model code: test_data_prep checks it against model.PRESETS)
MIN_SPLIT_TOKENS = 129
_OUR_FILE = re.compile(r"^(\.?(train|val)_\d{6}\.bin(\.tmp\d*)?|manifest\.json|\.manifest\.json\.tmp\d*)$")
STAGING_NAME = ".data_prep-build"  # the folder inside --out a build is written to before it is moved into place
STAGING_LOCK = ".lock"  # in the staging folder: locked by the run building there (cli.lock_exclusively)


# ----------------------------------------------------------------------------------------------------------------
# Command line

def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["hf", "files", "embedded"], required=True,
                   help="hf: a Hugging Face dataset (--dataset/--name/--split); files: local files (--files); "
                        "embedded: the tiny-shakespeare text committed in assets/corpus/")
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="Hugging Face dataset (default: %(default)s)")
    p.add_argument("--name", default="sample-10BT", help="its config name (default: %(default)s)")
    p.add_argument("--split", default="train", help="its split (default: %(default)s)")
    p.add_argument("--streaming", action="store_true",
                   help="hf/files: stream the dataset instead of downloading and preparing it first (default: off);"
                        " reading then happens in the main process, so it suits --max-docs/--max-tokens slices")
    p.add_argument("--files", nargs="+", metavar="PATH", type=path_arg,
                   help="local .txt, .jsonl/.json or .parquet files (one kind per run); globs allowed, e.g. "
                        "'dir/*.jsonl' (quote them); read in sorted order")
    p.add_argument("--out", type=path_arg, required=True, help="output directory, one per dataset (created if missing)")
    p.add_argument("--text-field", default="text", help="column holding the document text (default: %(default)s)")
    p.add_argument("--shard-tokens", type=positive_int, default=DEFAULT_SHARD_TOKENS,
                   help="tokens per shard (default: %(default)s)")
    p.add_argument("--val-tokens", type=positive_int,
                   help="tokens for validation, taken from the start of the stream (default: one shard's worth, "
                        f"or {VAL_SHARE * 100:.0f}%% of a corpus smaller than that; {EMBEDDED_VAL_TOKENS} for --source "
                        f"embedded, about 10%% of it)")
    p.add_argument("--workers", type=positive_int, default=available_cores(),
                   help="tokenizer processes (default: all cores, here %(default)s)")
    p.add_argument("--max-docs", type=positive_int, help="read at most this many documents (default: all)")
    p.add_argument("--max-tokens", type=positive_int,
                   help="stop after this many tokens, cutting the last document (default: no limit). It must leave "
                        f"each split at least {MIN_SPLIT_TOKENS} tokens, one window of the smallest preset's context "
                        f"(debug: {MIN_SPLIT_TOKENS - 1}) plus its last target: with --val-tokens V at least V + "
                        f"{MIN_SPLIT_TOKENS} (the split V itself is not judged); without, at least "
                        f"{smallest_shrunk_stream()} (validation then takes {VAL_SHARE * 100:.0f}%% of a stream "
                        "shorter than the default --val-tokens)")
    p.add_argument("--cache-dir", type=path_arg,
                   help="cache folder of the downloads (huggingface_hub) and of datasets' Arrow files "
                                       "(default: the libraries' own, under HF_HOME or ~/.cache/huggingface)")
    p.add_argument("--overwrite", action="store_true", help="rebuild --out even if it holds a finished dataset")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.val_share = VAL_SHARE if args.val_tokens is None else None  # only a default shrinks for a small corpus
    if args.val_tokens is None:
        args.val_tokens = EMBEDDED_VAL_TOKENS if args.source == "embedded" else args.shard_tokens
    return args


def checked_source(args) -> dict:
    """The source (source_record) once everything that can be checked before the output folder is made and the
    pool starts has been, every problem in one line: --files with --source files only, a --max-tokens too small for
    a usable dataset, the --files patterns, and each local parquet file's footer (its schema: the --text-field)."""
    problems = []
    if (args.source == "files") != bool(args.files):
        problems.append("--files is required with --source files, and only used with it")
    if (problem := max_tokens_problem(args)) is not None:
        problems.append(problem)
    source = None
    if args.source != "files" or args.files:
        try:
            source = source_record(args)
        except UserError as e:
            problems.append(str(e))
    if source is not None and source["type"] == "files" and source["reader"] == "parquet":
        problems += parquet_problems(source["files"], args.text_field)
    if problems:
        raise UserError("; ".join(problems))
    return source


def split_sizes(tokens: int, args) -> tuple[int, int]:
    """(validation, training) tokens of a stream of `tokens` tokens, as shards.ShardWriter cuts it: the first
    --val-tokens, or with the default val_share that share when the stream ends before the first val shard does."""
    if args.val_share and tokens < min(args.shard_tokens, args.val_tokens):
        val = max(1, int(tokens * args.val_share))
        return val, tokens - val
    val = min(tokens, args.val_tokens)
    return val, tokens - val


def smallest_shrunk_stream(share: float = VAL_SHARE) -> int:
    """The fewest tokens whose `share` holds MIN_SPLIT_TOKENS (the rest then holds more)."""
    tokens = math.ceil(MIN_SPLIT_TOKENS / share)
    while int(tokens * share) < MIN_SPLIT_TOKENS:  # (float rounding)
        tokens += 1
    return tokens


def splits_usable(val: int, train: int, args) -> bool:
    """Whether each split holds MIN_SPLIT_TOKENS (an explicit --val-tokens is the user's own choice: then only the
    train split is judged)."""
    return train >= MIN_SPLIT_TOKENS and (val >= MIN_SPLIT_TOKENS or not args.val_share)


def max_tokens_problem(args) -> str | None:
    """A --max-tokens that cannot give the splits MIN_SPLIT_TOKENS (splits_usable), with the smallest --max-tokens
    above it that can."""
    if args.max_tokens is None:
        return None
    val, train = split_sizes(args.max_tokens, args)
    if splits_usable(val, train, args):
        return None
    shrunk = smallest_shrunk_stream(args.val_share) if args.val_share else None
    least = (shrunk if shrunk is not None and args.max_tokens < shrunk < min(args.shard_tokens, args.val_tokens)
             else args.val_tokens + MIN_SPLIT_TOKENS)
    needs = "each split needs" if args.val_share else "the train split needs"
    return (f"--max-tokens {args.max_tokens}: too few for a usable dataset ({val} validation and {train} training "
            f"tokens; {needs} at least {MIN_SPLIT_TOKENS}, one window of the smallest preset's context plus its last "
            f"target); give --max-tokens {least} or more" + (", or a lower --val-tokens" if least > args.val_tokens
                                                              else ""))


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing in worker processes

class Tokenized(NamedTuple):
    tokens: np.ndarray  # uint16: EOT, doc tokens, EOT, doc tokens, ...
    documents: int  # non-empty documents in it
    rows: int  # rows read, empty ones included (the progress bar counts these)
    text_bytes: int  # UTF-8 size of the text (for MB/s)
    missing: int = 0  # rows without a text (the field missing or null): left out, and counted for a warning


class NotText(Exception):
    """A worker met a row whose text field holds no string: its place in the task's rows, and the value."""

    def __init__(self, row: int, value):
        super().__init__(row, value)
        self.row, self.value = row, value


_WORKER_TEXTS = None  # the sequence a worker slices its rows from (set once per worker by the pool initializer)
_WORKER_STOP = None  # set by the parent when it stops early: the tasks still queued then return at once, empty


def _init_worker(texts, stop) -> None:
    global _WORKER_TEXTS, _WORKER_STOP
    _WORKER_TEXTS, _WORKER_STOP = texts, stop
    # Ctrl-C reaches the whole process group: the parent alone handles it (ending the pool), not every worker with
    # a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def tokenize_documents(texts: list) -> Tokenized:
    """<|endoftext|> before each non-empty document; GPT-2 ids must fit uint16. tiktoken hands each document's ids
    over as a uint32 array (encode_ordinary's list would cost a Python int per token: time, and ~30 bytes each)."""
    enc = tokenizer.get_tokenizer()
    eot = np.array([tokenizer.EOT_ID], dtype=np.uint32)
    pieces, documents, text_bytes = [], 0, 0
    for row, text in enumerate(texts):
        if text is None or text == "":
            continue
        if not isinstance(text, str):
            raise NotText(row, text)
        # No special token allowed or refused: '<|endoftext|>' in a text is plain text, as with encode_ordinary.
        pieces += [eot, enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())]
        documents += 1
        text_bytes += len(text.encode("utf-8"))
    tokens = np.concatenate(pieces) if pieces else np.empty(0, np.uint32)
    assert tokens.size == 0 or int(tokens.max()) < 2 ** 16, "token id does not fit uint16"
    return Tokenized(tokens.astype(np.uint16), documents, len(texts), text_bytes, sum(text is None for text in texts))


def _tokenize_task(task) -> Tokenized:
    """A task is a slice of a parquet file, a (start, stop) row range of the worker's sequence, or a list of texts
    from a stream."""
    if _WORKER_STOP.is_set():
        return Tokenized(np.empty(0, np.uint16), 0, 0, 0)
    if isinstance(task, ParquetSlice):
        return tokenize_documents(task.read())
    texts = _WORKER_TEXTS[task[0]:task[1]] if isinstance(task, tuple) else task
    return tokenize_documents(texts)


def make_tasks(texts):
    """Row ranges of a sequence; parquet slices or a stream's batches of texts as they come."""
    if hasattr(texts, "__len__"):
        return ((start, min(start + DOCS_PER_TASK, len(texts))) for start in range(0, len(texts), DOCS_PER_TASK))
    return texts


def tokenize_in_pool(texts, workers: int, field: str = "text"):
    """Tokenized chunks in input order. At most 4 tasks per worker are in flight (Pool.imap would read a whole
    stream ahead into memory); with a sequence each worker reads its own rows, so the parent only collects."""
    shared = texts if hasattr(texts, "__len__") else None
    stop = multiprocessing.Event()
    pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(shared, stop))
    pending = collections.deque()  # (the task's first row in the input, its result)
    rows_before = 0
    try:
        for task in make_tasks(texts):
            pending.append((rows_before, pool.apply_async(_tokenize_task, (task,))))
            rows_before += task_rows(task)
            if len(pending) >= 4 * workers:
                yield result_of(*pending.popleft(), field)
        while pending:
            yield result_of(*pending.popleft(), field)
    finally:
        stop_pool(pool, stop, [result for _, result in pending])


def task_rows(task) -> int:
    return task.stop - task.start if isinstance(task, ParquetSlice) else (
        task[1] - task[0] if isinstance(task, tuple) else len(task))


def result_of(first_row: int, result, field: str) -> Tokenized:
    """A task's Tokenized; a row that holds no text is one line naming it (its number in the input, from 1)."""
    try:
        return result.get()
    except NotText as e:
        raise UserError(f"row {first_row + e.row + 1} of the input: {not_text(field, e.value)}") from None


def stop_pool(pool, stop, pending) -> None:
    """End the pool without killing a worker that may be sending its result: Pool.terminate (what `with Pool` does)
    kills it mid-message, after which the pool's result thread waits forever for the rest, and data_prep.py hangs on
    Ctrl-C or when --max-tokens ends the run. Queued tasks return at once (`stop`), each worker finishes the one it
    holds and exits; only a worker still busy after POOL_STOP_WAIT_S (a stuck read) is killed, and it is not sending."""
    stop.set()
    pool.close()
    deadline = time.monotonic() + POOL_STOP_WAIT_S
    for result in pending:
        result.wait(max(0.0, deadline - time.monotonic()))
    if all(result.ready() for result in pending):
        pool.join()
    else:
        pool.terminate()


# ----------------------------------------------------------------------------------------------------------------
# From documents to shards

def tokenize_and_write(texts, out_dir: Path, args) -> dict:
    """Stream documents through the pool into shards; returns the counts for the manifest and summary."""
    total_rows = len(texts) if hasattr(texts, "__len__") else args.max_docs
    writer = shards.ShardWriter(out_dir, args.shard_tokens, args.val_tokens, args.val_share)
    documents = tokens = text_bytes = rows = missing = 0
    start = time.perf_counter()
    chunks = tokenize_in_pool(texts, args.workers, args.text_field)
    with tqdm(total=total_rows, unit="doc", unit_scale=True, desc="tokenizing", smoothing=0.1) as bar, \
            contextlib.closing(chunks):  # closing stops the pool when --max-tokens ends the loop early
        for chunk in chunks:
            piece = chunk.tokens
            if args.max_tokens is not None and tokens + piece.size >= args.max_tokens:
                piece = piece[:args.max_tokens - tokens]
                chunk = chunk._replace(documents=int(np.count_nonzero(piece == tokenizer.EOT_ID)))
            writer.add(piece)
            documents, tokens = documents + chunk.documents, tokens + piece.size
            text_bytes, rows, missing = text_bytes + chunk.text_bytes, rows + chunk.rows, missing + chunk.missing
            bar.update(chunk.rows)
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9) / 1e6:.2f}M tok/s", refresh=False)
            if tokens == args.max_tokens:
                break
        shard_records = writer.close()
    return {"documents": documents, "total_tokens": tokens, "text_bytes": text_bytes, "shards": shard_records,
            "val_shrunk": writer.val_shrunk, "seconds": time.perf_counter() - start, "rows": rows, "missing": missing}


# ----------------------------------------------------------------------------------------------------------------
# The output directory

def settings_record(source: dict, args) -> dict:
    """What decides the output: a finished directory is reused only when these match."""
    return {"source": source, "max_docs": args.max_docs, "max_tokens": args.max_tokens,
            "shard_tokens": args.shard_tokens, "val_tokens": args.val_tokens, "val_share": args.val_share,
            "tool_version": TOOL_VERSION}


def check_out_dir(out: Path, settings: dict, overwrite: bool) -> bool:
    """Whether `out` can take a build (read-only); False when it already holds this very dataset (nothing to do).

    A new or empty directory can, and a finished build with the same settings is reused; anything else is refused
    unless --overwrite, with which publish replaces what data_prep.py writes (shards, manifest and their temporary
    files). Files of any other name are never removed: a directory holding one is refused. The staging folder a
    killed build left behind is no content of `out` (new_staging_folder removes it)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    if STAGING_NAME in out.resolve().parts:  # (a later build into the folder above would take it for a killed build's)
        raise UserError(f"--out {out}: {STAGING_NAME} is the name of data_prep.py's build folder; choose another name")
    check_writable_dir(out, "--out")
    staging = out / STAGING_NAME
    check_no_build_under_way(out)
    entries = [p.name for p in out.iterdir() if p != staging] if out.is_dir() else []
    if entries and not overwrite:  # (every shard hashed: not for --overwrite, which replaces it whatever it is)
        existing, holds = finished_build(out, settings)
        if existing:  # nothing is written: files of other names beside it are no obstacle
            print(f"{out} already holds this dataset ({describe(existing)}); nothing to do (--overwrite rebuilds)")
            return False
    foreign = [name for name in entries if not _OUR_FILE.match(name)] + foreign_files(staging)
    if foreign:
        raise UserError(f"--out {out} holds files data_prep.py did not write (e.g. {foreign[0]!r}); pass a new or "
                        f"empty directory")
    if entries and not overwrite:
        raise UserError(f"--out {out} holds {holds}; pass --overwrite to replace it, or use one --out per dataset")
    return True


def check_no_build_under_way(out: Path) -> None:
    """Another data_prep.py run building into `out` (it holds its staging folder's lock) is not to be disturbed."""
    pid = locked_by_another(out / STAGING_NAME / STAGING_LOCK)
    if pid is not None:
        raise UserError(f"--out {out} is being built by another data_prep.py run (pid {pid}); wait for it or choose "
                        "another --out")


def is_staging_file(name: str) -> bool:
    return name == STAGING_LOCK or _OUR_FILE.match(name) is not None


def foreign_files(staging: Path) -> list[str]:
    """What in a staging folder data_prep.py did not write (as paths relative to --out): the folder itself when it
    is no folder, or its entries of any other name."""
    if not (staging.exists() or staging.is_symlink()):
        return []
    if staging.is_symlink() or not staging.is_dir():
        return [staging.name]
    return [f"{staging.name}/{p.name}" for p in staging.iterdir() if not is_staging_file(p.name)]


def new_staging_folder(out: Path):
    """(the staging folder, made empty in `out`, the lock this run holds on it). The one a killed build left (no
    run holds its lock; check_out_dir has seen that it holds only data_prep.py's files) is removed first."""
    ensure_writable_dir(out, "--out")
    staging = out / STAGING_NAME
    check_no_build_under_way(out)
    remove_staging(staging)
    staging.mkdir()
    return staging, lock_exclusively(staging / STAGING_LOCK)


def remove_staging(staging: Path) -> None:
    """Remove a staging folder and the files data_prep.py wrote in it; one holding anything else stays."""
    if not staging.is_dir() or staging.is_symlink():
        return
    for path in staging.iterdir():
        if is_staging_file(path.name):
            path.unlink()
    staging.rmdir()


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM noted, and acted on as before once the block ends (Ctrl-C: KeyboardInterrupt then). Main
    thread only (signal.signal), where Python runs every handler."""
    caught = []
    previous = {signum: signal.signal(signum, lambda number, frame: caught.append(number))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in caught[:1]:
            if callable(previous[signum]):
                previous[signum](signum, None)
            elif previous[signum] == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def publish(staging: Path, out: Path) -> None:
    """Move the finished build from `staging` into `out`, replacing what data_prep.py wrote there before. The old
    manifest goes first and the new one comes last, so a crash part way leaves a directory without manifest.json
    (an unfinished build, refused until --overwrite), never a manifest listing another build's shards; Ctrl-C waits
    for the end."""
    new = sorted(p.name for p in staging.iterdir() if p.name not in (shards.MANIFEST_NAME, STAGING_LOCK))
    with signals_deferred():  # Ctrl-C takes effect once --out holds the whole new build
        (out / shards.MANIFEST_NAME).unlink(missing_ok=True)
        for name in new:
            os.replace(staging / name, out / name)
        for path in list(out.iterdir()):
            if path.is_file() and _OUR_FILE.match(path.name) and path.name not in new + [shards.MANIFEST_NAME]:
                path.unlink()
        os.replace(staging / shards.MANIFEST_NAME, out / shards.MANIFEST_NAME)
        fsync_dir(out)
    remove_staging(staging)  # (its lock file too: the lock itself ends when this run does)


def finished_build(out: Path, settings: dict) -> tuple[dict | None, str]:
    """(manifest, "") when `out` holds a finished build made with `settings` whose every shard hashes right, else
    (None, what it holds instead)."""
    if not (out / shards.MANIFEST_NAME).exists():
        return None, "an unfinished build (no manifest.json)"
    try:
        manifest = shards.read_manifest(out)
    except UserError as e:
        return None, f"an unusable manifest ({e})"
    if manifest.get("settings") != settings:
        changed = changed_input(manifest.get("settings"), settings)
        return None, (f"a dataset built from an earlier version of {changed} (its size or modification time has "
                      f"changed since)" if changed else f"a dataset built with other settings ({describe(manifest)})")
    try:
        shards.validate_shards(out, manifest, verify_sha256=True)
    except UserError as e:
        return None, f"a damaged dataset ({e})"
    return manifest, ""


def changed_input(built: dict | None, settings: dict) -> str | None:
    """The first --files input that changed since a build whose settings were otherwise these, or None."""
    source = settings["source"]
    if source["type"] != "files" or not isinstance(built, dict) or not isinstance(built.get("source"), dict):
        return None
    unchanged = {**built, "source": {**built["source"], "file_versions": source["file_versions"]}}
    old_versions = built["source"].get("file_versions")
    if unchanged != settings or not isinstance(old_versions, list):
        return None
    return next((f for f, old, new in zip(source["files"], old_versions, source["file_versions"]) if old != new), None)


def describe(manifest: dict) -> str:
    source = manifest.get("settings", {}).get("source")
    return (f"{describe_source(source) if source else 'unknown source'}, {manifest.get('documents')} documents, "
            f"{manifest.get('total_tokens')} tokens in {len(manifest['shards'])} shards")


# ----------------------------------------------------------------------------------------------------------------
# Main

def prepare_data(argv=None) -> dict:
    """The whole command; raises UserError on bad input. Returns the manifest plus timing figures. A run that fails
    or is stopped leaves --out as it was: its staging folder is removed, and so are the folders of --out it made
    (never one it did not make)."""
    args = parse_args(argv)
    out = Path(args.out)
    source = checked_source(args)
    settings = settings_record(source, args)
    if not check_out_dir(out, settings, args.overwrite):
        if not foreign_files(out / STAGING_NAME):  # a killed build's (check_out_dir found no run building there)
            remove_staging(out / STAGING_NAME)
        return shards.read_manifest(out)
    load_start = time.perf_counter()
    texts = load_texts(args, source)  # resolved and checked before --out is touched: a bad input loses nothing
    load_seconds = time.perf_counter() - load_start
    made, lock = first_new_folder(out), None
    try:
        staging, lock = new_staging_folder(out)
        return build(args, out, staging, source, settings, texts, load_seconds)
    except BaseException:
        if lock is not None:
            with contextlib.suppress(OSError):
                remove_staging(out / STAGING_NAME)
        if made is not None:
            remove_empty_folders(out, made)
        raise
    finally:
        if lock is not None:
            lock.close()


def build(args, out: Path, staging: Path, source: dict, settings: dict, texts, load_seconds: float) -> dict:
    """Tokenize the source's texts (load_texts) into `staging`, write the manifest there once the splits are judged
    usable, and publish the build into `out`."""
    tokenizer.get_tokenizer()  # load once here: forked workers inherit it
    print(f"data_prep: {describe_source(source)} -> {out} ({args.workers} workers, shards of {args.shard_tokens} "
          f"tokens, {args.val_tokens} val tokens{val_share_note(args, token_bound(texts))})")
    result = tokenize_and_write(texts, staging, args)
    check_splits(result, args)
    if result["missing"]:  # (a row of another shape, say: the user may not know the input has them)
        warn(f"{result['missing']} of the {result['rows']} rows read have no {args.text_field!r} value (the field "
             f"is missing or null); they are left out")
    val_rule = (f"the first {args.val_share:.0%} of the tokens: the corpus is smaller than the default --val-tokens "
                f"{args.val_tokens}" if result["val_shrunk"] else f"the first --val-tokens {args.val_tokens} tokens")
    manifest = {
        "format": shards.MANIFEST_FORMAT, "tool": "data_prep.py", "tool_version": TOOL_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": settings, "args": vars(args),
        "tokenizer": "gpt2 (tiktoken r50k_base)", "tokenizer_sha256": tokenizer.tokenizer_sha256(),
        "eot_id": tokenizer.EOT_ID, "header_bytes": shards.HEADER_BYTES, "header_layout": shards.HEADER_LAYOUT,
        "dtype": "uint16", "documents": result["documents"], "total_tokens": result["total_tokens"],
        "val_tokens": sum(s["tokens"] for s in result["shards"] if s["split"] == "val"),
        "train_tokens": sum(s["tokens"] for s in result["shards"] if s["split"] == "train"),
        "val_share": args.val_share if result["val_shrunk"] else None, "val_rule": val_rule,
        "shards": result["shards"],
    }
    shards.write_manifest(staging, manifest)
    publish(staging, out)
    seconds = result["seconds"]
    print(f"data_prep: {manifest['documents']} documents, {manifest['total_tokens']} tokens (val "
          f"{manifest['val_tokens']}, train {manifest['train_tokens']}) in {len(manifest['shards'])} shards -> {out}; "
          f"tokenize+write {seconds:.1f}s ({manifest['total_tokens'] / seconds / 1e6:.2f}M tokens/s, "
          f"{result['text_bytes'] / seconds / 1e6:.1f} MB/s), loading {load_seconds:.1f}s; validation: {val_rule}")
    return {**manifest, "text_bytes": result["text_bytes"], "seconds": seconds, "load_seconds": load_seconds}


def val_share_note(args, bound: int | None) -> str:
    """Said before tokenizing when the corpus is known to be smaller than the default val split."""
    if args.max_tokens is not None:
        bound = min(bound, args.max_tokens) if bound is not None else args.max_tokens
    if args.val_share and bound is not None and bound < args.val_tokens:
        return (f"; the corpus holds at most {bound} tokens, fewer than that default, so validation takes the first "
                f"{args.val_share:.0%} of them")
    return ""


def describe_source(source: dict) -> str:
    if source["type"] == "hf":
        return f"{source['dataset']} ({source['name']}, {source['split']})"
    if source["type"] == "files":
        return f"{len(source['files'])} {source['reader']} file(s)"
    return f"embedded corpus {source['file']}"


def check_splits(result: dict, args) -> None:
    """Refuse a build that would be unusable (before it is published: --out stays as it was): no tokens at all, or
    splits too small (splits_usable, as for --max-tokens)."""
    total = result["total_tokens"]
    if total == 0:
        raise UserError(f"the input yielded no tokens (no non-empty {args.text_field!r} documents); check the input "
                        f"and --text-field; --out {args.out} is left as it was")
    val = sum(s["tokens"] for s in result["shards"] if s["split"] == "val")
    train = total - val
    if splits_usable(val, train, args):
        return
    most_val = total - MIN_SPLIT_TOKENS  # the largest --val-tokens that leaves the train split enough
    remedy = (f"run again with a --val-tokens from {MIN_SPLIT_TOKENS} to {most_val}, or add data"
              if most_val >= MIN_SPLIT_TOKENS else "add data")
    raise UserError(f"the input yielded only {total} tokens: {val} for validation and {train} for training (each "
                    f"split needs at least {MIN_SPLIT_TOKENS}, one window of the smallest preset's context plus its "
                    f"last target); --out {args.out} is left as it was; {remedy}")


main = main_entry(prepare_data)

if __name__ == "__main__":
    main()
