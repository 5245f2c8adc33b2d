"""Where data_prep.py's documents come from: the embedded corpus, local files (.txt paragraphs, .json/.jsonl rows,
.parquet row groups) and Hugging Face datasets (a hub id at one pinned commit, or a local copy), each as a sequence
or stream of texts that the tokenizer pool reads (see data_prep.py's docstring for the routes and their costs).
`datasets`, `huggingface_hub` and `pyarrow` are imported only by the routes that use them: the embedded corpus and
a training run need none of them."""
import concurrent.futures
import contextlib
import functools
import glob
import json
import multiprocessing
import queue
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import shards
from cli import REPO_DIR, UserError, utf8_lines

EMBEDDED_CORPUS = REPO_DIR / "assets" / "corpus" / "tinyshakespeare.txt"
DOCS_PER_TASK = 1024  # documents per pool task: big enough to hide the IPC cost, small enough to balance the load
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# ----------------------------------------------------------------------------------------------------------------
# Documents of each source

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


def parquet_problem(path: str, field: str) -> str | None:
    """What stops the workers reading `field` from the parquet file `path`, found from its footer alone (pyarrow's
    ParquetFile reads only the footer: cheap for any size); None when nothing does."""
    try:
        metadata = _parquet_file(path).metadata
    except Exception as e:  # pyarrow's errors for a file that is not parquet have several types
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return (f"{path} cannot be read as parquet ({type(e).__name__}{': ' + message if message else ''}); "
                "replace the file")
    columns = metadata.schema.to_arrow_schema().names
    if field not in columns:
        return f"{path} has no field {field!r} (its fields: {', '.join(columns)}); pass --text-field"
    return None


def parquet_problems(paths: list[str], field: str) -> list[str]:
    """parquet_problem of each local file: checked before the output folder is made and the pool starts."""
    return [problem for path in paths if (problem := parquet_problem(path, field)) is not None]


def parquet_tasks(paths, field: str, limit: int | None):
    """Slices of at most DOCS_PER_TASK rows of each row group, file after file in the order given (`paths` may be
    a generator that downloads them: each is checked as it comes); stops after `limit` rows."""
    rows = 0
    for path in paths:
        problem = parquet_problem(path, field)
        if problem is not None:
            raise UserError(problem)
        metadata = _parquet_file(path).metadata
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
    files, seen = [], {}  # seen: (device, inode) -> (path, pattern) of each file taken
    for pattern in patterns:
        matches = sorted((str(Path(p).resolve()), p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches and Path(pattern).is_dir():
            raise UserError(f"--files {pattern} is a folder; give its files, e.g. '{Path(pattern) / '*.jsonl'}' "
                            f"(quoted)")
        if not matches:
            raise UserError(f"--files {pattern} matches no file; check the path (quote globs)")
        for path, as_matched in matches:
            stat = Path(path).stat()
            first = seen.get((stat.st_dev, stat.st_ino))
            if first is not None:  # (by two patterns, or a link beside its file: the same file twice)
                raise UserError(f"--files: {as_matched} (matched by {pattern!r}) is the file {first[0]} (matched by "
                                f"{first[1]!r}); its documents would be read twice, into both splits: name each file "
                                "once")
            seen[stat.st_dev, stat.st_ino] = (as_matched, pattern)
            files.append(path)
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
    with reading(what, files, args.text_field):
        return datasets.load_dataset(*load_args, streaming=args.streaming, cache_dir=args.cache_dir, **load_kwargs)


@contextlib.contextmanager
def reading(what: str, files: list[str], field: str):
    """Errors of datasets reading the input (at load, or later while streaming) become one line naming the input,
    and the file and line at fault when one of the --files cannot be decoded or holds no text in `field`."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # network, missing file, parse and schema errors all have their own types
        raise UserError(f"cannot load {what}: {first_bad_line(files, field) or underlying_error(e)}") from e


def underlying_error(error: Exception) -> str:
    """'Type: first line of its message' of the error that caused `error`: datasets wraps a decode or parse error
    of one file in a DatasetGenerationError that only says that something went wrong."""
    while type(error).__name__ == "DatasetGenerationError" and (error.__cause__ or error.__context__):
        error = error.__cause__ or error.__context__
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def first_bad_line(files: list[str], field: str) -> str:
    """'FILE line N (byte B): not UTF-8 (...)', or for a .jsonl file 'FILE line N: not JSON (...)' or a `field`
    that holds no string: the first line of the --files that cannot be read as text; '' when every line can (the
    load failed for another reason)."""
    for file in files:
        suffix = Path(file).suffix.lower()
        if suffix not in (".txt", ".json", ".jsonl"):
            continue
        with open(file, "rb") as f:
            for number, text, problem in utf8_lines(f):
                if problem:
                    return f"{file} line {number}: {problem}; fix or remove it"
                if suffix == ".jsonl" and text.strip():
                    try:
                        row = json.loads(text.strip())
                    except json.JSONDecodeError as e:
                        return f"{file} line {number}: not JSON ({e.msg} at column {e.colno}); fix or remove it"
                    value = row.get(field) if isinstance(row, dict) else None
                    if value is not None and not isinstance(value, str):
                        return f"{file} line {number}: {not_text(field, value)}"
    return ""


def not_text(field: str, value) -> str:
    """What a row whose text field holds `value`, no string, is told (data_prep.py's tokenizer says it too)."""
    return (f"its {field!r} field holds {type(value).__name__} {str(value)[:40]!r}, not text; fix that row, or give "
            "--text-field the field that holds the text")


def source_record(args) -> dict:
    """What --source reads, for the manifest (cheap: nothing is loaded yet)."""
    if args.source == "embedded":
        return {"type": "embedded", "file": str(EMBEDDED_CORPUS.relative_to(REPO_DIR)),
                "sha256": shards.file_sha256(EMBEDDED_CORPUS), "documents": "paragraphs (speeches)"}
    if args.source == "hf":
        return {"type": "hf", "dataset": args.dataset, "name": args.name, "split": args.split,
                "text_field": args.text_field}
    files, reader = expand_files(args.files)
    return {"type": "files", "files": files, "reader": reader, "text_field": args.text_field,
            "file_versions": [file_version(f) for f in files]}


def file_version(path: str) -> list[int]:
    """[size in bytes, modification time in ns]: a local input that changed since a build no longer matches its
    manifest (cheap, where a hash would read the whole corpus)."""
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]


def load_texts(args, source: dict):
    """The documents: a sequence the workers slice themselves, a generator of parquet slices the workers read
    themselves, or (streaming) an iterator of lists of texts."""
    if source["type"] == "embedded":
        return embedded_documents()[:args.max_docs]
    if source["type"] == "files":
        what, files = f"--files {' '.join(args.files)}", source["files"]
        if source["reader"] == "parquet" and not args.streaming:
            return parquet_tasks(files, args.text_field, args.max_docs)
        ds = load_local_files(args, what, files, source["reader"])
    else:
        what = f"--dataset {args.dataset} --name {args.name} --split {args.split}"
        # a hub dataset is listed here only for the parquet route; streamed, datasets alone reads it
        files, revision = config_files(args, what) if Path(args.dataset).is_dir() or not args.streaming else ([], None)
        if not args.streaming and all(f.endswith(".parquet") for f in files):
            problems = parquet_problems(files, args.text_field) if revision is None else []  # (a local copy)
            if problems:
                raise UserError("; ".join(problems))
            at = f" at revision {revision}" if revision else ""
            print(f"data_prep: {what}: {len(files)} parquet files{at} ({files[0]}, ...), read by the workers directly")
            paths = files if revision is None else fetched_in_order(files, hub_download(args, revision))
            return parquet_tasks(paths, args.text_field, args.max_docs)
        files = files if revision is None else []  # local files, to name the one that cannot be decoded
        ds = load_hf_dataset(args, what, files, args.dataset, args.name, split=args.split, revision=revision,
                             num_proc=args.workers)
    with reading(what, files, args.text_field):  # a streamed dataset reads its first row here
        check_text_field(ds, args.text_field, what)
    if args.streaming:
        ds = ds.select_columns([args.text_field])
        if args.max_docs:
            ds = ds.take(args.max_docs)
        return stream_batches(ds, args.text_field, what, files)
    return ArrowTexts(ds, args.text_field, args.max_docs)


def load_local_files(args, what: str, files: list[str], reader: str):
    """--files through datasets: .txt by paragraph; .json/.jsonl with a text field of mixed types refused (named by
    first_bad_line) where datasets would keep it as JSON text (a number beside strings) and, across files, cast it to
    strings: that file's texts would be tokenized as JSON, quotes and all. Asked to refuse mixed types, datasets refuses
    them in any column: one the text is not in is then read again its own way (unused here). Streamed, the refusal
    comes while reading, and stands."""
    load = functools.partial(load_hf_dataset, args, what, files, reader, data_files=files, split="train",
                             num_proc=min(args.workers, len(files)))
    if reader == "text":
        return load(sample_by="paragraph")
    strict = {"on_mixed_types": None} if json_refuses_mixed_types() else {}
    try:
        return load(**strict)
    except UserError:
        if not strict or args.streaming or first_bad_line(files, args.text_field):
            raise
        return load()


def json_refuses_mixed_types() -> bool:
    """Whether this datasets' json reader takes on_mixed_types (newer ones; older ones refuse mixed types anyway)."""
    from datasets.packaged_modules.json.json import JsonConfig
    return "on_mixed_types" in JsonConfig.__dataclass_fields__


def stream_batches(ds, field: str, what: str, files: list[str]):
    """Lists of texts from a streamed dataset, which meets undecodable input only now."""
    with reading(what, files, field):
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
