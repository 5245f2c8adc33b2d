"""data_prep.py: documents -> shards -> decoded documents, output directory handling and bad input."""
import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data_prep
import data_sources
import shards
import tokenizer
from cli import UserError
from dataloader import ShardDataset, TrainLoader

DOCS = ["Hello world.", "", "naïve café — 東京 🚀\n\nsecond paragraph", None, "  spaces  ",
        "<|endoftext|> is text here", "The end."]


def prepare(out, *args, cache=None):
    """Run data_prep in-process with small shards; returns the manifest (+ timings)."""
    argv = ["--out", str(out), "--workers", "2", *args]
    if cache is not None:
        argv += ["--cache-dir", str(cache)]
    return data_prep.prepare_data(argv)


def decoded_documents(out) -> list[str]:
    """All shards in manifest order, split at the EOT id (which leads every document), each piece decoded."""
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = np.concatenate([shards.open_shard(out / s["file"], s["tokens"]) for s in manifest["shards"]])
    assert tokens[0] == tokenizer.EOT_ID
    starts = np.flatnonzero(tokens == tokenizer.EOT_ID)
    enc = tokenizer.get_tokenizer()
    return [enc.decode(piece[1:].tolist()) for piece in np.split(tokens, starts[1:])]


def shard_hashes(out) -> list[tuple[str, str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(s["file"], s["sha256"]) for s in manifest["shards"]]


def test_embedded_corpus_round_trip(tmp_path):
    out = tmp_path / "shakespeare"
    manifest = prepare(out, "--source", "embedded", "--shard-tokens", "100000", "--val-tokens", "30000")
    corpus = data_sources.EMBEDDED_CORPUS.read_text(encoding="utf-8")
    docs = decoded_documents(out)
    assert "\n\n".join(docs) == corpus  # nothing lost or reordered; documents cut only at blank lines
    assert all(doc and "\n\n" not in doc for doc in docs)
    assert manifest["documents"] == len(docs)
    sizes = [(s["split"], s["tokens"]) for s in manifest["shards"]]
    assert sizes[0] == ("val", 30000) and [size for _, size in sizes[1:-1]] == [100000] * (len(sizes) - 2)
    assert sum(size for _, size in sizes) == manifest["total_tokens"]
    assert manifest["total_tokens"] == manifest["val_tokens"] + manifest["train_tokens"]
    assert manifest["tokenizer_sha256"] == tokenizer.tokenizer_sha256()
    ds = ShardDataset.open(out, verify_sha256=True)
    assert (ds.val_tokens, ds.train_tokens) == (manifest["val_tokens"], manifest["train_tokens"])
    x, y = TrainLoader(ds, batch_size=2, seq_len=64, seed=0).next_batch()
    assert torch_equal_shifted(x, y)


def torch_equal_shifted(x, y) -> bool:
    return bool((x[:, 1:] == y[:, :-1]).all())


def test_embedded_defaults_give_both_splits(tmp_path):
    manifest = prepare(tmp_path / "d", "--source", "embedded", "--max-docs", "2000")
    splits = [s["split"] for s in manifest["shards"]]
    assert splits == ["val", "train"] and manifest["val_tokens"] == data_prep.EMBEDDED_VAL_TOKENS


def test_output_does_not_depend_on_worker_count(tmp_path):
    common = ["--source", "embedded", "--max-docs", "3000", "--shard-tokens", "20000", "--val-tokens", "5000"]
    data_prep.prepare_data([*common, "--out", str(tmp_path / "one"), "--workers", "1"])
    data_prep.prepare_data([*common, "--out", str(tmp_path / "two"), "--workers", "2"])
    assert shard_hashes(tmp_path / "one") == shard_hashes(tmp_path / "two")


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: doc, "id": i}) + "\n" for i, doc in enumerate(docs)))


def write_parquet(path, docs, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path)


@pytest.mark.parametrize("kind,streaming", [("jsonl", False), ("jsonl", True), ("parquet", False)])
def test_local_files_round_trip(tmp_path, kind, streaming):
    write = write_jsonl if kind == "jsonl" else write_parquet
    write(tmp_path / f"a.{kind}", DOCS[:4] * 4)  # (4 times: each split must hold 129 tokens)
    write(tmp_path / f"b.{kind}", DOCS[4:] * 4)
    (tmp_path / f"c.{kind}").write_bytes(b"")  # skipped (datasets' num_proc fails on a job of empty files)
    out = tmp_path / "out"
    manifest = prepare(out, "--source", "files", "--files", str(tmp_path / f"*.{kind}"), "--shard-tokens", "8",
                       "--val-tokens", "5", *(["--streaming"] if streaming else []), cache=tmp_path / "cache")
    expected = [doc for doc in DOCS[:4] * 4 + DOCS[4:] * 4 if doc]  # files in sorted order; empty, null texts skipped
    assert decoded_documents(out) == expected
    assert manifest["documents"] == len(expected)
    assert [s["tokens"] for s in manifest["shards"] if s["split"] == "val"] == [5]
    assert manifest["settings"]["source"]["files"] == [str(tmp_path / f"a.{kind}"), str(tmp_path / f"b.{kind}")]


def test_text_files_match_the_embedded_source(tmp_path):
    common = ["--shard-tokens", "100000", "--val-tokens", "30000"]
    prepare(tmp_path / "embedded", "--source", "embedded", *common)
    prepare(tmp_path / "files", "--source", "files", "--files", str(data_sources.EMBEDDED_CORPUS), *common,
            cache=tmp_path / "cache")
    assert shard_hashes(tmp_path / "files") == shard_hashes(tmp_path / "embedded")


def test_max_docs_and_max_tokens_slice_the_stream(tmp_path):
    manifest = prepare(tmp_path / "docs", "--source", "embedded", "--max-docs", "100", "--val-tokens", "500")
    assert manifest["documents"] == 100
    manifest = prepare(tmp_path / "tokens", "--source", "embedded", "--max-tokens", "12345", "--val-tokens", "2000")
    assert manifest["total_tokens"] == 12345
    docs = decoded_documents(tmp_path / "tokens")
    assert manifest["documents"] == len(docs) and docs[-1] != data_sources.embedded_documents()[len(docs) - 1]  # cut


def test_rerun_on_finished_output_and_overwrite(tmp_path, capsys):
    out = tmp_path / "d"
    args = ["--source", "embedded", "--max-docs", "500", "--val-tokens", "1000"]
    prepare(out, *args)
    mtime = (out / "train_000000.bin").stat().st_mtime_ns
    prepare(out, *args)
    assert "already holds this dataset" in capsys.readouterr().out
    assert (out / "train_000000.bin").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="other settings.*--overwrite"):
        prepare(out, "--source", "embedded", "--max-docs", "400", "--val-tokens", "1000")
    manifest = prepare(out, "--source", "embedded", "--max-docs", "400", "--val-tokens", "1000", "--overwrite")
    assert manifest["documents"] == 400 and json.loads((out / "manifest.json").read_text())["documents"] == 400


def test_overwrite_does_not_hash_the_dataset_it_replaces(tmp_path, monkeypatch):
    """Judging whether --out holds this very dataset reads every shard (minutes for 10B tokens): --overwrite, which
    replaces it whatever it is, skips that."""
    out = tmp_path / "d"
    prepare(out, "--source", "embedded", "--max-docs", "300", "--val-tokens", "1000")
    real = shards.file_sha256
    monkeypatch.setattr(shards, "file_sha256", lambda path: pytest.fail(f"{path} hashed") if Path(path).parent == out
                        else real(path))
    assert prepare(out, "--source", "embedded", "--max-docs", "300", "--val-tokens", "1000", "--overwrite")["shards"]


@pytest.mark.parametrize("change", ["appended", "rewritten, same size", "touched"])
def test_a_rerun_after_a_local_input_changed_is_not_nothing_to_do(change, tmp_path, capsys):
    """The manifest named the --files inputs only: a rerun after one changed said 'already holds this dataset'."""
    write_jsonl(tmp_path / "a.jsonl", data_sources.embedded_documents()[:60])
    write_jsonl(tmp_path / "b.jsonl", data_sources.embedded_documents()[60:120])
    args = ["--source", "files", "--files", str(tmp_path / "*.jsonl"), "--val-tokens", "1000"]
    prepare(tmp_path / "d", *args, cache=tmp_path / "cache")
    b = tmp_path / "b.jsonl"
    stat = b.stat()
    if change == "appended":
        b.write_text(b.read_text() + json.dumps({"text": "one more document"}) + "\n")
    elif change == "rewritten, same size":
        b.write_text(b.read_text().replace("a", "e"))
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # (a coarse clock could give the same time)
    with pytest.raises(UserError, match=f"built from an earlier version of {re.escape(str(b))} .*--overwrite"):
        prepare(tmp_path / "d", *args, cache=tmp_path / "cache")
    prepare(tmp_path / "d", *args, "--overwrite", cache=tmp_path / "cache")
    assert decoded_documents(tmp_path / "d") == data_sources.embedded_documents()[:60] + [
        json.loads(line)["text"] for line in b.read_text().splitlines()]
    prepare(tmp_path / "d", *args, cache=tmp_path / "cache")
    assert "already holds this dataset" in capsys.readouterr().out


@pytest.mark.parametrize("patterns, link", [
    (["{d}/*.jsonl", "{d}/a.jsonl"], None), (["{d}/a.jsonl", "{d}/a.jsonl"], None),
    (["{d}/*.jsonl", "{d}/../in/*.jsonl"], None),
    (["{d}/*.jsonl"], "symlink"), (["{d}/*.jsonl"], "hard link"),  # one pattern: a link beside its file
    (["{d}/a.jsonl", "{d}/c.jsonl"], "symlink"), (["{d}/a.jsonl", "{d}/c.jsonl"], "hard link")])
def test_the_same_file_matched_twice_is_refused(patterns, link, tmp_path, no_pool):
    """Its documents were tokenized twice, the first ones in the val split and again in train: two patterns matching
    it, or a symbolic or hard link to it beside it."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ["some text"])
    write_jsonl(folder / "b.jsonl", ["more text"])
    if link == "symlink":
        (folder / "c.jsonl").symlink_to("a.jsonl")
    elif link == "hard link":
        os.link(folder / "a.jsonl", folder / "c.jsonl")
    files = [p.format(d=folder) for p in patterns]
    with pytest.raises(UserError, match=r"--files: .*jsonl \(matched by .*\) is the file .*a.jsonl \(matched by "
                                        r".*\); its documents would be read twice, into both splits"):
        prepare(tmp_path / "out", "--source", "files", "--files", *files)
    assert not (tmp_path / "out").exists()


def test_a_files_folder_is_named_a_folder(tmp_path, no_pool):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", ["some text"])
    with pytest.raises(UserError, match=f"--files {re.escape(str(tmp_path / 'in'))} is a folder; give its files"):
        prepare(tmp_path / "out", "--source", "files", "--files", str(tmp_path / "in"))


def inputs_with_a_row_that_is_no_text(case: str, folder: Path) -> tuple[list[str], str]:
    """(--files, the start of the line naming the bad row): a .jsonl row in the first pool task or the second
    (datasets refuses mixed types and the file's line is named), or a second parquet file whose text column holds
    numbers (the tokenizer names the row, counted across files)."""
    if case == "parquet, second file":
        write_parquet(folder / "a.parquet", ["first file"] * 1000)
        write_parquet(folder / "b.parquet", list(range(5, 2005)))
        return [str(folder / "*.parquet")], "row 1001 of the input: its 'text' field holds int '5', not text"
    docs = ["fine text"] * 2000
    bad_row = 1 if case == "jsonl, first row" else 1500
    docs[bad_row - 1] = {"k": 1}
    write_jsonl(folder / "a.jsonl", docs)
    return [str(folder / "a.jsonl")], (f"{folder / 'a.jsonl'} line {bad_row}: its 'text' field holds dict "
                                       f"\"{{'k': 1}}\", not text")


@pytest.mark.parametrize("case, streaming", [("jsonl, first row", False), ("jsonl, first row", True),
                                             ("jsonl, row 1500", False), ("jsonl, row 1500", True),
                                             ("parquet, second file", False)])
def test_a_row_that_holds_no_text_is_named_by_its_number(case, streaming, tmp_path):
    """'a document's text field holds int, not a string; pass the right --text-field': no row named, and the advice
    wrong when the field is right but one row is not text."""
    assert data_sources.DOCS_PER_TASK < 1500  # (row 1500 is in a later task than row 1)
    files, said = inputs_with_a_row_that_is_no_text(case, tmp_path)
    with pytest.raises(UserError, match=re.escape(said) + "; fix that row, or give --text-field"):
        prepare(tmp_path / "out", "--source", "files", "--files", *files, *(["--streaming"] if streaming else []),
                cache=tmp_path / "cache")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("value", [12345, 1.5, ["a"]])
def test_a_non_text_row_in_a_later_jsonl_file_is_named_not_tokenized_as_json(value, streaming, tmp_path):
    """datasets keeps a column of mixed types as JSON text and casts it to strings beside another file: every
    document of the second file was tokenized with its JSON quotes, the number as a document, exit 0."""
    docs = data_sources.embedded_documents()
    write_jsonl(tmp_path / "a.jsonl", docs[:300])
    write_jsonl(tmp_path / "b.jsonl", docs[300:303] + [value] + docs[303:310])
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'b.jsonl'} line 4: its 'text' field holds "
                                                  f"{type(value).__name__} {str(value)!r}, not text")):
        prepare(tmp_path / "out", "--source", "files", "--files", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                *(["--streaming"] if streaming else []), cache=tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_another_column_of_mixed_types_does_not_stop_the_build(tmp_path):
    """Refusing mixed types in the text field must not refuse them where the text is not (an id of numbers and
    strings): those files still build, their texts as they are."""
    docs = data_sources.embedded_documents()[:400]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"text": doc, "id": i if i % 2 else str(i)}) + "\n"
                                              for i, doc in enumerate(docs[:200])))
    write_jsonl(tmp_path / "n.jsonl", docs[200:])
    prepare(tmp_path / "out", "--source", "files", "--files", str(tmp_path / "*.jsonl"), cache=tmp_path / "cache")
    assert decoded_documents(tmp_path / "out") == docs


def test_rows_without_a_text_are_counted_in_a_warning(tmp_path, capsys):
    """They were left out silently (199 of 200 documents built, and nothing said)."""
    write_jsonl(tmp_path / "a.jsonl", data_sources.embedded_documents()[:100])
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write('{"body": "another field"}\n{"text": null}\n{"text": ""}\n')
    manifest = prepare(tmp_path / "out", "--source", "files", "--files", str(tmp_path / "a.jsonl"),
                       cache=tmp_path / "cache")
    assert manifest["documents"] == 100
    assert "warning: 2 of the 103 rows read have no 'text' value (the field is missing or null); they are left out" \
        in capsys.readouterr().err


def test_unfinished_build_is_refused_until_overwrite(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "train_000007.bin").write_bytes(b"left over from a killed run")
    (out / ".val_000000.bin.tmp").write_bytes(b"half")
    args = ["--source", "embedded", "--max-docs", "300", "--val-tokens", "1000"]
    with pytest.raises(UserError, match=r"unfinished build \(no manifest.json\); pass --overwrite"):
        prepare(out, *args)
    assert sorted(p.name for p in out.iterdir()) == [".val_000000.bin.tmp", "train_000007.bin"]  # untouched
    manifest = prepare(out, *args, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *(s["file"] for s in manifest["shards"])])


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])  # the second keeps the size: only sha256 sees it
def test_damaged_finished_output_is_refused_until_overwrite(tmp_path, damage):
    out = tmp_path / "d"
    args = ["--source", "embedded", "--max-docs", "300", "--val-tokens", "1000"]
    prepare(out, *args)
    shard = out / "train_000000.bin"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[:-10]
    else:
        data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"damaged dataset \(shard .*train_000000.bin is (truncated|corrupt).*--overwrite"):
        prepare(out, *args)
    prepare(out, *args, "--overwrite")
    ShardDataset.open(out, verify_sha256=True)


def tree(folder: Path) -> dict[str, bytes] | None:
    """Every file under `folder` by relative path with its bytes (None when the folder does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --overwrite of a 6-shard build (400 documents, shards of 4,000 tokens) by a 4-shard one (300): shards written,
# the old manifest removed, shards replaced, the old build's extra shards removed, the manifest moved in
OLD_BUILD = ["--source", "embedded", "--max-docs", "400", "--val-tokens", "1000", "--shard-tokens", "4000"]
NEW_BUILD = ["--source", "embedded", "--max-docs", "300", "--val-tokens", "1000", "--shard-tokens", "4000"]
FILE_STEPS = 15  # renames and deletions of that --overwrite, counted by the test below


def failing_file_step(monkeypatch, fail_at: int | None) -> list:
    """Count os.replace and Path.unlink calls (the list returned); the one numbered `fail_at` (from 0) raises."""
    calls = []
    for owner, name in [(os, "replace"), (Path, "unlink")]:
        def counted(*args, real=getattr(owner, name), **kwargs):
            calls.append(args)
            if len(calls) - 1 == fail_at:
                raise OSError(5, "Input/output error")
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)
    return calls


def test_the_crash_matrix_covers_every_file_step_of_an_overwrite(tmp_path, monkeypatch):
    prepare(tmp_path / "d", *OLD_BUILD)
    calls = failing_file_step(monkeypatch, None)
    prepare(tmp_path / "d", *NEW_BUILD, "--overwrite")
    assert len(calls) < FILE_STEPS


@pytest.mark.parametrize("fail_at", range(FILE_STEPS))
def test_a_crash_in_an_overwrite_never_leaves_a_manifest_of_other_shards(fail_at, tmp_path, monkeypatch):
    """A crash at any rename or deletion of --overwrite (fail_at: the one that raises) leaves the old dataset, or the
    new one, or no manifest.json (an unfinished build, refused until --overwrite); never a manifest whose shards are
    missing or of the other build. A rerun mends any of these."""
    out = tmp_path / "d"
    prepare(out, *OLD_BUILD)
    failing_file_step(monkeypatch, fail_at)
    try:
        prepare(out, *NEW_BUILD, "--overwrite")
    except OSError as e:
        assert "Input/output error" in str(e)
    monkeypatch.undo()
    if (out / "manifest.json").exists():
        assert ShardDataset.open(out, verify_sha256=True).manifest["documents"] in (300, 400)
    else:
        with pytest.raises(UserError, match=r"unfinished build \(no manifest.json\)"):
            prepare(out, *OLD_BUILD)
    prepare(out, *NEW_BUILD, "--overwrite")
    assert ShardDataset.open(out, verify_sha256=True).manifest["documents"] == 300
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train_000000.bin", "train_000001.bin",
                                                     "train_000002.bin", "val_000000.bin"]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("before", ["absent", "finished"])
def test_a_build_under_way_in_out_is_not_disturbed(before, overwrite, tmp_path, capsys):
    """A second data_prep.py on the same --out removed the first one's staging folder as a killed build's; the
    first then published a damaged dataset with exit 0. (The test holds the staging folder's lock, as a run does.)"""
    from cli import lock_exclusively
    out = tmp_path / "d"
    args = ["--source", "embedded", "--max-docs", "300", "--val-tokens", "1000"]
    if before == "finished":
        prepare(out, *args)
    staging = out / data_prep.STAGING_NAME
    staging.mkdir(parents=True)
    (staging / "train_000000.bin").write_bytes(b"being written")
    lock = lock_exclusively(staging / data_prep.STAGING_LOCK)
    expected = tree(out)
    try:
        with pytest.raises(UserError, match=f"--out {re.escape(str(out))} is being built by another data_prep.py run "
                                            f"\\(pid {os.getpid()}\\); wait for it"):
            prepare(out, *args, *(["--overwrite"] if overwrite else []))
        assert tree(out) == expected
    finally:
        lock.close()
    prepare(out, *args, "--overwrite")  # once that run has ended, its folder is a killed build's
    assert not staging.exists() and ShardDataset.open(out, verify_sha256=True).manifest["documents"] == 300


def test_ctrl_c_while_publishing_waits_for_the_whole_build(tmp_path, monkeypatch):
    """Ctrl-C between two renames of --overwrite's publishing left old and new shards without a manifest: the signal
    now takes effect once --out holds the whole new build (a real SIGINT, sent at the second rename)."""
    import signal
    out = tmp_path / "d"
    prepare(out, *OLD_BUILD)
    real, calls = os.replace, []

    def replace_and_interrupt(*args, **kwargs):
        calls.append(args)
        if any(data_prep.STAGING_NAME in str(a) for a in args) and len(calls) == 2 + 5:  # (5 shards written first)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(os, "replace", replace_and_interrupt)
    # SIGINT as in a terminal: a suite started in the background (`./run_tests.sh &`) has it ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare(out, *NEW_BUILD, "--overwrite")
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert ShardDataset.open(out, verify_sha256=True).manifest["documents"] == 300
    assert not (out / data_prep.STAGING_NAME).exists()


def tiny_text(tmp_path) -> list[str]:
    (tmp_path / "tiny.txt").write_text("A few words.\n\nAnd a few more.\n")
    return ["--source", "files", "--files", str(tmp_path / "tiny.txt"), "--cache-dir", str(tmp_path / "cache")]


def empty_documents(tmp_path) -> list[str]:
    write_jsonl(tmp_path / "blank.jsonl", ["", None, ""])
    return ["--source", "files", "--files", str(tmp_path / "blank.jsonl"), "--cache-dir", str(tmp_path / "cache")]


def stopped_after_the_first_shard(monkeypatch, error):
    """The run stops (`error`: Ctrl-C, a full disk) once the first shard of the new build is written."""
    real = shards.write_shard

    def write_then_stop(path, tokens):
        real(path, tokens)
        raise error
    monkeypatch.setattr(shards, "write_shard", write_then_stop)
    return ["--source", "embedded", "--max-docs", "400", "--val-tokens", "1000", "--shard-tokens", "4000"]


FAILED_BUILDS = {
    "no tokens": lambda tmp_path, mp: (empty_documents(tmp_path), "yielded no tokens"),
    "too few tokens": lambda tmp_path, mp: (tiny_text(tmp_path), r"yielded only \d+ tokens: \d+ for validation and "
                                                                r"\d+ for training .*; add data"),
    "val split too small": lambda tmp_path, mp: (["--source", "embedded", "--max-docs", "30"],
                                                 r"110 for validation and 994 for training .*; run again with a "
                                                 r"--val-tokens from 129 to 975, or add data$"),
    "val takes all": lambda tmp_path, mp: (["--source", "embedded", "--max-docs", "30", "--val-tokens", "1000000"],
                                           r"1104 for validation and 0 for training.*--val-tokens from 129 to 975"),
    "ctrl-c": lambda tmp_path, mp: (stopped_after_the_first_shard(mp, KeyboardInterrupt()), None),
    "disk full": lambda tmp_path, mp: (stopped_after_the_first_shard(mp, OSError(28, "No space left on device")),
                                       "No space left on device"),
}


@pytest.mark.parametrize("before", ["absent", "empty", "finished", "killed build left"])
@pytest.mark.parametrize("case", FAILED_BUILDS)
def test_a_build_that_fails_or_stops_leaves_out_as_it_was(case, before, tmp_path, monkeypatch):
    """A build refused at its end (too few tokens, a split under 129 tokens or empty), stopped (Ctrl-C) or failing (a full
    disk) part way: --out holds what it held before, byte for byte (a finished dataset replaced with --overwrite
    included; data_prep.py removed it first, then wrote the unusable build, or left half of one), no staging folder,
    and a new --out (with its new parent) is gone again."""
    out = tmp_path / "new" / "out"
    if before != "absent":
        out.mkdir(parents=True)
    if before == "finished":
        prepare(out, "--source", "embedded", "--max-docs", "300", "--val-tokens", "1000")
    if before == "killed build left":  # what a run killed while writing leaves: the new one builds regardless
        (out / data_prep.STAGING_NAME).mkdir()
        (out / data_prep.STAGING_NAME / "train_000000.bin").write_bytes(b"half a shard")
    expected = tree(out) if before != "killed build left" else {}
    argv, message = FAILED_BUILDS[case](tmp_path, monkeypatch)
    with pytest.raises(KeyboardInterrupt if message is None else (UserError, OSError), match=message):
        prepare(out, *argv, "--overwrite")
    assert tree(out) == expected
    assert (tmp_path / "new").exists() == (before != "absent")


def test_a_killed_builds_staging_folder_is_no_content_of_out(tmp_path):
    """A build killed (SIGKILL) leaves its staging folder in --out: the next run builds without --overwrite and
    removes it, and a rerun over a finished dataset removes it too; a staging folder holding a file data_prep.py
    did not write is refused, and kept."""
    out = tmp_path / "d"
    args = ["--source", "embedded", "--max-docs", "300", "--val-tokens", "1000"]
    staging = out / data_prep.STAGING_NAME
    staging.mkdir(parents=True)
    (staging / ".train_000000.bin.tmp").write_bytes(b"half")
    prepare(out, *args)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train_000000.bin", "val_000000.bin"]
    staging.mkdir()
    (staging / "val_000000.bin").write_bytes(b"half")
    prepare(out, *args)
    assert not staging.exists()
    staging.mkdir()
    (staging / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"did not write \(e.g. '.data_prep-build/notes.txt'\)"):
        prepare(out, *args, "--overwrite")
    assert (staging / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["out", "staging folder"])
def test_a_finished_dataset_beside_a_users_file_is_reused(where, tmp_path, capsys):
    """A rerun that writes nothing was refused for a file of another name beside the dataset (a README the user
    added), which it leaves alone; it still stops a rebuild."""
    out = tmp_path / "d"
    args = ["--source", "embedded", "--max-docs", "300", "--val-tokens", "1000"]
    prepare(out, *args)
    folder = out if where == "out" else out / data_prep.STAGING_NAME
    folder.mkdir(exist_ok=True)
    (folder / "NOTES.txt").write_text("mine")
    before = tree(out)
    prepare(out, *args)
    assert "already holds this dataset" in capsys.readouterr().out and tree(out) == before
    with pytest.raises(UserError, match="did not write.*NOTES.txt"):
        prepare(out, *args, "--overwrite")
    assert tree(out) == before


@pytest.mark.parametrize("inside", ["", "sub"])
def test_an_out_named_like_the_build_folder_is_refused(inside, tmp_path):
    """--out .../.data_prep-build built a dataset there, which the next build into the folder above deleted as a
    killed build's, exit 0 (found by the final review)."""
    out = tmp_path / "a" / data_prep.STAGING_NAME / inside
    with pytest.raises(UserError, match="is the name of data_prep.py's build folder; choose another name"):
        prepare(out, "--source", "embedded", "--max-docs", "30")
    assert not (tmp_path / "a").exists()


def test_directory_holding_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write.*notes.txt"):
        prepare(tmp_path, "--source", "embedded", "--max-docs", "10", "--overwrite")
    assert (tmp_path / "notes.txt").exists() and not (tmp_path / "manifest.json").exists()


def test_bad_inputs_are_one_clear_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["x", "y"], field="body")
    cases = [
        (["--source", "files", "--files", str(tmp_path / "missing*.jsonl")], "matches no file"),
        (["--source", "files", "--files", str(tmp_path / "a.jsonl")], r"no field 'text' \(its fields: body, id\)"),
        (["--source", "embedded", "--files", "x.jsonl"], "only used with it"),
        (["--source", "embedded", "--max-docs", "20", "--val-tokens", "100000"], "549 for validation and 0 for training"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            data_prep.prepare_data([*argv, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    (tmp_path / "zero.jsonl").write_bytes(b"")
    with pytest.raises(UserError, match="every file is empty"):
        prepare(tmp_path / "out1", "--source", "files", "--files", str(tmp_path / "zero.jsonl"))
    write_jsonl(tmp_path / "empty.jsonl", ["", None])
    with pytest.raises(UserError, match="yielded no tokens"):
        prepare(tmp_path / "out2", "--source", "files", "--files", str(tmp_path / "empty.jsonl"),
                cache=tmp_path / "cache")
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(UserError, match="mixes file types"):
        prepare(tmp_path / "out3", "--source", "files", "--files", str(tmp_path / "a.jsonl"),
                str(tmp_path / "b.parquet"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_command_line_error_is_one_line_without_traceback(tmp_path, repo_dir):
    result = subprocess.run([sys.executable, "data_prep.py", "--source", "files", "--files", str(tmp_path / "*.jsonl"),
                             "--out", str(tmp_path / "out")], cwd=repo_dir, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --files") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_importing_data_prep_loads_neither_torch_nor_datasets(repo_dir):
    """Imports are paid before the first document is tokenized: data_prep.py needs neither torch (~1 s) nor datasets
    (~1 s, only for the sources that read through it)."""
    code = "import sys, data_prep; print([m for m in ('torch', 'datasets', 'transformers') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_dir, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------------------------
# --source hf on a local copy laid out like the hub's FineWeb-Edu

FINEWEB_CARD = """---
license: odc-by
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*.parquet
---
# FineWeb-Edu (a small local copy for the tests)
"""


def write_fineweb_table(path, docs, row_group_size):
    """A parquet file with FineWeb-Edu's columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    n = len(docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "text": docs, "id": [f"<urn:uuid:{i:08d}>" for i in range(n)], "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)], "file_path": ["s3://commoncrawl/x.warc.gz"] * n,
        "language": ["en"] * n, "language_score": [0.95] * n, "token_count": [len(d or "") // 4 for d in docs],
        "score": [3.1] * n, "int_score": [3] * n}), path, row_group_size=row_group_size)


@pytest.fixture(scope="module")
def fineweb_copy(tmp_path_factory):
    """README.md with the hub card's `configs:`, two sample/10BT files (row groups larger and smaller than a pool
    task, so tasks cut row groups and stop at their ends), and a file of another config that must not be read."""
    root = tmp_path_factory.mktemp("fineweb-edu")
    (root / "README.md").write_text(FINEWEB_CARD)
    speeches = data_sources.embedded_documents()
    files = {"000_00000.parquet": (speeches[:2600] + ["", None, *DOCS], 2500),
             "001_00000.parquet": (speeches[2600:3800], 300)}
    for name, (docs, row_group_size) in files.items():
        write_fineweb_table(root / "sample" / "10BT" / name, docs, row_group_size)
    write_fineweb_table(root / "data" / "CC-MAIN-2024-10" / "000_00000.parquet", ["not in sample-10BT"], 10)
    return root, [doc for name in sorted(files) for doc in files[name][0] if doc]


def reference_tokens(docs) -> np.ndarray:
    """<|endoftext|> + tokens of each document, encoded by Hugging Face's tokenizers library (not tiktoken) from the
    same GPT-2 files: an independent implementation of the same BPE."""
    from tokenizers import ByteLevelBPETokenizer
    ref = ByteLevelBPETokenizer(vocab=str(tokenizer.ENCODER_JSON), merges=str(tokenizer.VOCAB_BPE))
    return np.array([t for doc in docs for t in [tokenizer.EOT_ID, *ref.encode(doc).ids]], dtype=np.uint16)


def shard_tokens(out) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    return np.concatenate([shards.open_shard(out / s["file"], s["tokens"]) for s in manifest["shards"]])


@pytest.mark.parametrize("streaming", [False, True], ids=["parquet-in-workers", "streaming"])
def test_hf_source_on_a_hub_shaped_local_copy(fineweb_copy, tmp_path, streaming):
    """The full run's command, `--source hf --dataset ... --name sample-10BT`, on a local copy: the shards hold
    exactly the sample-10BT documents, in file and row order, as an independent tokenizer encodes them."""
    from conftest import run_script
    root, docs = fineweb_copy
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_script("data_prep.py", "--source", "hf", "--dataset", root, "--name", "sample-10BT", "--out", out,
               "--shard-tokens", 40_000, "--val-tokens", 15_000, "--workers", 2, "--cache-dir", cache,
               *(["--streaming"] if streaming else []), check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["split"], s["tokens"]) for s in manifest["shards"]][:2] == [("val", 15_000), ("train", 40_000)]
    assert np.array_equal(shard_tokens(out), reference_tokens(docs))
    assert manifest["documents"] == len(docs)
    if not streaming:  # read in place: nothing downloaded or converted into a cache
        assert not cache.exists() or not any(cache.rglob("*"))


def fake_hub(monkeypatch, root, fail_on=None) -> list:
    """The hub, served from the local copy: huggingface_hub's listing (the commit) and downloads (the names fetched
    are recorded; fetching `fail_on` raises the error a dropped connection would), and datasets resolving the card of
    the commit (its builder on the local copy, whose files are the repository's paths under its base_path)."""
    import types

    import datasets
    import huggingface_hub
    fetched, load_dataset_builder = [], datasets.load_dataset_builder

    def dataset_info(self, repo_id, **kwargs):
        assert repo_id == "HuggingFaceFW/fineweb-edu"
        return types.SimpleNamespace(sha="c0ffee")

    def hub_builder(path, name, revision, **kwargs):
        assert (path, revision) == ("HuggingFaceFW/fineweb-edu", "c0ffee")
        return load_dataset_builder(str(root), name, **kwargs)

    def hf_hub_download(repo_id, filename, repo_type, revision, cache_dir):
        assert (repo_id, repo_type, revision, cache_dir) == ("HuggingFaceFW/fineweb-edu", "dataset", "c0ffee", "c")
        if filename == fail_on:
            raise ConnectionError("connection reset by peer")
        fetched.append(filename)
        return str(root / filename)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset_builder", hub_builder)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return fetched


def test_hf_source_downloads_the_config_files_from_one_hub_commit(fineweb_copy, tmp_path, monkeypatch):
    """The hub branch (no network here): the commit, the card's resolution and the downloads are served from the
    local copy; only the config's files are fetched, in order, all at the commit pinned first."""
    root, docs = fineweb_copy
    fetched = fake_hub(monkeypatch, root)
    prepare(tmp_path / "out", "--source", "hf", "--shard-tokens", "40000", "--val-tokens", "15000", cache="c")
    assert fetched == ["sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet"]
    assert np.array_equal(shard_tokens(tmp_path / "out"), reference_tokens(docs))


def test_hf_download_failure_is_one_clear_error(fineweb_copy, tmp_path, monkeypatch):
    """A download that fails in the background thread, after tokenizing has begun, stops the run with one line
    naming the dataset and the cause; the output has no manifest."""
    fake_hub(monkeypatch, fineweb_copy[0], fail_on="sample/10BT/001_00000.parquet")
    with pytest.raises(UserError, match=r"cannot read --dataset HuggingFaceFW/fineweb-edu from the Hugging Face hub "
                                        r"\(ConnectionError: connection reset by peer\)"):
        prepare(tmp_path / "out", "--source", "hf", "--shard-tokens", "40000", "--val-tokens", "15000", cache="c")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("error, said", [
    (ConnectionError("connection reset by peer"), r"cannot read --dataset HuggingFaceFW/fineweb-edu from the Hugging "
                                                  r"Face hub \(ConnectionError: connection reset by peer\); check"),
    (ValueError("Expected configs to be a list"), r"dataset card README.md of --dataset HuggingFaceFW/fineweb-edu: "
                                                  r"datasets cannot read its configs \(ValueError: Expected configs"),
], ids=["network", "card"])
def test_hub_errors_while_datasets_reads_the_card_name_the_hub_or_the_card(fineweb_copy, tmp_path, monkeypatch, error,
                                                                          said):
    """On the hub, datasets reads the card and lists the files over the network: a network error is one line naming
    the dataset and the hub, anything else one line naming the card; nothing is downloaded or written."""
    import datasets
    fetched = fake_hub(monkeypatch, fineweb_copy[0])

    def failing(*args, **kwargs):
        raise error
    monkeypatch.setattr(datasets, "load_dataset_builder", failing)
    monkeypatch.setattr(datasets, "get_dataset_config_names", failing)
    with pytest.raises(UserError, match=said):
        prepare(tmp_path / "out", "--source", "hf", cache="c")
    assert fetched == [] and not list((tmp_path / "out").glob("*"))


def test_hf_source_names_the_configs_and_splits_it_has(fineweb_copy, tmp_path):
    root, _ = fineweb_copy
    with pytest.raises(UserError, match=r"no config 'sample-100BT' \(its configs: default, sample-10BT\)"):
        prepare(tmp_path / "a", "--source", "hf", "--dataset", str(root), "--name", "sample-100BT")
    with pytest.raises(UserError, match=r"has no split 'test' \(its splits: train\)"):
        prepare(tmp_path / "b", "--source", "hf", "--dataset", str(root), "--split", "test")


# ----------------------------------------------------------------------------------------------------------------
# A corpus smaller than the default validation split

def test_small_text_file_just_works(tmp_path, repo_dir):
    """The command with no other flag on a ~1 MB .txt file: validation shrinks to VAL_SHARE of the tokens, said
    before tokenizing and recorded in the manifest, instead of the default 100M tokens taking everything."""
    small = tmp_path / "my_small.txt"
    small.write_bytes(data_sources.EMBEDDED_CORPUS.read_bytes())  # 1.1 MB
    result = subprocess.run([sys.executable, str(repo_dir / "data_prep.py"), "--source", "files", "--files",
                             "my_small.txt", "--out", "d"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    before = result.stdout.index("so validation takes the first 10% of them")
    assert before < result.stdout.index("documents,")  # said before the summary of the finished run
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["val_share"] == data_prep.VAL_SHARE == 0.1 and "10%" in manifest["val_rule"]
    assert manifest["val_tokens"] == int(manifest["total_tokens"] * 0.1) > 0
    assert manifest["train_tokens"] == manifest["total_tokens"] - manifest["val_tokens"]
    assert [s["split"] for s in manifest["shards"]] == ["val", "train"]
    ShardDataset.open(tmp_path / "d", verify_sha256=True)


def test_small_stream_shrinks_validation_at_its_end(tmp_path):
    """A stream's size is unknown before it is read: the split is decided when it ends, the same way."""
    write_jsonl(tmp_path / "a.jsonl", data_sources.embedded_documents()[:300])
    manifest = prepare(tmp_path / "out", "--source", "files", "--files", str(tmp_path / "a.jsonl"), "--streaming",
                       cache=tmp_path / "cache")
    assert manifest["val_share"] == 0.1 and manifest["val_tokens"] == int(manifest["total_tokens"] * 0.1)


# --- malformed dataset cards: one line naming the card, never a traceback ---------------------------------------

def card_damages() -> dict[str, bytes]:
    """{case: README.md bytes}, generated from FINEWEB_CARD: every node of its YAML header (the header itself, the
    configs list, each config, each of their fields, down to each data_files entry's split and path) replaced by a
    value of every other shape (a string, a number, a list, a mapping, null) or removed; plus a header that does not
    parse and a card that is not UTF-8."""
    import copy

    import yaml
    header = yaml.safe_load(FINEWEB_CARD.split("---\n")[1])
    aliens = {"string": "sample-10BT", "number": 7, "list": ["x"], "mapping": {"x": 1}, "null": None, "removed": ...}

    def nodes(value, path=()):
        yield path
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
        for key, child in children:
            yield from nodes(child, (*path, key))
    cases = {"bad-yaml": b"---\nconfigs: [\n---\n# a card\n",
             "not-utf8": FINEWEB_CARD.encode().replace(b"odc-by", b"odc\xff-by")}
    for path in nodes(header):
        for name, alien in aliens.items():
            if alien is ... and not path:
                continue
            damaged = copy.deepcopy(header)
            parent = damaged
            for key in path[:-1]:
                parent = parent[key]
            if not path:
                damaged = alien
            elif alien is ...:
                del parent[path[-1]]
            else:
                parent[path[-1]] = alien
            text = "---\n" + yaml.safe_dump(damaged, sort_keys=False) + "---\n# a card\n"
            cases[f"{'.'.join(map(str, path)) or 'header'}={name}"] = text.encode()
    return cases


CARD_DAMAGES = card_damages()
# The five cards of issue 21, each one line naming the card (they were tracebacks): bad YAML, a list where a mapping
# belongs, not UTF-8, a config without a split, a config given as a string
FIVE_CARDS = ["bad-yaml", "header=list", "not-utf8", "configs.1.data_files.0.split=removed", "configs.1=string"]


@pytest.mark.parametrize("case", CARD_DAMAGES)
def test_a_malformed_dataset_card_is_one_line_naming_it(case, tmp_path):
    """Reading the card's configs either works (the damage left a usable card) or is a UserError; one naming the
    card for the five of issue 21."""
    root = tmp_path / "dataset"
    (root / "sample" / "10BT").mkdir(parents=True)
    (root / "sample" / "10BT" / "000_00000.parquet").write_bytes(b"")
    (root / "README.md").write_bytes(CARD_DAMAGES[case])
    args = argparse.Namespace(dataset=str(root), name="sample-10BT", split="train")
    try:
        assert isinstance(data_sources.config_files(args, "--dataset x").files, list)
        assert case not in FIVE_CARDS
    except UserError as e:
        assert "\n" not in str(e)
        if case in FIVE_CARDS:
            assert str(e).startswith(f"dataset card {root / 'README.md'}"), e


def test_malformed_cards_on_the_command_line_leave_the_dataset_untouched(tmp_path, capsys):
    """The five cards through data_prep.py's non-streaming route: exit 2, one line naming the card, every file of
    the dataset byte-identical, no output written."""
    import hashlib
    for case in FIVE_CARDS:
        root = tmp_path / case / "dataset"
        (root / "sample" / "10BT").mkdir(parents=True)
        write_fineweb_table(root / "sample" / "10BT" / "000_00000.parquet", DOCS, 10)
        (root / "README.md").write_bytes(CARD_DAMAGES[case])
        before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}
        with pytest.raises(SystemExit) as exit_info:
            data_prep.main(["--source", "hf", "--dataset", str(root), "--name", "sample-10BT", "--out",
                            str(tmp_path / case / "out"), "--workers", "1", "--cache-dir", str(tmp_path / "cache")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: dataset card {root / 'README.md'}"), err
        assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()} == before
        assert not list((tmp_path / case / "out").glob("*.bin"))


def test_an_undecodable_file_of_a_local_dataset_copy_is_named_with_its_line(tmp_path, capsys):
    """--source hf on a local copy whose text file is not UTF-8 names that file and line (it named neither)."""
    root = tmp_path / "dataset"
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/*.txt\n---\n")
    (root / "data" / "a.txt").write_bytes(b"hello\nworld \xff\xfe bad\n")
    with pytest.raises(SystemExit):
        data_prep.main(["--source", "hf", "--dataset", str(root), "--name", "default", "--out", str(tmp_path / "out"),
                        "--workers", "1", "--cache-dir", str(tmp_path / "cache")])
    assert f"{root / 'data' / 'a.txt'} line 2: not UTF-8 at byte 12" in capsys.readouterr().err


@pytest.mark.parametrize("refused", [["--val-tokens", "1000000"], []], ids=["val takes all", "val share too small"])
def test_the_remedy_for_splits_too_small_works_when_followed(refused, tmp_path, capsys):
    """The error names the range of --val-tokens that works (it named none when the default 10% was too small,
    though --val-tokens 129 builds); running again with either end, and nothing else, builds the data (the failed
    run left nothing to refuse)."""
    from helpers import assert_one_line_error
    argv = ["--source", "embedded", "--max-docs", "30", "--workers", "1"]
    with pytest.raises(SystemExit) as exit_info:
        data_prep.main([*argv, "--out", str(tmp_path / "out"), *refused])
    line = assert_one_line_error(subprocess.CompletedProcess(argv, exit_info.value.code, "", capsys.readouterr().err),
                                 status=2)  # (after the progress bar)
    least, most = map(int, re.search(r"run again with a --val-tokens from (\d+) to (\d+)", line).groups())
    for val_tokens in (least, most):
        data_prep.main([*argv, "--out", str(tmp_path / str(val_tokens)), "--val-tokens", str(val_tokens)])
        dataset = ShardDataset.open(tmp_path / str(val_tokens))
        assert dataset.val_tokens == val_tokens and dataset.train_tokens >= data_prep.MIN_SPLIT_TOKENS
        assert min(dataset.val_tokens, dataset.train_tokens) == data_prep.MIN_SPLIT_TOKENS


# --- stopping the tokenizer pool early ------------------------------------------------------------------------------

def start_pool(texts):
    """tokenize_in_pool with its first chunk taken, and the worker processes it started."""
    before = set(multiprocessing.active_children())
    chunks = data_prep.tokenize_in_pool(texts, workers=2)
    next(chunks)
    return chunks, [p for p in multiprocessing.active_children() if p not in before]


@pytest.mark.parametrize("how", ["closed", "interrupted"])
def test_an_early_stop_lets_each_worker_finish_and_exit_by_itself(how):
    """--max-tokens closes the chunk generator early and Ctrl-C raises in it. Killing a worker then (Pool.terminate)
    can cut it off while it sends a result, and the pool's result thread waits forever for the rest of that message:
    data_prep.py hung. The queued tasks must return at once and every worker exit on its own (exit code 0)."""
    chunks, workers = start_pool(["a few words of text " * 50] * (16 * data_prep.DOCS_PER_TASK))
    if how == "closed":
        chunks.close()
    else:
        with pytest.raises(KeyboardInterrupt):
            chunks.throw(KeyboardInterrupt)
    assert len(workers) == 2 and [p.exitcode for p in workers] == [0, 0]


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork",
                    reason="the stuck task is patched into the parent, which only forked workers inherit")
def test_an_early_stop_does_not_wait_forever_for_a_stuck_task(monkeypatch):
    """A worker stuck in its task (a hung read) is killed once POOL_STOP_WAIT_S has passed; it is not sending."""
    import threading
    tokenize = data_prep.tokenize_documents
    monkeypatch.setattr(data_prep, "tokenize_documents",
                        lambda texts: time.sleep(3600) if texts[0] == "stuck" else tokenize(texts))
    monkeypatch.setattr(data_prep, "POOL_STOP_WAIT_S", 0.5)
    chunks, workers = start_pool(["fine"] * data_prep.DOCS_PER_TASK + ["stuck"] * (8 * data_prep.DOCS_PER_TASK))
    closing = threading.Thread(target=chunks.close, daemon=True)
    closing.start()
    closing.join(timeout=120)
    assert not closing.is_alive(), "stopping the pool waited for a task that never ends"
    assert all(p.exitcode is not None for p in workers)


# --- what is refused before --out is made and the pool starts, all in one line ------------------------------------

@pytest.fixture
def no_pool(monkeypatch):
    """The pool must not start: a run that gets there fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer pool started")
    monkeypatch.setattr(data_prep, "tokenize_in_pool", refuse)


def refused_in_one_line(argv, capsys) -> str:
    """data_prep.main(argv) in this process: status 2 and the one error line, all of stderr, returned."""
    from helpers import assert_one_line_error
    with pytest.raises(SystemExit) as exit_info:
        data_prep.main(argv)
    return assert_one_line_error(subprocess.CompletedProcess(argv, exit_info.value.code, "", capsys.readouterr().err),
                                 status=2, alone=True)


def test_the_smallest_usable_split_is_one_window_of_the_smallest_preset():
    from model import PRESETS
    assert data_prep.MIN_SPLIT_TOKENS == min(config.block_size for config in PRESETS.values()) + 1


# (settings, --max-tokens, the least --max-tokens the line names), worked out by hand from how the stream is split:
# by default (--source embedded: --val-tokens 32768, 10% of a shorter stream) 1290 (129 is 10%), or past the
# default val split 32768 + 129; with --val-tokens 2000, 2000 + 129; with --shard-tokens 1000 the val split is cut
# into shards before 10% of any stream holds 129 tokens, so it never shrinks: 32768 + 129.
TOO_FEW = [([], m, 1290) for m in (1, 10, 1289)] + [([], m, 32897) for m in (32768, 32896)] \
    + [(["--val-tokens", "2000"], m, 2129) for m in (1, 2000, 2128)] \
    + [(["--shard-tokens", "1000"], m, 32897) for m in (1289, 1290, 32896)]
ENOUGH = [([], 1290), ([], 32897), (["--val-tokens", "2000"], 2129), (["--shard-tokens", "1000"], 32897)]


def settings_id(value) -> str:
    return " ".join(value) or "defaults" if isinstance(value, list) else str(value)


@pytest.mark.parametrize("settings, max_tokens, least", TOO_FEW, ids=settings_id)
def test_a_max_tokens_too_small_for_a_usable_dataset_is_refused_naming_the_least(settings, max_tokens, least,
                                                                                tmp_path, capsys, no_pool):
    """--max-tokens 10 built a data set of 1 validation and 9 training tokens."""
    out = tmp_path / "out"
    line = refused_in_one_line(["--source", "embedded", *settings, "--max-tokens", str(max_tokens), "--out", str(out)],
                               capsys)
    assert f"--max-tokens {max_tokens}: too few for a usable dataset" in line and f"--max-tokens {least} or more" in line
    assert not out.exists()


@pytest.mark.parametrize("settings, max_tokens", ENOUGH, ids=settings_id)
def test_the_least_max_tokens_builds_a_data_set_a_run_can_use(settings, max_tokens, tmp_path):
    """Each split holds a window of the debug model's context: a train batch and a validation batch of 1 x 128."""
    from dataloader import val_batches
    manifest = prepare(tmp_path / "out", "--source", "embedded", *settings, "--max-tokens", str(max_tokens))
    assert manifest["total_tokens"] == max_tokens
    assert min(manifest["val_tokens"], manifest["train_tokens"]) >= data_prep.MIN_SPLIT_TOKENS
    ds = ShardDataset.open(tmp_path / "out")
    x, y = TrainLoader(ds, batch_size=1, seq_len=128, seed=0).next_batch()
    assert x.shape == (1, 128) and len(list(val_batches(ds, batch_size=1, seq_len=128))) >= 1


def damaged_parquet(folder: Path, damage: str) -> Path:
    """A parquet file of documents, then damaged: `damage` names how."""
    path = folder / f"{damage}.parquet"
    write_parquet(path, ["a document", "another one"] * 50, field="body" if damage == "no_text_field" else "text")
    data = path.read_bytes()
    if damage == "not_parquet":
        path.write_text("text,id\nhello,1\n")
    elif damage == "cut_short":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "footer_garbled":  # the footer's length and magic bytes (the last 8)
        path.write_bytes(data[:-8] + bytes(range(8)))
    elif damage == "footer_length_wrong":  # a footer length past the file's start
        path.write_bytes(data[:-8] + (len(data) * 2).to_bytes(4, "little") + b"PAR1")
    return path


PARQUET_DAMAGES = ["not_parquet", "cut_short", "footer_garbled", "footer_length_wrong", "no_text_field"]


@pytest.mark.parametrize("damages", [[d] for d in PARQUET_DAMAGES] + [PARQUET_DAMAGES, PARQUET_DAMAGES[:2] + ["10"]],
                         ids=" ".join)
def test_unreadable_parquet_inputs_are_each_named_in_one_line_before_out_and_the_pool(damages, tmp_path, capsys,
                                                                                     no_pool):
    """A garbled local .parquet was refused only once the pool had started, leaving an empty --out behind. Beside a
    good file, every damaged one is named (with a --max-tokens too small, "10", in the same line)."""
    write_parquet(tmp_path / "good.parquet", ["fine text"] * 10)
    bad = [damaged_parquet(tmp_path, damage) for damage in damages if damage != "10"]
    out = tmp_path / "new" / "out"
    line = refused_in_one_line(["--source", "files", "--files", str(tmp_path / "*.parquet"), "--out", str(out),
                                *(["--max-tokens", "10"] if "10" in damages else [])], capsys)
    for path in bad:
        assert str(path) in line, line
    assert str(tmp_path / "good.parquet") not in line and ("--max-tokens 10" in line) == ("10" in damages)
    assert not (tmp_path / "new").exists()


def failing_after_out_is_made(tmp_path: Path, case: str) -> list[str]:
    """Arguments of a run that fails once --out is ready, before anything is written into it: a local hub-shaped
    copy whose second parquet file is cut short (its files are known only once datasets has read the card), or a
    .jsonl file with a line that is not JSON (found while datasets loads it)."""
    if case == "hf_copy_damaged_parquet":
        root = tmp_path / "copy"
        write_fineweb_table(root / "sample" / "10BT" / "000_00000.parquet", ["fine text"] * 10, 10)
        write_fineweb_table(root / "data" / "CC-MAIN-2024-10" / "000_00000.parquet", ["another config"], 10)
        (root / "README.md").write_text(FINEWEB_CARD)
        (root / "sample" / "10BT" / "001_00000.parquet").write_bytes(b"PAR1 not really")
        return ["--source", "hf", "--dataset", str(root), "--name", "sample-10BT"]
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": cut\n')
    return ["--source", "files", "--files", str(tmp_path / "bad.jsonl")]


@pytest.mark.parametrize("out_kind", ["new", "new_parents", "existing_empty"])
@pytest.mark.parametrize("case", ["hf_copy_damaged_parquet", "jsonl_not_json"])
def test_a_run_that_fails_before_writing_removes_only_the_folders_it_made(case, out_kind, tmp_path):
    """Such a run left an empty --out (and the folders above it that it made) behind; a folder it did not make
    stays. (A subprocess: datasets' logger keeps the stderr of the first test that imported it.)"""
    from conftest import run_script
    from helpers import assert_one_line_error
    out = {"new": tmp_path / "out", "new_parents": tmp_path / "new" / "deeper" / "out",
           "existing_empty": tmp_path / "mine"}[out_kind]
    if out_kind == "existing_empty":
        out.mkdir()
    proc = run_script("data_prep.py", *failing_after_out_is_made(tmp_path, case), "--out", out, "--workers", "1",
                      "--cache-dir", tmp_path / "cache")
    line = assert_one_line_error(proc, status=2)  # (datasets logs lines of its own on a bad .jsonl)
    assert ("001_00000.parquet" if case == "hf_copy_damaged_parquet" else "bad.jsonl line 2") in line, line
    assert out.is_dir() == (out_kind == "existing_empty") and (out_kind != "existing_empty" or not any(out.iterdir()))
    assert not (tmp_path / "new").exists() and tmp_path.is_dir()


@pytest.mark.parametrize("damage", ["cut parquet", "unknown config"])
def test_overwrite_keeps_the_old_dataset_when_the_new_input_is_refused(damage, fineweb_copy, tmp_path, capsys):
    """--overwrite removed the finished dataset in --out first, then found the input unusable (a cut parquet file
    of a local hub copy, a --name the card does not have): nothing was left. The input is resolved and checked
    before --out is touched."""
    import shutil
    out = tmp_path / "out"
    data_prep.main(["--source", "embedded", "--out", str(out)])
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    root = shutil.copytree(fineweb_copy[0], tmp_path / "copy")
    name = "sample-10BT"
    if damage == "cut parquet":
        part = root / "sample" / "10BT" / "001_00000.parquet"
        part.write_bytes(part.read_bytes()[:200])
    else:
        name = "no-such-config"
    line = refused_in_one_line(["--source", "hf", "--dataset", str(root), "--name", name, "--out", str(out),
                                "--overwrite"], capsys)
    assert ("001_00000.parquet" if damage == "cut parquet" else "no-such-config") in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
