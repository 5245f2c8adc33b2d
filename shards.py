"""The token shard format, without torch (data_prep.py writes it, dataloader.py reads it):

Shard file (`train_000000.bin`, `val_000000.bin`, ...), little-endian, HEADER_BYTES = 32:
    offset  0  8 bytes   magic b"LFLLMTOK"
    offset  8  uint32    format version (SHARD_VERSION)
    offset 12  uint32    dtype code (1 = uint16)
    offset 16  uint64    token count N
    offset 24  8 bytes   reserved, zero
    offset 32  N x uint16 tokens; read them with np.memmap(path, "<u2", "r", offset=HEADER_BYTES, shape=(N,))
`manifest.json` beside the shards lists them (file, split, tokens, sha256 of the whole file) with the tokenizer's
hash; data_prep.py writes it last, so a directory without one is an unfinished build.
"""
import concurrent.futures
import hashlib
import json
import struct
from pathlib import Path

import numpy as np

import tokenizer
from cli import UserError, atomic_write, write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lf-llm-token-shards-v1"
SHARD_MAGIC = b"LFLLMTOK"
SHARD_VERSION = 1
DTYPE_CODES = {1: np.dtype("<u2")}  # header dtype code -> numpy dtype; uint16 holds GPT-2's 50,257 ids
DTYPE_CODE = 1
TOKEN_DTYPE = DTYPE_CODES[DTYPE_CODE]
_HEADER = struct.Struct("<8sIIQ8x")  # magic, version, dtype code, token count, reserved
HEADER_BYTES = _HEADER.size  # 32: keeps the tokens 8-byte aligned for np.memmap
HEADER_LAYOUT = ("little-endian: 8 bytes magic 'LFLLMTOK', uint32 version, uint32 dtype code (1 = uint16), "
                 "uint64 token count, 8 reserved bytes; then the tokens")
BUILD_HINT = "python data_prep.py --source embedded --out {dir} (or --source hf for FineWeb-Edu)"


def rebuild_advice(data_dir, hint: str = "") -> str:
    """The remedy for a data directory that cannot be used, said the same way everywhere (`hint`: what to change)."""
    return f"rebuild it with `python data_prep.py ... --out {data_dir} --overwrite`{hint}"


def write_shard(path, tokens: np.ndarray) -> str:
    """Write header + tokens to a temporary name, fsync, rename to `path`; returns the file's sha256."""
    path = Path(path)
    tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
    header = _HEADER.pack(SHARD_MAGIC, SHARD_VERSION, DTYPE_CODE, len(tokens))
    digest = hashlib.sha256(header)
    digest.update(memoryview(tokens).cast("B"))
    with atomic_write(path) as f:
        f.write(header)
        f.write(memoryview(tokens).cast("B"))
    return digest.hexdigest()


def read_shard_header(path) -> int:
    """Validate a shard's header and file size; returns its token count. UserError when truncated or corrupt."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"shard {path} cannot be read ({e.strerror}); {rebuild_advice(path.parent)}")
    if len(raw) < HEADER_BYTES:
        raise UserError(f"shard {path} is truncated ({size} bytes, shorter than its header); "
                        f"{rebuild_advice(path.parent)}")
    magic, version, dtype_code, count = _HEADER.unpack(raw)
    if magic != SHARD_MAGIC or version != SHARD_VERSION or dtype_code not in DTYPE_CODES:
        raise UserError(f"{path} is not a version-{SHARD_VERSION} token shard (bad header); "
                        f"{rebuild_advice(path.parent)}")
    expected = HEADER_BYTES + count * DTYPE_CODES[dtype_code].itemsize
    if size != expected:
        raise UserError(f"shard {path} is truncated or corrupt: {size} bytes, its header promises {count} tokens "
                        f"({expected} bytes); {rebuild_advice(path.parent)}")
    return count


def open_shard(path, count: int) -> np.memmap:
    """The tokens of a shard, memory-mapped read-only (RAM use stays flat whatever the dataset size)."""
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(data_dir, manifest: dict) -> None:
    """Write manifest.json atomically (temporary name, fsync, rename, fsync the folder): the mark of a finished
    build, so it must never exist half-written."""
    write_json(Path(data_dir) / MANIFEST_NAME, manifest)


def is_shard_entry(entry) -> bool:
    """Whether a manifest's shard entry has every field, each of the right type (a hand edit can put anything)."""
    return (isinstance(entry, dict) and isinstance(entry.get("file"), str) and entry.get("split") in ("train", "val")
            and type(entry.get("tokens")) is int and entry["tokens"] >= 0 and isinstance(entry.get("sha256"), str))


def read_manifest(data_dir) -> dict:
    """Parse DIR/manifest.json and check that it is one of ours, made with this repo's tokenizer."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"{data_dir} is a file, not a data directory; give --data the folder data_prep.py wrote (it "
                        f"holds {MANIFEST_NAME}), or build one with `{BUILD_HINT.format(dir=data_dir.with_suffix('.data'))}`")
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; build it with `{BUILD_HINT.format(dir=data_dir)}`")
    if not path.is_file():
        raise UserError(f"data directory {data_dir} has no {MANIFEST_NAME} (empty, or an unfinished data_prep.py "
                        f"run); build it with `{BUILD_HINT.format(dir=data_dir)}`")
    try:
        manifest = json.loads(path.read_text())
        ok = manifest["format"] == MANIFEST_FORMAT and isinstance(manifest["shards"], list)
    except (ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise UserError(f"{path} is corrupt or not a data_prep.py manifest; {rebuild_advice(data_dir)}")
    bad = next((entry for entry in manifest["shards"] if not is_shard_entry(entry)), None)
    if bad is not None:
        raise UserError(f"{path} lists a damaged shard entry {json.dumps(bad)[:100]} (a shard needs a file name, "
                        f"split train/val, integer tokens and a sha256 string); {rebuild_advice(data_dir)}")
    if manifest.get("tokenizer_sha256") != tokenizer.RANKS_SHA256:
        raise UserError(f"{data_dir} was tokenized with another tokenizer (sha256 {manifest.get('tokenizer_sha256')}"
                        f", this repo's GPT-2 BPE is {tokenizer.RANKS_SHA256[:16]}...); rebuild it with this repo's "
                        f"data_prep.py into a new --out")
    if manifest.get("header_bytes") != HEADER_BYTES or manifest.get("dtype") != "uint16":
        raise UserError(f"{path} describes another shard layout (header_bytes {manifest.get('header_bytes')}, dtype "
                        f"{manifest.get('dtype')}); {rebuild_advice(data_dir)}")
    return manifest


def validate_shards(data_dir, manifest: dict, verify_sha256: bool = False) -> dict[str, list[tuple[Path, int]]]:
    """Check every shard the manifest lists (name, presence, header, size; sha256 when asked: it reads every byte,
    minutes for the full 10B-token set); returns {"train": [(path, tokens), ...], "val": [...]}, both non-empty."""
    data_dir = Path(data_dir)
    splits = {"train": [], "val": []}
    listed = set()
    for entry in manifest["shards"]:
        path = data_dir / entry["file"]
        if entry["split"] not in splits or Path(entry["file"]).name != entry["file"]:
            raise UserError(f"{data_dir / MANIFEST_NAME} lists a bad shard entry {entry['file']!r}; "
                            f"{rebuild_advice(data_dir)}")
        # (a hand edit listing a shard twice, or the val shard as a train shard, would train on it unnoticed)
        if entry["file"] in listed or not entry["file"].startswith(f"{entry['split']}_"):
            why = "twice" if entry["file"] in listed else f"as a {entry['split']} shard"
            raise UserError(f"{data_dir / MANIFEST_NAME} lists shard {entry['file']} {why}; {rebuild_advice(data_dir)}")
        listed.add(entry["file"])
        if not path.is_file():
            raise UserError(f"shard {path} listed in the manifest is missing; {rebuild_advice(data_dir)}")
        count = read_shard_header(path)
        if count != entry["tokens"]:
            raise UserError(f"shard {path} holds {count} tokens, the manifest says {entry['tokens']}; "
                            f"{rebuild_advice(data_dir)}")
        if verify_sha256 and file_sha256(path) != entry["sha256"]:
            raise UserError(f"shard {path} is corrupt (sha256 differs from the manifest); {rebuild_advice(data_dir)}")
        splits[entry["split"]].append((path, count))
    for split, shards in splits.items():
        if not shards:
            raise UserError(f"{data_dir} has no {split} shards; "
                            f"{rebuild_advice(data_dir, ' and a --val-tokens that leaves tokens for both splits')}")
    return splits


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
        sha256 = write_shard(self.out_dir / name, tokens)
        return {"file": name, "split": split, "tokens": int(tokens.size), "sha256": sha256}

    def close(self) -> list[dict]:
        if self.val_share and self.val_left and self.fill and not self.counts["val"]:
            self._shrink_val()
        self.flush()
        try:
            return [future.result() for future in self.written]
        finally:
            self.pool.shutdown()
