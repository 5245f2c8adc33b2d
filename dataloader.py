"""Token shards on disk and the loaders that feed them to training: the shard format, the manifest, a seeded and
resumable rank-aware training loader, and a deterministic validation iterator.

The shard file format and manifest.json: see shards.py.

Training windows: a window is T + 1 consecutive tokens (x = the first T, y = the last T); the windows of a shard
tile it with stride T (window j starts at token j*T). Epoch e visits the train shards in a permutation drawn from
(seed, e) and the windows of each shard in a permutation drawn from (seed, e, shard), which defines one global
stream of windows, epoch after epoch. Micro-batch k of rank r (of W ranks) is the B stream windows starting at
(k*W + r)*B, so W ranks reading A micro-batches each read exactly what one process reads in A*W micro-batches. The
loader's whole state is one number, the stream position (windows read by all ranks together, k*W*B): the same on
every rank, and independent of how a token batch is split into ranks and micro-batches. A run that resumes with
another process count or micro-batch therefore continues at exactly the next window.
"""
import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cli import UserError
from shards import open_shard, read_manifest, rebuild_advice, validate_shards

LOADER_STATE_FORMAT = "lf-llm-train-loader-v2"
LOADER_STATE_V1 = "lf-llm-train-loader-v1"  # per-rank micro-batch counts (checkpoints before v2); still loaded


# ----------------------------------------------------------------------------------------------------------------
# The dataset

@dataclass(frozen=True)
class Shard:
    path: Path
    tokens: int


class ShardDataset:
    """The validated shards of one data_prep.py output directory (train and val), memory-mapped on demand."""

    def __init__(self, data_dir: Path, manifest: dict, train: list[Shard], val: list[Shard]):
        self.data_dir = data_dir
        self.manifest = manifest
        self.train_shards = train
        self.val_shards = val
        self._memmaps = {}
        # Identifies the data a loader state belongs to: the shard files and their hashes.
        listing = [[s["file"], s["split"], s["tokens"], s["sha256"]] for s in manifest["shards"]]
        self.fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]

    @classmethod
    def open(cls, data_dir, verify_sha256: bool = False) -> "ShardDataset":
        """Check the manifest, the tokenizer and every shard's header and size (and sha256 when asked: it reads
        every byte, minutes for the full 10B-token set)."""
        data_dir = Path(data_dir)
        manifest = read_manifest(data_dir)
        splits = {split: [Shard(path, count) for path, count in shards]
                  for split, shards in validate_shards(data_dir, manifest, verify_sha256).items()}
        return cls(data_dir, manifest, splits["train"], splits["val"])

    @property
    def train_tokens(self) -> int:
        return sum(s.tokens for s in self.train_shards)

    @property
    def val_tokens(self) -> int:
        return sum(s.tokens for s in self.val_shards)

    def tokens(self, shard: Shard) -> np.memmap:
        if shard.path not in self._memmaps:
            self._memmaps[shard.path] = open_shard(shard.path, shard.tokens)
        return self._memmaps[shard.path]

    def windows(self, shard: Shard, starts: np.ndarray, seq_len: int) -> np.ndarray:
        """(len(starts), seq_len + 1) int64 tokens of the windows starting at `starts` (token offsets)."""
        index = starts[:, None] + np.arange(seq_len + 1)  # (n, T+1)
        return self.tokens(shard)[index].astype(np.int64)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":  # pinned host memory lets the copy overlap with compute
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _batch_to_device(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) windows -> x = first T tokens, y = last T tokens, both (B, T) int64 on `device`."""
    return _to_device(windows[:, :-1], device), _to_device(windows[:, 1:], device)


def _windows_per_shard(shards: list[Shard], seq_len: int) -> np.ndarray:
    """Windows of T+1 tokens at stride T that fit in each shard: (tokens - 1) // T."""
    return np.array([max(s.tokens - 1, 0) // seq_len for s in shards], dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# What a batch needs of the data: the loaders' rules, which train.py also judges before a run starts

WINDOW = "(seq-len + 1: the targets are the inputs shifted by one)"


def largest_train_batch(dataset: ShardDataset, seq_len: int) -> int:
    """The largest micro-batch TrainLoader takes: the windows of the largest train shard."""
    return int(_windows_per_shard(dataset.train_shards, seq_len).max())


def check_train_batch(dataset: ShardDataset, batch_size: int, seq_len: int) -> None:
    """A micro-batch of `batch_size` windows must fit in one train shard; else a UserError naming the windows needed
    and held."""
    held = largest_train_batch(dataset, seq_len)
    if batch_size > held:
        largest = max(s.tokens for s in dataset.train_shards)
        raise UserError(f"a micro-batch of {batch_size} x {seq_len} tokens needs {batch_size} windows of {seq_len + 1} "
                        f"tokens {WINDOW} in one train shard, but the largest train shard of {dataset.data_dir} holds "
                        f"{largest} tokens: {held} such windows at stride {seq_len}; lower "
                        f"{'--micro-batch or ' if batch_size > 1 else ''}--seq-len, or "
                        f"{rebuild_advice(dataset.data_dir, ' and a larger --shard-tokens')}")


def _val_windows(dataset: ShardDataset, seq_len: int, max_tokens: int | None) -> tuple[np.ndarray, int]:
    """The windows of each val shard, and how many of them an evaluation reads: all, or max_tokens' worth."""
    counts = _windows_per_shard(dataset.val_shards, seq_len)
    total = int(counts.sum())
    return counts, total if max_tokens is None else min(total, max_tokens // seq_len)


def largest_val_batch(dataset: ShardDataset, seq_len: int, world_size: int = 1, max_tokens: int | None = None) -> int:
    """The largest batch with which each of `world_size` ranks gets a validation batch (val_batches)."""
    return _val_windows(dataset, seq_len, max_tokens)[1] // world_size


def check_val_batch(dataset: ShardDataset, batch_size: int, seq_len: int, world_size: int = 1,
                    max_tokens: int | None = None, limit_flag: str = "") -> None:
    """Every rank must get at least one validation batch; else a UserError naming the windows needed and held (and
    what the token limit allows, named `limit_flag` when a flag sets it)."""
    if batch_size <= largest_val_batch(dataset, seq_len, world_size, max_tokens):
        return
    counts, usable = _val_windows(dataset, seq_len, max_tokens)
    total, needed = int(counts.sum()), batch_size * world_size
    limit = f"{limit_flag} {max_tokens}" if limit_flag else f"the limit of {max_tokens} tokens"
    held = f", of which {limit} allows {usable}" if usable < total else ""
    smaller = " or ".join([*(["--micro-batch"] if batch_size > 1 else []), "--seq-len"]
                          + (["the process count"] if world_size > 1 else []))
    remedy = (f"raise {limit_flag or 'the limit'} or lower {smaller}" if total >= needed  # only the limit is short
              else f"lower {smaller}, or {rebuild_advice(dataset.data_dir, ' and a larger --val-tokens')}")
    raise UserError(f"validation of {batch_size} x {seq_len} tokens on {world_size} rank(s) needs {needed} windows of "
                    f"{seq_len + 1} tokens {WINDOW} per step, but the val split of {dataset.data_dir} holds "
                    f"{dataset.val_tokens} tokens: {total} such windows at stride {seq_len}{held}; {remedy}")


# ----------------------------------------------------------------------------------------------------------------
# Training loader

@functools.lru_cache(maxsize=4)
def _shard_order(seed: int, epoch: int, n_shards: int) -> np.ndarray:
    order = np.random.default_rng([seed, 0, epoch]).permutation(n_shards)
    order.flags.writeable = False
    return order


@functools.lru_cache(maxsize=8)
def _window_order(seed: int, epoch: int, shard: int, n_windows: int) -> np.ndarray:
    """Window order of one shard in one epoch (~50k entries for a 100M-token shard at T = 2048)."""
    order = np.random.default_rng([seed, 1, epoch, shard]).permutation(n_windows)
    order.flags.writeable = False
    return order


class TrainLoader:
    """Rank r's micro-batches of the seeded global window stream (see the module docstring)."""

    def __init__(self, dataset: ShardDataset, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device=torch.device("cpu"), log=print):
        if batch_size < 1 or seq_len < 1 or seed < 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader settings: batch_size {batch_size}, seq_len {seq_len}, seed {seed}, "
                             f"rank {rank} of {world_size}")
        check_train_batch(dataset, batch_size, seq_len)
        self.dataset = dataset
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.log = log
        self._windows = _windows_per_shard(dataset.train_shards, seq_len)
        self.epoch_windows = int(self._windows.sum())
        self._window = 0  # the stream position: windows all ranks have read together (k*W*B after k micro-batches)
        self._epoch_seen = 0  # the latest epoch this loader has read from (to log each crossing once)

    def _locate(self, index: int) -> tuple[int, int, int]:
        """Stream window number -> (epoch, position of its shard in the epoch's order, position in that shard's
        window order)."""
        epoch, offset = divmod(index, self.epoch_windows)
        order = _shard_order(self.seed, epoch, len(self._windows))
        ends = np.cumsum(self._windows[order])
        slot = int(np.searchsorted(ends, offset, side="right"))
        return epoch, slot, offset - int(ends[slot] - self._windows[order[slot]])

    def _read(self, index: int, count: int) -> tuple[np.ndarray, int]:
        """`count` stream windows from stream window `index` as (count, T+1) int64, and the last one's epoch."""
        pieces = []
        while count:
            epoch, slot, pos = self._locate(index)
            shard = int(_shard_order(self.seed, epoch, len(self._windows))[slot])
            n = min(count, int(self._windows[shard]) - pos)
            order = _window_order(self.seed, epoch, shard, int(self._windows[shard]))
            starts = order[pos:pos + n] * self.seq_len
            pieces.append(self.dataset.windows(self.dataset.train_shards[shard], starts, self.seq_len))
            index, count = index + n, count - n
        return np.concatenate(pieces), epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), each (B, T) int64 on the loader's device; y is x shifted left by one token."""
        windows, epoch = self._read(self._window + self.rank * self.batch_size, self.batch_size)
        self._window += self.world_size * self.batch_size
        if epoch > self._epoch_seen:
            self.log(f"data: epoch {self._epoch_seen} of {self.dataset.data_dir} done ({self.epoch_windows} windows "
                     f"of {self.seq_len} tokens); starting epoch {epoch} in a new order")
            self._epoch_seen = epoch
        return _batch_to_device(windows, self.device)

    def _settings(self) -> dict:
        """What a saved position is only valid with: the data, the window length and the shuffle seed."""
        return {"dataset": self.dataset.fingerprint, "seq_len": self.seq_len, "seed": self.seed}

    def _position(self, window: int) -> dict:
        """Where stream window `window` lies: a readable check that the saved number means the same data."""
        epoch, slot, pos = self._locate(window)
        shard = int(_shard_order(self.seed, epoch, len(self._windows))[slot])
        return {"epoch": epoch, "shard": self.dataset.train_shards[shard].path.name, "shard_window": pos}

    def state_dict(self) -> dict:
        """Plain ints and strings (safe for torch.load(weights_only=True)); identical on every rank."""
        return {"format": LOADER_STATE_FORMAT, **self._settings(), "window": self._window,
                **self._position(self._window)}

    def load_state_dict(self, state: dict) -> None:
        """Continue at exactly the next stream window of the loader that saved `state`: same data, T and seed; the
        batch size and the number of ranks may differ."""
        state = _upgraded_loader_state(state)
        for key, value in self._settings().items():
            if state.get(key) != value:
                raise UserError(f"the saved loader state has {key} {state.get(key)!r} but this run has {value!r}; "
                                f"resume with the same data directory, sequence length and seed")
        window = state.get("window")
        if not isinstance(window, int) or window < 0 or (
                "shard" in state and any(state.get(k) != v for k, v in self._position(window).items())):
            raise UserError("the saved loader state is inconsistent (its position does not match its window "
                            "number); the checkpoint holding it is damaged")
        self._window = window
        # The epoch of this rank's last window before the save (as this loader would have read it), so that a
        # crossing is logged exactly as without the interruption.
        stride = self.world_size * self.batch_size
        self._epoch_seen = self._locate(window - stride + (self.rank + 1) * self.batch_size - 1)[0] \
            if window >= stride else 0


def _upgraded_loader_state(state) -> dict:
    """A v2 state from a v1 one (micro-batch count k of ranks x batch size: position k*W*B)."""
    if isinstance(state, dict) and state.get("format") == LOADER_STATE_V1 and all(
            isinstance(state.get(k), int) for k in ("micro_batch", "world_size", "batch_size")):
        return {"format": LOADER_STATE_FORMAT, "dataset": state.get("dataset"), "seq_len": state.get("seq_len"),
                "seed": state.get("seed"), "window": state["micro_batch"] * state["world_size"] * state["batch_size"],
                "epoch": state.get("epoch"), "shard": state.get("shard"), "shard_window": state.get("window")}
    if not isinstance(state, dict) or state.get("format") != LOADER_STATE_FORMAT:
        raise UserError("the saved loader state is not one of this repo's train loader states; start the data "
                        "from the beginning or use a matching checkpoint")
    return state


# ----------------------------------------------------------------------------------------------------------------
# Validation

def val_batches(dataset: ShardDataset, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                max_tokens: int | None = None, device=torch.device("cpu")
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic (x, y) batches of the validation split for rank `rank`.

    The split is tiled into windows like the train shards. With `max_tokens` (per evaluation, over all ranks) the
    windows used are spread evenly over the whole split rather than taken from its start; None uses every window.
    Every rank gets the same number of full batches (the remainder, under one batch per rank, is left out), so the
    mean of the per-rank mean losses is the mean over all batches. Settings are checked here, before iterating.
    """
    if batch_size < 1 or seq_len < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad validation settings: batch_size {batch_size}, seq_len {seq_len}, rank {rank} of "
                         f"{world_size}")
    check_val_batch(dataset, batch_size, seq_len, world_size, max_tokens)
    device = torch.device(device)
    counts, usable = _val_windows(dataset, seq_len, max_tokens)
    total, per_rank = int(counts.sum()), usable // (batch_size * world_size)
    used = per_rank * batch_size * world_size
    chosen = np.arange(used, dtype=np.int64) * total // used  # evenly spread, strictly increasing
    ends = np.cumsum(counts)
    shard_of = np.searchsorted(ends, chosen, side="right")
    starts = (chosen - (ends - counts)[shard_of]) * seq_len  # token offset inside its shard
    return _val_batch_iterator(dataset, shard_of, starts, per_rank, batch_size, seq_len, rank, world_size, device)


def _val_batch_iterator(dataset, shard_of, starts, per_rank, batch_size, seq_len, rank, world_size, device):
    """Batch i of rank r holds chosen windows [(i*W + r)*B, (i*W + r + 1)*B), like the train stream."""
    for i in range(per_rank):
        lo = (i * world_size + rank) * batch_size
        shards, offsets = shard_of[lo:lo + batch_size], starts[lo:lo + batch_size]
        pieces = [dataset.windows(dataset.val_shards[s], offsets[shards == s], seq_len) for s in np.unique(shards)]
        yield _batch_to_device(np.concatenate(pieces), device)
