"""data_prep.py against its baselines, whole runs from launch to the last shard, on the same parquet files (a local
copy laid out like FineWeb-Edu's sample-10BT) with the same process count:

  data_prep   data_prep.py --source hf, as its command line runs it
  pool        the scheme of build-nanogpt's fineweb.py (datasets.load_dataset, then Pool.imap(tokenize, rows,
              chunksize=16) into uint16 shards; written here from its description)
  loop        one process: each parquet file read with pyarrow, each document encoded in turn

  python bench_data_prep.py [--corpus-mb 50] [--text-root DIR ...] [--repeats 1] [--schemes data_prep,pool,loop]

Each run is its own process. Figures: seconds, CPU seconds, tokens (every scheme must give the same token stream),
peak memory (PSS) of the process tree and peak disk (cache + output). Prints a table and, with --out FILE, writes the
figures as JSON.
"""
import argparse
import cli
import contextlib
import hashlib
import itertools
import multiprocessing
import os
import re
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import data_prep
import data_sources
import shards
from cli import (REPO_DIR, UserError, ensure_writable_dir, finite_float, main_entry, path_arg,
                 run_and_write_result)
from tokenizer import EOT_ID, get_tokenizer

WRITTEN_BY = "bench_data_prep.py"  # the marker of its --out results (cli.write_json): it replaces only those
SCHEMES = ("data_prep", "pool", "loop")
DATA_PREP_COLUMNS = ("id", "dump", "url", "file_path", "language", "language_score", "token_count", "score",
                     "int_score")  # FineWeb-Edu's columns besides text: datasets' Arrow cache holds them all
TEXT_SUFFIXES = (".py", ".md", ".rst", ".txt", ".html")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # the corpus is local: no scheme may go online
# A fresh interpreter per run, as a command line starts one: no scheme inherits this process's imports or memory
SPAWN = multiprocessing.get_context("spawn")


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=finite_float, default=50, help="corpus size in MB (default: 50)")
    parser.add_argument("--text-root", nargs="+", metavar="DIR", type=path_arg,
                        help="build the corpus from the text files under these folders (.py .md .rst .txt .html, "
                             "cut into ~4 KB documents at blank lines, repeated with a pass number when short); "
                             "default: the embedded corpus's speeches, repeated")
    parser.add_argument("--workers", type=int, default=data_prep.available_cores(),
                        help="processes of every parallel scheme (default: all cores, here %(default)s)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default: 100M)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="whole runs of each scheme, taking turns; the fastest is reported (default: 1)")
    parser.add_argument("--schemes", default=",".join(SCHEMES),
                        help="which to run, comma-separated (default: %(default)s)")
    parser.add_argument("--work-dir", type=path_arg, default=str(REPO_DIR / "temp_data" / "bench_data_prep"),
                        help="corpus, caches and outputs, removed afterwards: a new or empty folder, or one an "
                             "earlier benchmark left (default: %(default)s)")
    parser.add_argument("--out", type=path_arg, help="write the figures as JSON to this file")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# The corpus

def local_documents(roots: list[str]):
    """~4 KB documents (whole paragraphs) from the UTF-8 text files under `roots`, in path order."""
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.suffix not in TEXT_SUFFIXES or not path.is_file():
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            doc = []
            for paragraph in data_sources.split_paragraphs(text):
                doc.append(paragraph)
                if sum(map(len, doc)) >= 4000:
                    yield "\n\n".join(doc)
                    doc = []
            if doc:
                yield "\n\n".join(doc)


def write_bench_corpus(folder: Path, megabytes: float, text_roots: list[str] | None, files: int = 8) -> int:
    """A folder laid out like FineWeb-Edu (README.md whose configs map sample-10BT to sample/10BT/*.parquet) with
    `files` parquet files of about `megabytes` MB of text in all, row groups of 1,000 documents; returns the text
    bytes. Documents repeat (with a pass number in front) when the source is shorter."""
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n  - split: train\n"
                                      "    path: sample/10BT/*.parquet\n---\n")
    docs, size = [], 0
    for repeat in itertools.count():
        if repeat and not docs:
            raise UserError(f"--text-root {' '.join(text_roots)}: no UTF-8 text file ({', '.join(TEXT_SUFFIXES)}) "
                            "under it; give folders that hold some")
        for doc in (local_documents(text_roots) if text_roots else data_sources.embedded_documents()):
            doc = f"({repeat}) {doc}" if repeat else doc
            docs.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= megabytes * 1e6:
                break
        if size >= megabytes * 1e6:
            break
    (folder / "sample" / "10BT").mkdir(parents=True)
    per_file = -(-len(docs) // files)
    for i in range(files):
        part = docs[i * per_file:(i + 1) * per_file]
        extra = {name: [f"{name}-{i}-{j}" for j in range(len(part))] for name in DATA_PREP_COLUMNS}
        pq.write_table(pa.table({"text": part, **extra}), folder / "sample" / "10BT" / f"{i:03d}_00000.parquet",
                       row_group_size=1000)
    return size


# ----------------------------------------------------------------------------------------------------------------
# The schemes: each is the body of one run's process

def data_prep_scheme(corpus: Path, out: Path, cache: Path, workers: int, shard_tokens: int,
                     first_document: Path) -> None:
    """data_prep.py --source hf on the corpus, its command line's whole run; the time the first document reaches a
    worker goes to `first_document` (the pool's forked workers inherit the noting tokenizer function)."""
    data_prep.tokenize_documents = noting_the_first(data_prep.tokenize_documents, first_document)
    data_prep.main(["--source", "hf", "--dataset", str(corpus), "--name", "sample-10BT", "--out", str(out),
                    "--workers", str(workers), "--shard-tokens", str(shard_tokens), "--cache-dir", str(cache)])


def noting_the_first(tokenize, first_document: Path):
    """`tokenize` that first writes the time to `first_document` unless that file exists (created exclusively: of
    all the workers' calls, the first one writes)."""
    def tokenize_noting_the_first(texts):
        with contextlib.suppress(FileExistsError), open(first_document, "x") as f:
            f.write(repr(time.time()))
        return tokenize(texts)
    return tokenize_noting_the_first


def encode_document(text: str) -> np.ndarray:
    """fineweb.py's tokenization: <|endoftext|>, then the document's ids as uint16."""
    return np.array([EOT_ID, *get_tokenizer().encode_ordinary(text)], dtype=np.uint16)


def encode_row(row: dict) -> np.ndarray:
    return encode_document(row["text"])


def pool_scheme(corpus: Path, out: Path, cache: Path, workers: int, shard_tokens: int) -> None:
    """fineweb.py's scheme: the dataset loaded (and converted to Arrow) by datasets, rows sent to a pool 16 at a
    time, token arrays back in order into the shard buffer."""
    import datasets  # only here, as in data_prep.py: the rest of the repo runs on machines without `datasets`
    rows = datasets.load_dataset(str(corpus), name="sample-10BT", split="train", cache_dir=str(cache))
    writer = RawShards(out, shard_tokens)
    with multiprocessing.Pool(workers) as pool:
        for tokens in pool.imap(encode_row, rows, chunksize=16):
            writer.add(tokens)
    writer.close()


def loop_scheme(corpus: Path, out: Path, shard_tokens: int) -> None:
    """One process: each parquet file read with pyarrow, each document encoded in turn."""
    writer = RawShards(out, shard_tokens)
    for path in sorted((corpus / "sample" / "10BT").glob("*.parquet")):
        for text in pq.read_table(path, columns=["text"]).column(0).to_pylist():
            writer.add(encode_document(text))
    writer.close()


class RawShards:
    """The token stream cut into headerless uint16 files of `shard_tokens` (the first one val), as fineweb.py
    writes them."""

    def __init__(self, out: Path, shard_tokens: int):
        self.out, self.buffer, self.fill, self.count = out, np.empty(shard_tokens, np.uint16), 0, 0
        out.mkdir(parents=True)

    def add(self, tokens) -> None:
        while self.fill + tokens.size >= self.buffer.size:  # the shard fills up: its remainder, then the next shard
            remainder = self.buffer.size - self.fill
            self.buffer[self.fill:] = tokens[:remainder]
            self.fill, tokens = self.buffer.size, tokens[remainder:]
            self.close()
        self.buffer[self.fill:self.fill + tokens.size] = tokens
        self.fill += tokens.size

    def close(self) -> None:
        if self.fill:
            self.buffer[:self.fill].tofile(self.out / f"{'val' if self.count == 0 else 'train'}_{self.count:06d}.bin")
            self.count, self.fill = self.count + 1, 0


def scheme_call(scheme: str, corpus: Path, out: Path, cache: Path, first_document: Path, args) -> tuple:
    """(the scheme's function, its arguments) for one run."""
    if scheme == "data_prep":
        return data_prep_scheme, (corpus, out, cache, args.workers, args.shard_tokens, first_document)
    if scheme == "pool":
        return pool_scheme, (corpus, out, cache, args.workers, args.shard_tokens)
    return loop_scheme, (corpus, out, args.shard_tokens)


# ----------------------------------------------------------------------------------------------------------------
# Measuring a run

def process_tree_pss(pid: int) -> int:
    """Proportional resident bytes (PSS: pages shared by forked workers counted once in all) of `pid` and all its
    descendants, from /proc."""
    children, pss = {}, 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                children.setdefault(int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(
                    int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            rollup = (Path("/proc") / str(p) / "smaps_rollup").read_text()
            pss += int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1)) * 1024
        except (OSError, AttributeError):
            pass
    return pss


def folder_bytes(*folders: Path) -> int:
    return sum(p.stat().st_size for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file())


def logged(log: Path, function, *args) -> None:
    """The body of a run's process: function(*args), its output (its children's too) going to `log`. Its pools
    start their workers the platform's default way, as on a command line: a spawned process inherits the spawn
    method."""
    multiprocessing.set_start_method(None, force=True)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    function(*args)


def run_measured(scheme: str, call: tuple, log: Path, disk_folders: list[Path]) -> dict:
    """Run call = (function, args) in a process of its own; its wall time, CPU time (all its processes), and peaks
    of process-tree PSS and of the disk used under `disk_folders`, sampled every 0.1 s."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = SPAWN.Process(target=logged, args=(log, call[0], *call[1]))
    process.start()
    peaks = {"memory": 0, "disk": 0}  # memory: PSS of the process tree
    while process.is_alive():
        peaks["memory"] = max(peaks["memory"], process_tree_pss(process.pid))
        peaks["disk"] = max(peaks["disk"], folder_bytes(*disk_folders))
        process.join(0.1)
    seconds = time.perf_counter() - start
    if process.exitcode != 0:
        output = log.read_text(errors="replace").strip()[-2000:] if log.exists() else "no output"
        raise UserError(f"the {scheme} scheme failed (exit status {process.exitcode}): {output}")
    peaks["disk"] = max(peaks["disk"], folder_bytes(*disk_folders))
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = cpu.ru_utime + cpu.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_pss_bytes": peaks["memory"],
            "peak_disk_bytes": peaks["disk"]}


def token_stream(out: Path) -> tuple[int, str]:
    """(token count, sha256 of the tokens) of an output folder: data_prep.py's shards in manifest order, or the
    headerless shards in name order (val first)."""
    digest, count = hashlib.sha256(), 0
    if (out / shards.MANIFEST_NAME).exists():
        manifest = shards.read_manifest(out)
        arrays = (shards.open_shard(out / s["file"], s["tokens"]) for s in manifest["shards"])
    else:
        files = sorted(out.glob("*.bin"), key=lambda p: int(p.stem.split("_")[1]))  # val_000000, train_000001, ...
        arrays = (np.fromfile(p, dtype=np.uint16) for p in files)
    for tokens in arrays:
        digest.update(np.ascontiguousarray(tokens).tobytes())
        count += tokens.size
    return count, digest.hexdigest()


def run_scheme(scheme: str, root: Path, corpus: Path, args) -> dict:
    """One whole run of `scheme` on the corpus, measured; its output and cache are removed afterwards."""
    out, cache, first_document = root / f"out_{scheme}", root / f"cache_{scheme}", root / "first_document"
    first_document.unlink(missing_ok=True)
    launched = time.time()
    try:
        run = run_measured(scheme, scheme_call(scheme, corpus, out, cache, first_document, args),
                           root / f"{scheme}.log", [out, cache])
        run["tokens"], run["sha256"] = token_stream(out)
        run["shard_bytes"], run["cache_bytes"] = folder_bytes(out), folder_bytes(cache)
        if scheme == "data_prep":
            run["first_document_s"] = float(first_document.read_text()) - launched
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return run


def best_of(runs: list[dict]) -> dict:
    """The runs of one scheme summed up: the least disturbed time (minimum: other load only ever adds), the
    largest memory and disk, and every time."""
    summary = {**runs[-1], "seconds_each": [r["seconds"] for r in runs]}
    for key in ("seconds", "cpu_seconds", "first_document_s"):
        if key in runs[-1]:
            summary[key] = min(r[key] for r in runs)
    for key in ("peak_pss_bytes", "peak_disk_bytes"):
        summary[key] = max(r[key] for r in runs)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The race

WORK_DIR_MARKER = ".bench-data-prep"  # in a --work-dir this benchmark made: it may remove that folder


def claim_work_dir(root: Path) -> Path:
    """--work-dir, emptied and marked as this benchmark's (the marker file) for this run, which removes it
    afterwards. A non-empty folder without the marker holds someone else's files: refused, nothing removed. One with
    it is the leftover of an earlier benchmark (killed before its cleanup): cleared."""
    if root.is_dir() and any(root.iterdir()) and not (root / WORK_DIR_MARKER).is_file():
        raise UserError(f"--work-dir {root} holds files bench_data_prep.py did not write, and the benchmark removes "
                        "its work folder afterwards; give a new or empty folder")
    if root.is_dir():
        shutil.rmtree(root)
    ensure_writable_dir(root, "--work-dir")
    (root / WORK_DIR_MARKER).touch()
    return root


def check_flags(args) -> None:
    """Every flag value that cannot work, all in one line, before any work."""
    problems = [f"--corpus-mb {args.corpus_mb}: must be > 0"] if args.corpus_mb <= 0 else []
    problems += [f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1"
                 for name in ("workers", "shard_tokens", "repeats") if getattr(args, name) < 1]
    if not set(args.schemes.split(",")) <= set(SCHEMES):
        problems.append(f"--schemes {args.schemes}: choose from {', '.join(SCHEMES)}")
    missing = [root for root in args.text_root or [] if not Path(root).is_dir()]
    if missing:  # (the corpus is built by repeating what they hold: from nothing it would never end)
        problems.append(f"--text-root {' '.join(missing)}: no such folder")
    if problems:
        raise UserError("; ".join(problems))


def race(args) -> dict:
    check_flags(args)
    schemes = args.schemes.split(",")
    root = claim_work_dir(Path(args.work_dir))
    os.environ.update(OFFLINE)  # each run's process inherits it
    runs = {scheme: [] for scheme in schemes}
    try:
        corpus = root / "fineweb-edu"
        text_bytes = write_bench_corpus(corpus, args.corpus_mb, args.text_root)
        corpus_bytes = folder_bytes(corpus / "sample")
        for _ in range(args.repeats):  # the schemes take turns, so that a busy spell is shared out
            for scheme in schemes:
                runs[scheme].append(run_scheme(scheme, root, corpus, args))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    streams = {(r["tokens"], r["sha256"]) for scheme_runs in runs.values() for r in scheme_runs}
    if len(streams) != 1:
        raise UserError(f"the schemes made different token streams: { {k: r[0]['tokens'] for k, r in runs.items()} }")
    results = {scheme: best_of(scheme_runs) for scheme, scheme_runs in runs.items()}
    result = {"corpus_mb": text_bytes / 1e6, "parquet_mb": corpus_bytes / 1e6, "tokens": next(iter(streams))[0],
              "workers": args.workers, "shard_tokens": args.shard_tokens, "repeats": args.repeats,
              "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0], "schemes": results,
              "same_tokens": True}
    if "data_prep" in results:
        for other in set(results) - {"data_prep"}:
            result[f"speedup_vs_{other}"] = results[other]["seconds"] / results["data_prep"]["seconds"]
    print_table(result)
    return result


def print_table(result: dict) -> None:
    print(f"\ndata-prep: {result['corpus_mb']:.1f} MB of text in {result['parquet_mb']:.1f} MB of parquet, "
          f"{result['tokens'] / 1e6:.1f}M tokens (identical in every scheme), {result['workers']} processes, "
          f"shards of {result['shard_tokens']} tokens, best of {result['repeats']}, {result['cpu_count']} CPUs, "
          f"load average {result['load_average_1min']:.2f} at the end")
    labels = {"data_prep": "data_prep.py --source hf", "pool": "Pool.imap scheme (datasets load)",
              "loop": "single-process loop"}
    print(f"{'whole run':<34}{'seconds':>9}{'Mtok/s':>8}{'CPU s':>8}{'peak PSS MB':>13}{'peak disk MB':>14}")
    for name, r in result["schemes"].items():
        print(f"{labels[name]:<34}{r['seconds']:>9.2f}{result['tokens'] / r['seconds'] / 1e6:>8.2f}"
              f"{r['cpu_seconds']:>8.1f}{r['peak_pss_bytes'] / 1e6:>13.0f}{r['peak_disk_bytes'] / 1e6:>14.0f}")
    for key in sorted(k for k in result if k.startswith("speedup_vs_")):
        print(f"data_prep.py vs {key.removeprefix('speedup_vs_')}: {result[key]:.2f}x")
    if "data_prep" in result["schemes"]:
        print(f"first document in a worker {result['schemes']['data_prep']['first_document_s']:.2f} s after launch")


@main_entry(memory_hint="try a smaller --corpus-mb or fewer --workers")
def main(argv=None):
    run_and_write_result(race, parse_args(argv), WRITTEN_BY)


if __name__ == "__main__":
    main()
