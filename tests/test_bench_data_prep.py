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


def test_every_bad_flag_is_named_in_one_line_before_any_work(tmp_path, capsys):
    """All of them at once, each with its value; a --text-root that is not a folder among them (the corpus repeats
    what the roots hold, so from nothing it would be built forever)."""
    import bench_data_prep
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as exit_info:
        bench_data_prep.main(["--corpus-mb", "0", "--workers", "0", "--repeats", "0", "--schemes", "foo",
                              "--text-root", str(tmp_path / "missing"), "--work-dir", str(work)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in ("--corpus-mb 0.0", "--workers 0", "--repeats 0", "--schemes foo", f"--text-root {tmp_path}/missing"):
        assert needle in err[0], err[0]
    assert not work.exists()


def test_text_roots_without_text_files_are_one_line_not_a_corpus_built_forever(tmp_path, capsys):
    import bench_data_prep
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        bench_data_prep.main(["--corpus-mb", "1", "--schemes", "loop", "--text-root", str(tmp_path / "empty"),
                              "--work-dir", str(tmp_path / "work")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --text-root {tmp_path}/empty: no UTF-8 text file"), err
    assert not (tmp_path / "work").exists()
