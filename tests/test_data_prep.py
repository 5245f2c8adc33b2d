"""data_prep.py: documents -> shards -> decoded documents, output directory handling and bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest

import data_prep
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
    corpus = data_prep.EMBEDDED_CORPUS.read_text(encoding="utf-8")
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
    write(tmp_path / f"a.{kind}", DOCS[:4])
    write(tmp_path / f"b.{kind}", DOCS[4:])
    (tmp_path / f"c.{kind}").write_bytes(b"")  # skipped (datasets' num_proc fails on a job of empty files)
    out = tmp_path / "out"
    manifest = prepare(out, "--source", "files", "--files", str(tmp_path / f"*.{kind}"), "--shard-tokens", "8",
                       "--val-tokens", "5", *(["--streaming"] if streaming else []), cache=tmp_path / "cache")
    expected = [doc for doc in DOCS if doc]  # files in sorted order; empty and null texts skipped
    assert decoded_documents(out) == expected
    assert manifest["documents"] == len(expected)
    assert [s["tokens"] for s in manifest["shards"] if s["split"] == "val"] == [5]
    assert manifest["settings"]["source"]["files"] == [str(tmp_path / f"a.{kind}"), str(tmp_path / f"b.{kind}")]


def test_text_files_match_the_embedded_source(tmp_path):
    common = ["--shard-tokens", "100000", "--val-tokens", "30000"]
    prepare(tmp_path / "embedded", "--source", "embedded", *common)
    prepare(tmp_path / "files", "--source", "files", "--files", str(data_prep.EMBEDDED_CORPUS), *common,
            cache=tmp_path / "cache")
    assert shard_hashes(tmp_path / "files") == shard_hashes(tmp_path / "embedded")


def test_max_docs_and_max_tokens_slice_the_stream(tmp_path):
    manifest = prepare(tmp_path / "docs", "--source", "embedded", "--max-docs", "100", "--val-tokens", "500")
    assert manifest["documents"] == 100
    manifest = prepare(tmp_path / "tokens", "--source", "embedded", "--max-tokens", "12345", "--val-tokens", "2000")
    assert manifest["total_tokens"] == 12345
    docs = decoded_documents(tmp_path / "tokens")
    assert manifest["documents"] == len(docs) and docs[-1] != data_prep.embedded_documents()[len(docs) - 1]  # cut


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


def test_unfinished_build_is_cleared_and_rebuilt(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "train_000007.bin").write_bytes(b"left over from a killed run")
    (out / ".val_000000.bin.tmp").write_bytes(b"half")
    manifest = prepare(out, "--source", "embedded", "--max-docs", "300", "--val-tokens", "1000")
    assert "unfinished build" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *(s["file"] for s in manifest["shards"])])


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])  # the second keeps the size: only sha256 sees it
def test_damaged_finished_output_is_rebuilt(tmp_path, capsys, damage):
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
    prepare(out, *args)
    assert "damaged" in capsys.readouterr().out
    ShardDataset.open(out, verify_sha256=True)


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
        (["--source", "embedded", "--max-docs", "20", "--val-tokens", "100000"], "all taken for validation"),
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
