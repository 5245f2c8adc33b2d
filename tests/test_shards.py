"""shards.py's writer: a shard appears under its final name whole or not at all. A write that fails or is killed
mid-way (here: a file-size limit hit after the header, in a child process) leaves no file under that name, and an
older shard already there stays as it was. And what the readers refuse: a shard of the wrong size, a manifest of
another (or no) tokenizer, entries outside the data directory, a split without shards."""
import json
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import shards
from cli import UserError
from helpers import REPO, make_dataset, script_env

TOKENS = 50_000  # 100 kB of tokens: the 16 kB limit stops the write well after its start
LIMIT = 16_384
WRITER = f"""
import resource, signal, sys
import numpy as np
sys.path.insert(0, {str(REPO)!r})
import shards
# Python ignores SIGXFSZ, so a write() past the limit raises OSError (EFBIG); with the default action the kernel
# kills the process in the middle of the write instead (nothing of Python runs after it).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN if sys.argv[2] == "fail" else signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, {LIMIT}))
shards.write_shard(sys.argv[1], np.arange({TOKENS}) % 50257)
"""


def write_in_child(path, how: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER, str(path), how], capture_output=True, text=True,
                          timeout=120, env=script_env())


@pytest.mark.parametrize("how", ["fail", "kill"])
def test_interrupted_shard_write_leaves_nothing_under_the_final_name(tmp_path, how):
    path = tmp_path / "train_000000.bin"
    proc = write_in_child(path, how)
    if how == "fail":
        assert proc.returncode == 1 and "File too large" in proc.stderr and str(path) in proc.stderr, proc.stderr
        assert list(tmp_path.iterdir()) == []  # the partial temporary file is removed too
    else:
        assert proc.returncode == -signal.SIGXFSZ, (proc.returncode, proc.stderr)  # killed while writing
    assert not path.exists()


@pytest.mark.parametrize("how", ["fail", "kill"])
def test_interrupted_rewrite_leaves_the_previous_shard_whole(tmp_path, how):
    path = tmp_path / "train_000000.bin"
    old = np.arange(100, dtype=np.uint16)
    sha = shards.write_shard(path, old)
    assert write_in_child(path, how).returncode != 0
    assert shards.read_shard_header(path) == len(old) and shards.file_sha256(path) == sha


# --- what validate_shards / read_manifest refuse (each a one-line UserError naming the remedy) --------------------

@pytest.fixture
def data_dir(tmp_path):
    return make_dataset(tmp_path / "data", train_sizes=[50, 60], val_sizes=[40])


def manifest_of(data_dir) -> dict:
    return json.loads((data_dir / shards.MANIFEST_NAME).read_text())


def open_with(data_dir, manifest: dict):
    (data_dir / shards.MANIFEST_NAME).write_text(json.dumps(manifest))
    manifest = shards.read_manifest(data_dir)
    return shards.validate_shards(data_dir, manifest)


def test_a_shard_longer_than_its_header_promises_is_refused(data_dir):
    shard = data_dir / "train_000001.bin"
    shard.write_bytes(shard.read_bytes() + b"\0\0")  # one token too many on disk (a write that appended)
    with pytest.raises(UserError, match=r"train_000001.bin is truncated or corrupt: 154 bytes.*60 tokens \(152"):
        shards.read_shard_header(shard)
    with pytest.raises(UserError, match="--overwrite"):
        open_with(data_dir, manifest_of(data_dir))


def test_a_manifest_without_the_tokenizer_hash_is_refused(data_dir):
    manifest = manifest_of(data_dir)
    del manifest["tokenizer_sha256"]
    with pytest.raises(UserError, match="another tokenizer"):
        open_with(data_dir, manifest)


@pytest.mark.parametrize("name", ["../outside.bin", "sub/train_000000.bin", "/tmp/train_000000.bin"])
def test_a_shard_entry_outside_the_data_directory_is_refused(data_dir, name):
    """A manifest names files in its own folder only: a path elsewhere (a hand edit, a copied manifest) is refused
    even when a valid shard lies there."""
    manifest = manifest_of(data_dir)
    target = (data_dir / name) if not name.startswith("/") else None
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / "train_000000.bin", target)
    manifest["shards"][-1]["file"] = name
    with pytest.raises(UserError, match=f"lists a bad shard entry '{re.escape(name)}'"):
        open_with(data_dir, manifest)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_manifest_without_train_or_val_shards_is_refused(data_dir, split):
    manifest = manifest_of(data_dir)
    manifest["shards"] = [s for s in manifest["shards"] if s["split"] != split]
    with pytest.raises(UserError, match=f"has no {split} shards"):
        open_with(data_dir, manifest)
    manifest["shards"] = []
    with pytest.raises(UserError, match="has no (train|val) shards"):
        open_with(data_dir, manifest)


@pytest.mark.parametrize("field, value", [("version", shards.SHARD_VERSION + 1), ("dtype", 2), ("magic", b"LFLLMTOX")])
def test_a_shard_of_another_version_dtype_or_magic_is_refused(tmp_path, field, value):
    tokens = np.arange(10, dtype=np.uint16)
    header = {"magic": shards.SHARD_MAGIC, "version": shards.SHARD_VERSION, "dtype": shards.DTYPE_CODE, field: value}
    path = tmp_path / "train_000000.bin"
    path.write_bytes(shards._HEADER.pack(header["magic"], header["version"], header["dtype"], len(tokens))
                     + tokens.tobytes())
    with pytest.raises(UserError, match="is not a version-1 token shard"):
        shards.read_shard_header(path)


@pytest.mark.parametrize("change", [{"tokens": -1}, {"tokens": True}, {"tokens": 1.0}, {"split": "test"},
                                    {"sha256": None}, {"file": 3}])
def test_a_damaged_manifest_entry_is_refused(data_dir, change):
    manifest = manifest_of(data_dir)
    manifest["shards"][0].update(change)
    with pytest.raises(UserError, match="lists a damaged shard entry"):
        open_with(data_dir, manifest)


@pytest.mark.parametrize("edit", ["listed twice", "other split"])
@pytest.mark.parametrize("shard", [0, 1, 2])
def test_a_manifest_listing_a_shard_twice_or_under_the_other_split_is_refused(data_dir, shard, edit):
    """A hand edit that appends a copy of a shard's entry, or relabels it, made training read the val shard (or one
    shard twice as often) with every hash right."""
    manifest = manifest_of(data_dir)
    entry = dict(manifest["shards"][shard])
    if edit == "listed twice":
        manifest["shards"].append(entry)
    else:
        manifest["shards"][shard]["split"] = {"train": "val", "val": "train"}[entry["split"]]
    why = "twice" if edit == "listed twice" else f"as a {manifest['shards'][shard]['split']} shard"
    with pytest.raises(UserError, match=f"lists shard {entry['file']} {why}; rebuild it"):
        open_with(data_dir, manifest)


def test_data_that_is_a_file_is_named_a_file_not_missing(tmp_path):
    """--data FILE (a shard, the manifest itself): 'is a file, not a data directory', not 'does not exist'."""
    for name in ("manifest.json", "train_000.bin"):
        (tmp_path / name).write_text("{}")
        with pytest.raises(UserError, match=r"is a file, not a data directory") as e:
            shards.read_manifest(tmp_path / name)
        assert "does not exist" not in str(e.value) and str(tmp_path / name) in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        shards.read_manifest(tmp_path / "nowhere")
