"""bench_data_prep.py: data_prep.py, the Pool.imap scheme and the single-process loop raced on one corpus."""
import json

import pytest

from conftest import run_script


def test_whole_runs_are_compared_on_the_same_tokens(tmp_path):
    """data_prep.py, the Pool.imap scheme and the single-process loop on one parquet corpus: the same token stream
    (the benchmark refuses to report otherwise), and the figures each whole run is judged by."""
    out, work = tmp_path / "prep.json", tmp_path / "work"
    run_script("bench_data_prep.py", "--corpus-mb", "1", "--workers", "2", "--work-dir", work,
               "--out", out, check=True)
    result = json.loads(out.read_text())
    runs = result["schemes"]
    assert set(runs) == {"data_prep", "pool", "loop"} and result["same_tokens"] and result["tokens"] > 100_000
    assert {r["tokens"] for r in runs.values()} == {result["tokens"]}
    assert len({r["sha256"] for r in runs.values()}) == 1
    for r in runs.values():
        assert r["seconds"] > 0 and r["cpu_seconds"] > 0 and r["peak_pss_bytes"] > 0
        assert r["peak_disk_bytes"] >= r["shard_bytes"] >= 2 * result["tokens"]
    assert result["speedup_vs_pool"] == pytest.approx(runs["pool"]["seconds"] / runs["data_prep"]["seconds"])
    assert runs["data_prep"]["cache_bytes"] == 0 < runs["pool"]["cache_bytes"]  # parquet read in place, no Arrow
    assert 0 < runs["data_prep"]["first_document_s"] < runs["data_prep"]["seconds"]
    assert not work.exists()  # corpus, caches and outputs removed
