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

Output: one directory per dataset. Shards are written under temporary names and renamed when complete; manifest.json
is written last, so a directory without one is unfinished. A rerun on a finished directory with the same settings
(every shard hashing right) says so and exits 0; any other non-empty --out is refused unless --overwrite, which
replaces what data_prep.py wrote there (never other files).
"""
import argparse
import cli
import collections
import concurrent.futures
import contextlib
import functools
import glob
import json
import multiprocessing
import os
import queue
import re
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

import shards
import tokenizer
from cli import REPO_DIR, UserError, ensure_writable_dir, main_entry, positive_int

TOOL_VERSION = 1  # bump when the same input and settings would give different shards
EMBEDDED_CORPUS = REPO_DIR / "assets" / "corpus" / "tinyshakespeare.txt"
# ~10% of the embedded corpus's ~338k tokens: one shard's worth (the default elsewhere) would leave no train split.
EMBEDDED_VAL_TOKENS = 32_768
DEFAULT_SHARD_TOKENS = 100_000_000
DOCS_PER_TASK = 1024  # documents per pool task: big enough to hide the IPC cost, small enough to balance the load
POOL_STOP_WAIT_S = 30  # how long an early stop waits for the tasks the workers hold
VAL_SHARE = 0.1  # of a corpus smaller than the default --val-tokens, taken for validation
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_OUR_FILE = re.compile(r"^(\.?(train|val)_\d{6}\.bin(\.tmp\d*)?|manifest\.json|\.manifest\.json\.tmp\d*)$")


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
    p.add_argument("--files", nargs="+", metavar="PATH",
                   help="local .txt, .jsonl/.json or .parquet files (one kind per run); globs allowed, e.g. "
                        "'dir/*.jsonl' (quote them); read in sorted order")
    p.add_argument("--out", required=True, help="output directory, one per dataset (created if missing)")
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
                   help="stop after this many tokens, cutting the last document (default: no limit)")
    p.add_argument("--cache-dir", help="cache folder of the downloads (huggingface_hub) and of datasets' Arrow files "
                                       "(default: the libraries' own, under HF_HOME or ~/.cache/huggingface)")
    p.add_argument("--overwrite", action="store_true", help="rebuild --out even if it holds a finished dataset")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if (args.source == "files") != bool(args.files):
        raise UserError("--files is required with --source files, and only used with it")
    args.val_share = VAL_SHARE if args.val_tokens is None else None  # only a default shrinks for a small corpus
    if args.val_tokens is None:
        args.val_tokens = EMBEDDED_VAL_TOKENS if args.source == "embedded" else args.shard_tokens
    return args


# ----------------------------------------------------------------------------------------------------------------
# Sources

def split_paragraphs(text: str) -> list[str]:
    """Documents of a plain text: the non-empty pieces between blank lines (as datasets' sample_by="paragraph")."""
    return [piece for piece in text.split("\n\n") if piece]


def embedded_documents() -> list[str]:
    return split_paragraphs(EMBEDDED_CORPUS.read_text(encoding="utf-8"))


class ArrowTexts:
    """One column of a prepared (memory-mapped) datasets.Dataset, sliceable like a list. Pickles as file
    references, so each worker reads its own rows: no single process handles all the text."""

    def __init__(self, dataset, field: str, limit: int | None):
        self.dataset = dataset.select_columns([field])
        self.field = field
        self.length = min(len(dataset), limit or len(dataset))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, rows: slice) -> list:
        return self.dataset[rows][self.field]


class ParquetSlice(NamedTuple):
    """A pool task: rows [start, stop) of one row group of a parquet file, read by the worker itself."""
    path: str
    row_group: int
    start: int
    stop: int
    field: str

    def read(self) -> list:
        column = _row_group_column(self.path, self.row_group, self.field)
        return column.slice(self.start, self.stop - self.start).to_pylist()


@functools.lru_cache(maxsize=1)
def _row_group_column(path: str, row_group: int, field: str):
    """The worker's current row group (the tasks of one row group follow each other, so it is read about once)."""
    return _parquet_file(path).read_row_group(row_group, columns=[field]).column(0)


@functools.lru_cache(maxsize=2)
def _parquet_file(path: str):
    import pyarrow.parquet as pq
    return pq.ParquetFile(path)


def parquet_tasks(paths, field: str, limit: int | None):
    """Slices of at most DOCS_PER_TASK rows of each row group, file after file in the order given (`paths` may be
    a generator that downloads them); stops after `limit` rows."""
    rows = 0
    for path in paths:
        try:
            metadata = _parquet_file(path).metadata
        except Exception as e:  # pyarrow's errors for a file that is not parquet have several types
            raise UserError(f"{path} cannot be read as parquet ({type(e).__name__}: {e}); replace the file")
        columns = metadata.schema.to_arrow_schema().names
        if field not in columns:
            raise UserError(f"{path} has no field {field!r} (its fields: {', '.join(columns)}); pass --text-field")
        for row_group in range(metadata.num_row_groups):
            size = metadata.row_group(row_group).num_rows
            for start in range(0, size, DOCS_PER_TASK):
                stop = min(start + DOCS_PER_TASK, size)
                if limit:
                    stop = min(stop, start + limit - rows)
                yield ParquetSlice(path, row_group, start, stop, field)
                rows += stop - start
                if rows == limit:
                    return


def expand_files(patterns: list[str]) -> tuple[list[str], str]:
    """Absolute paths of the non-empty files matching the --files patterns (sorted per pattern; absolute so that a
    rerun from another folder recognises a finished output) and the datasets builder that reads them."""
    files = []
    for pattern in patterns:
        matches = sorted(str(Path(p).resolve()) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches:
            raise UserError(f"--files {pattern} matches no file; check the path (quote globs)")
        files += matches
    kinds = {FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix.lower() not in FILE_BUILDERS)
        raise UserError(f"--files {bad}: unsupported type; use {', '.join(FILE_BUILDERS)} files")
    if len(kinds) > 1:
        raise UserError(f"--files mixes file types ({', '.join(sorted(kinds))}); pass one kind per run")
    # Empty files hold no documents, and datasets fails on a num_proc job made only of empty files: leave them out.
    files = [f for f in files if Path(f).stat().st_size > 0]
    if not files:
        raise UserError(f"--files {' '.join(patterns)}: every file is empty; nothing to tokenize")
    return files, kinds.pop()


def load_hf_dataset(args, what: str, files: list[str], *load_args, num_proc: int = 1, **load_kwargs):
    """datasets.load_dataset, with its many failure types turned into one line naming the input (and the line of
    `files`, the local files it reads, that cannot be decoded)."""
    import datasets  # only here: the rest of the repo must run on machines without `datasets`
    if not args.streaming and num_proc > 1:
        load_kwargs["num_proc"] = num_proc  # download and prepare files in parallel
    with reading(what, files):
        return datasets.load_dataset(*load_args, streaming=args.streaming, cache_dir=args.cache_dir, **load_kwargs)


@contextlib.contextmanager
def reading(what: str, files: list[str]):
    """Errors of datasets reading the input (at load, or later while streaming) become one line naming the input,
    and the file and line at fault when one of the --files cannot be decoded."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # network, missing file, parse and schema errors all have their own types
        raise UserError(f"cannot load {what}: {first_bad_line(files) or underlying_error(e)}") from e


def underlying_error(error: Exception) -> str:
    """'Type: first line of its message' of the error that caused `error`: datasets wraps a decode or parse error
    of one file in a DatasetGenerationError that only says that something went wrong."""
    while type(error).__name__ == "DatasetGenerationError" and (error.__cause__ or error.__context__):
        error = error.__cause__ or error.__context__
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def first_bad_line(files: list[str]) -> str:
    """'FILE line N (byte B): not UTF-8 (...)', or for a .jsonl file 'FILE line N: not JSON (...)': the first line
    of the --files that cannot be read; '' when every line can (the load failed for another reason)."""
    for file in files:
        suffix = Path(file).suffix.lower()
        if suffix not in (".txt", ".json", ".jsonl"):
            continue
        offset = 0
        with open(file, "rb") as f:
            for number, line in enumerate(f, start=1):
                try:
                    text = line.decode("utf-8")
                    if suffix == ".jsonl" and text.strip():
                        json.loads(text.strip())
                except UnicodeDecodeError as e:
                    return f"{file} line {number} (byte {offset + e.start}): not UTF-8 ({e.reason}); fix or remove it"
                except json.JSONDecodeError as e:
                    return f"{file} line {number}: not JSON ({e.msg} at column {e.colno}); fix or remove it"
                offset += len(line)
    return ""


def source_record(args) -> dict:
    """What --source reads, for the manifest (cheap: nothing is loaded yet)."""
    if args.source == "embedded":
        return {"type": "embedded", "file": str(EMBEDDED_CORPUS.relative_to(REPO_DIR)),
                "sha256": shards.file_sha256(EMBEDDED_CORPUS), "documents": "paragraphs (speeches)"}
    if args.source == "hf":
        return {"type": "hf", "dataset": args.dataset, "name": args.name, "split": args.split,
                "text_field": args.text_field}
    files, reader = expand_files(args.files)
    return {"type": "files", "files": files, "reader": reader, "text_field": args.text_field}


def load_texts(args, source: dict):
    """The documents: a sequence the workers slice themselves, a generator of parquet slices the workers read
    themselves, or (streaming) an iterator of lists of texts."""
    if source["type"] == "embedded":
        return embedded_documents()[:args.max_docs]
    if source["type"] == "files":
        what, files = f"--files {' '.join(args.files)}", source["files"]
        if source["reader"] == "parquet" and not args.streaming:
            return parquet_tasks(files, args.text_field, args.max_docs)
        options = {"sample_by": "paragraph"} if source["reader"] == "text" else {}
        ds = load_hf_dataset(args, what, files, source["reader"], data_files=files, split="train",
                             num_proc=min(args.workers, len(files)), **options)
    else:
        what = f"--dataset {args.dataset} --name {args.name} --split {args.split}"
        # a hub dataset is listed here only for the parquet route; streamed, datasets alone reads it
        files, revision = config_files(args, what) if Path(args.dataset).is_dir() or not args.streaming else ([], None)
        if not args.streaming and all(f.endswith(".parquet") for f in files):
            at = f" at revision {revision}" if revision else ""
            print(f"data_prep: {what}: {len(files)} parquet files{at} ({files[0]}, ...), read by the workers directly")
            paths = files if revision is None else fetched_in_order(files, hub_download(args, revision))
            return parquet_tasks(paths, args.text_field, args.max_docs)
        files = files if revision is None else []  # local files, to name the one that cannot be decoded
        ds = load_hf_dataset(args, what, files, args.dataset, args.name, split=args.split, revision=revision,
                             num_proc=args.workers)
    with reading(what, files):  # a streamed dataset reads its first row here
        check_text_field(ds, args.text_field, what)
    if args.streaming:
        ds = ds.select_columns([args.text_field])
        if args.max_docs:
            ds = ds.take(args.max_docs)
        return stream_batches(ds, args.text_field, what, files)
    return ArrowTexts(ds, args.text_field, args.max_docs)


def stream_batches(ds, field: str, what: str, files: list[str]):
    """Lists of texts from a streamed dataset, which meets undecodable input only now."""
    with reading(what, files):
        for batch in ds.iter(batch_size=DOCS_PER_TASK):
            yield batch[field]


def token_bound(texts) -> int | None:
    """At least the corpus's token count, known before tokenizing (None for parquet slices and streams): a token
    covers at least one byte of UTF-8 text, and each document adds one <|endoftext|>."""
    if isinstance(texts, list):
        return sum(len(text.encode("utf-8")) for text in texts) + len(texts)
    if isinstance(texts, ArrowTexts):
        return texts.dataset.data.nbytes  # the text bytes plus a 4-byte offset per row
    return None


def check_text_field(ds, field: str, what: str) -> None:
    columns = ds.column_names
    if columns is None:  # a streamed json dataset knows its columns only after its first row
        first = next(iter(ds), None)
        columns = list(first) if first is not None else [field]
    if field not in columns:
        raise UserError(f"{what} has no field {field!r} (its fields: {', '.join(columns)}); pass --text-field")


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face datasets: the files of a config, as datasets resolves them, at one hub commit

class ConfigFiles(NamedTuple):
    files: list[str]  # local paths (a local copy) or paths in the repository (the hub), sorted
    revision: str | None  # the hub commit every file is read from; None for a local copy


def config_files(args, what: str) -> ConfigFiles:
    """The files of --name/--split as datasets.load_dataset_builder resolves them from the `configs:` of the dataset
    card (from the layout when it lists none), for a local copy or a hub dataset at the commit pinned first. What
    datasets raises for a card it cannot read becomes one line naming the card. Run in a child process: `datasets`
    (~90 MB once imported) stays out of this one and of the workers forked from it."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as child:
        return child.submit(resolve_config_files, args, what).result()


def resolve_config_files(args, what: str) -> ConfigFiles:
    import datasets  # only here: the rest of the repo must run on machines without `datasets`
    revision = None if Path(args.dataset).is_dir() else hub_commit(args.dataset)
    # the builder only resolves the files (nothing is built): its cache folder, which gets a lock file, is scratch
    with card_errors(args), tempfile.TemporaryDirectory() as scratch:
        try:
            builder = datasets.load_dataset_builder(args.dataset, args.name, revision=revision, cache_dir=scratch)
        except ValueError:  # among others, a config the card does not have
            configs = datasets.get_dataset_config_names(args.dataset, revision=revision)
            if args.name in configs:
                raise
            raise UserError(f"{what}: the dataset has no config {args.name!r} (its configs: {', '.join(configs)}); "
                            f"pass --name") from None
    splits = builder.config.data_files or {}
    if args.split not in splits or not splits[args.split]:
        raise UserError(f"{what}: config {args.name!r} has no split {args.split!r} (its splits: "
                        f"{', '.join(str(s) for s in splits if splits[s])}); pass --split")
    return ConfigFiles([f.removeprefix(f"{builder.base_path}/") if revision else f for f in splits[args.split]],
                       revision)


@contextlib.contextmanager
def card_errors(args):
    """Whatever reading the card's configs raises (a YAML, encoding, shape or pattern error, each of its own type)
    is one line naming the card; a network error on the hub is one naming the dataset."""
    local = Path(args.dataset).is_dir()
    card = Path(args.dataset) / "README.md" if local else f"README.md of --dataset {args.dataset}"
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if not local and (isinstance(e, (ConnectionError, TimeoutError))
                          or type(e).__module__.startswith(("httpx", "huggingface_hub"))):
            with hub_errors(args.dataset):
                raise
        message = " ".join(str(e).split())
        raise UserError(f"dataset card {card}: datasets cannot read its configs ({type(e).__name__}"
                        f"{': ' + message[:200] if message else ''}); fix the card (`configs:` as in "
                        f"https://huggingface.co/docs/hub/datasets-manual-configuration)") from e


def hub_commit(dataset: str) -> str:
    """The dataset's current commit on the hub: every file is read from it."""
    from huggingface_hub import HfApi
    with hub_errors(dataset):
        return HfApi().dataset_info(dataset).sha


def hub_download(args, revision: str):
    """name -> local path of that file of --dataset at `revision`, downloaded by huggingface_hub (cached)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import disable_progress_bars
    # the downloads run in a daemon thread (fetched_in_order): without its own bars it never holds stderr, which a
    # daemon thread must not do when the interpreter exits (Ctrl-C, an error); data_prep's bar shows the progress
    disable_progress_bars()

    def fetch(name: str) -> str:
        with hub_errors(args.dataset):
            return hf_hub_download(args.dataset, name, repo_type="dataset", revision=revision, cache_dir=args.cache_dir)
    return fetch


@contextlib.contextmanager
def hub_errors(dataset: str):
    try:
        yield
    except Exception as e:  # network, authentication and missing-repository errors have their own types
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot read --dataset {dataset} from the Hugging Face hub ({type(e).__name__}: {message}); "
                        f"check the name and the network, or pass the path of a local copy") from e


def fetched_in_order(names: list[str], fetch):
    """Local paths of `names`, in order. The downloads run one after another in a background thread, ahead of the
    reader, so tokenizing file k overlaps with downloading file k+1. The thread is a daemon: an interrupted run
    exits without waiting for a multi-GB download to finish (huggingface_hub resumes it next time)."""
    fetched = queue.Queue()

    def download_all():
        for name in names:
            try:
                fetched.put((fetch(name), None))
            except BaseException as e:  # handed to the reader, which raises it in the main thread
                fetched.put((None, e))
                return
    threading.Thread(target=download_all, name="downloads", daemon=True).start()
    for _ in names:
        path, error = fetched.get()
        if error is not None:
            raise error
        yield path


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing in worker processes

class Tokenized(NamedTuple):
    tokens: np.ndarray  # uint16: EOT, doc tokens, EOT, doc tokens, ...
    documents: int  # non-empty documents in it
    rows: int  # rows read, empty ones included (the progress bar counts these)
    text_bytes: int  # UTF-8 size of the text (for MB/s)


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
    for text in texts:
        if text is None or text == "":
            continue
        if not isinstance(text, str):
            raise UserError(f"a document's text field holds {type(text).__name__}, not a string; pass the right "
                            f"--text-field")
        # No special token allowed or refused: '<|endoftext|>' in a text is plain text, as with encode_ordinary.
        pieces += [eot, enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())]
        documents += 1
        text_bytes += len(text.encode("utf-8"))
    tokens = np.concatenate(pieces) if pieces else np.empty(0, np.uint32)
    assert tokens.size == 0 or int(tokens.max()) < 2 ** 16, "token id does not fit uint16"
    return Tokenized(tokens.astype(np.uint16), documents, len(texts), text_bytes)


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


def tokenize_in_pool(texts, workers: int):
    """Tokenized chunks in input order. At most 4 tasks per worker are in flight (Pool.imap would read a whole
    stream ahead into memory); with a sequence each worker reads its own rows, so the parent only collects."""
    shared = texts if hasattr(texts, "__len__") else None
    stop = multiprocessing.Event()
    pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(shared, stop))
    pending = collections.deque()
    try:
        for task in make_tasks(texts):
            pending.append(pool.apply_async(_tokenize_task, (task,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        stop_pool(pool, stop, pending)


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
# Writing shards

class ShardWriter:
    """Cuts the token stream into val shards (the first `val_tokens`) then train shards of `shard_tokens`, and
    writes each finished shard in a background thread (hashing and disk I/O release the GIL) while the next fills.
    With `val_share`, a stream that ends before `val_tokens` (held in one buffer) gives that share to val instead."""

    def __init__(self, out_dir: Path, shard_tokens: int, val_tokens: int, val_share: float | None = None):
        self.out_dir, self.shard_tokens, self.val_left = out_dir, shard_tokens, val_tokens
        self.val_share, self.val_shrunk = val_share, False
        self.counts = {"val": 0, "train": 0}
        self.buffer, self.fill = None, 0
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.written = []  # futures of shard records, in order

    @property
    def split(self) -> str:
        return "val" if self.val_left else "train"

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self.buffer is None:
                self.buffer = np.empty(min(self.shard_tokens, self.val_left or self.shard_tokens), np.uint16)
            n = min(tokens.size, self.buffer.size - self.fill)
            self.buffer[self.fill:self.fill + n] = tokens[:n]
            self.fill, tokens = self.fill + n, tokens[n:]
            if self.fill == self.buffer.size:
                self.flush()

    def flush(self) -> None:
        if not self.fill:
            return
        if self.written:  # at most one shard waits for the writer: two buffers in memory at any time
            self.written[-1].result()
        name = f"{self.split}_{self.counts[self.split]:06d}.bin"
        self.written.append(self.pool.submit(self._write, name, self.split, self.buffer[:self.fill]))
        self.counts[self.split] += 1
        if self.split == "val":
            self.val_left -= self.fill
        self.buffer, self.fill = None, 0

    def _shrink_val(self) -> None:
        """The whole stream is in the val buffer: its first `val_share` becomes the val split, the rest train."""
        tokens = self.buffer[:self.fill]
        self.buffer, self.fill = None, 0
        self.val_left, self.val_shrunk = max(1, int(tokens.size * self.val_share)), True
        self.add(tokens)

    def _write(self, name: str, split: str, tokens: np.ndarray) -> dict:
        sha256 = shards.write_shard(self.out_dir / name, tokens)
        return {"file": name, "split": split, "tokens": int(tokens.size), "sha256": sha256}

    def close(self) -> list[dict]:
        if self.val_share and self.val_left and self.fill and not self.counts["val"]:
            self._shrink_val()
        self.flush()
        try:
            return [future.result() for future in self.written]
        finally:
            self.pool.shutdown()


def tokenize_and_write(texts, out_dir: Path, args) -> dict:
    """Stream documents through the pool into shards; returns the counts for the manifest and summary."""
    total_rows = len(texts) if hasattr(texts, "__len__") else args.max_docs
    writer = ShardWriter(out_dir, args.shard_tokens, args.val_tokens, args.val_share)
    documents = tokens = text_bytes = 0
    start = time.perf_counter()
    chunks = tokenize_in_pool(texts, args.workers)
    with tqdm(total=total_rows, unit="doc", unit_scale=True, desc="tokenizing", smoothing=0.1) as bar, \
            contextlib.closing(chunks):  # closing stops the pool when --max-tokens ends the loop early
        for chunk in chunks:
            piece = chunk.tokens
            if args.max_tokens is not None and tokens + piece.size >= args.max_tokens:
                piece = piece[:args.max_tokens - tokens]
                chunk = chunk._replace(documents=int(np.count_nonzero(piece == tokenizer.EOT_ID)))
            writer.add(piece)
            documents, tokens = documents + chunk.documents, tokens + piece.size
            text_bytes += chunk.text_bytes
            bar.update(chunk.rows)
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9) / 1e6:.2f}M tok/s", refresh=False)
            if tokens == args.max_tokens:
                break
        shard_records = writer.close()
    return {"documents": documents, "total_tokens": tokens, "text_bytes": text_bytes, "shards": shard_records,
            "val_shrunk": writer.val_shrunk, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------------------------
# The output directory

def settings_record(source: dict, args) -> dict:
    """What decides the output: a finished directory is reused only when these match."""
    return {"source": source, "max_docs": args.max_docs, "max_tokens": args.max_tokens,
            "shard_tokens": args.shard_tokens, "val_tokens": args.val_tokens, "val_share": args.val_share,
            "tool_version": TOOL_VERSION}


def prepare_out_dir(out: Path, settings: dict, overwrite: bool) -> bool:
    """Make `out` ready for a build; False when it already holds this very dataset (nothing to do).

    A new or empty directory is used as it is, and a finished build with the same settings is reused; anything else
    is refused unless --overwrite, which removes what data_prep.py writes (shards, manifest and their temporary
    files). Files of any other name are never removed: a directory holding one is refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    ensure_writable_dir(out, "--out")
    entries = [p.name for p in out.iterdir()]
    if not entries:
        return True
    if not overwrite:
        existing, holds = finished_build(out, settings)
        if existing:
            print(f"{out} already holds this dataset ({describe(existing)}); nothing to do (--overwrite rebuilds)")
            return False
    foreign = [name for name in entries if not _OUR_FILE.match(name)]
    if foreign:
        raise UserError(f"--out {out} holds files data_prep.py did not write (e.g. {foreign[0]!r}); pass a new or "
                        f"empty directory")
    if not overwrite:
        raise UserError(f"--out {out} holds {holds}; pass --overwrite to replace it, or use one --out per dataset")
    # The manifest goes first: a crash while deleting then leaves an unfinished build, never a complete-looking one.
    for name in sorted(entries, key=lambda n: n != shards.MANIFEST_NAME):
        (out / name).unlink()
    return True


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
        return None, f"a dataset built with other settings ({describe(manifest)})"
    try:
        shards.validate_shards(out, manifest, verify_sha256=True)
    except UserError as e:
        return None, f"a damaged dataset ({e})"
    return manifest, ""


def describe(manifest: dict) -> str:
    source = manifest.get("settings", {}).get("source")
    return (f"{describe_source(source) if source else 'unknown source'}, {manifest.get('documents')} documents, "
            f"{manifest.get('total_tokens')} tokens in {len(manifest['shards'])} shards")


# ----------------------------------------------------------------------------------------------------------------
# Main

def prepare_data(argv=None) -> dict:
    """The whole command; raises UserError on bad input. Returns the manifest plus timing figures."""
    args = parse_args(argv)
    out = Path(args.out)
    source = source_record(args)
    settings = settings_record(source, args)
    if not prepare_out_dir(out, settings, args.overwrite):
        return shards.read_manifest(out)
    load_start = time.perf_counter()
    texts = load_texts(args, source)
    load_seconds = time.perf_counter() - load_start
    tokenizer.get_tokenizer()  # load once here: forked workers inherit it
    print(f"data_prep: {describe_source(source)} -> {out} ({args.workers} workers, shards of {args.shard_tokens} "
          f"tokens, {args.val_tokens} val tokens{val_share_note(args, token_bound(texts))})")
    result = tokenize_and_write(texts, out, args)
    check_splits(result, args)
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
    shards.write_manifest(out, manifest)
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
    """Refuse a build that would be unusable: no tokens at all, or nothing left for training after validation."""
    if result["total_tokens"] == 0:
        raise UserError(f"the input yielded no tokens (no non-empty {args.text_field!r} documents); check the input "
                        f"and --text-field")
    if not any(s["split"] == "train" for s in result["shards"]):
        raise UserError(f"the input yielded only {result['total_tokens']} tokens, all taken for validation by "
                        f"--val-tokens {args.val_tokens}; run again with a lower --val-tokens and --overwrite (which "
                        f"replaces the unfinished shards this run wrote), or add data")


main = main_entry(prepare_data)

if __name__ == "__main__":
    main()
