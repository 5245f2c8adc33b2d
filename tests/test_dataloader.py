"""The shard format and the loaders, on small synthetic shards whose token values are their global positions, so
every window is identified by its first token and y must equal x + 1."""
import io
import itertools
import json

import numpy as np
import pytest
import torch

import shards
from cli import UserError
from dataloader import ShardDataset, TrainLoader, val_batches
from helpers import make_dataset

T = 8  # sequence length of the tests (helpers.make_dataset's default shards: 44 windows per epoch)


@pytest.fixture
def data_dir(tmp_path):
    return make_dataset(tmp_path / "data")


def all_train_window_starts(ds):
    """First token of every train window: token value j*T of each shard."""
    return {int(ds.tokens(s)[j * T]) for s in ds.train_shards for j in range((s.tokens - 1) // T)}


def read(loader, n):
    batches = [loader.next_batch() for _ in range(n)]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_shard_file_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.uint16)
    sha = shards.write_shard(tmp_path / "s.bin", tokens)
    assert (tmp_path / "s.bin").stat().st_size == shards.HEADER_BYTES + 2 * len(tokens)
    assert shards.read_shard_header(tmp_path / "s.bin") == len(tokens)
    assert np.array_equal(shards.open_shard(tmp_path / "s.bin", len(tokens)), tokens)
    assert sha == shards.file_sha256(tmp_path / "s.bin")
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temporary file left behind


@pytest.mark.parametrize("batch_size", [4, 3])  # 44 windows per epoch: batches end on / straddle the epoch boundary
def test_epoch_reads_every_window_once(data_dir, batch_size):
    ds = ShardDataset.open(data_dir)
    logs = []
    loader = TrainLoader(ds, batch_size=batch_size, seq_len=T, seed=5, log=logs.append)
    n_batches = -(-2 * loader.epoch_windows // batch_size)  # two epochs, rounded up
    x, y = read(loader, n_batches)
    assert x.dtype == y.dtype == torch.int64 and x.shape == (n_batches * batch_size, T)
    assert torch.equal(y, x + 1)  # y is x shifted by one (the tokens are consecutive within a shard)
    starts = x[:, 0].tolist()
    epoch0, epoch1 = starts[:loader.epoch_windows], starts[loader.epoch_windows:2 * loader.epoch_windows]
    assert sorted(epoch0) == sorted(all_train_window_starts(ds))  # every window exactly once
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0  # again, in a new order
    epochs_started = (n_batches * batch_size - 1) // loader.epoch_windows  # 1, or 2 when the last batch spills
    assert len(logs) == epochs_started and "starting epoch 1 " in logs[0]  # each crossing logged once


def test_shuffle_depends_on_seed(data_dir):
    ds = ShardDataset.open(data_dir)
    a = read(TrainLoader(ds, batch_size=4, seq_len=T, seed=1), 3)[0]
    b = read(TrainLoader(ds, batch_size=4, seq_len=T, seed=2), 3)[0]
    assert torch.equal(a, read(TrainLoader(ds, batch_size=4, seq_len=T, seed=1), 3)[0])
    assert not torch.equal(a, b)


def epochs_by_shard(ds, loader, epochs):
    """Read `epochs` whole epochs (batch size 1); for each epoch, {shard name: its window starts in reading order}."""
    starts = read(loader, epochs * loader.epoch_windows)[0][:, 0].tolist()
    shard_of = {int(ds.tokens(s)[j * T]): s.path.name for s in ds.train_shards for j in range((s.tokens - 1) // T)}
    result = []
    for e in range(epochs):
        by_shard = {}
        for start in starts[e * loader.epoch_windows:(e + 1) * loader.epoch_windows]:
            by_shard.setdefault(shard_of[start], []).append(start)
        result.append(by_shard)
    return result


def test_window_order_inside_each_shard_is_reshuffled_every_epoch(data_dir, tmp_path):
    # One train shard: the shard order cannot change, so only a new window order makes epoch 1 differ from epoch 0.
    one = ShardDataset.open(make_dataset(tmp_path / "one", train_sizes=[201]))  # 25 windows
    epochs = epochs_by_shard(one, TrainLoader(one, batch_size=1, seq_len=T, seed=0, log=lambda _: None), 3)
    orders = [e["train_000000.bin"] for e in epochs]
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(orders[2]) == sorted(all_train_window_starts(one))
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    # Several shards: each shard of more than one window is read in a new order in each epoch, not only the shards.
    ds = ShardDataset.open(data_dir)
    first, second = epochs_by_shard(ds, TrainLoader(ds, batch_size=1, seq_len=T, seed=0, log=lambda _: None), 2)
    for name, order in first.items():
        assert sorted(second[name]) == sorted(order)
        if len(order) > 2:
            assert second[name] != order, name


def test_ranks_are_disjoint_and_their_union_is_the_single_process_stream(data_dir):
    ds = ShardDataset.open(data_dir)
    world, batch, steps = 3, 2, 10  # 60 windows: crosses into the second epoch
    single = TrainLoader(ds, batch_size=batch, seq_len=T, seed=3, log=lambda _: None)
    single_batches = [single.next_batch()[0] for _ in range(steps * world)]
    per_rank = [[loader.next_batch()[0] for _ in range(steps)]
                for loader in (TrainLoader(ds, batch_size=batch, seq_len=T, rank=r, world_size=world, seed=3,
                                           log=lambda _: None) for r in range(world))]
    for k in range(steps):
        for r in range(world):
            assert torch.equal(per_rank[r][k], single_batches[k * world + r])
    in_first_epoch = 44 // (world * batch)  # 7 steps = 42 windows, all of epoch 0
    starts = torch.cat([per_rank[r][k] for r in range(world) for k in range(in_first_epoch)])[:, 0].tolist()
    assert len(starts) == len(set(starts)) == 42  # no window read by two ranks


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_resumed_loader_yields_identical_batches(data_dir, rank, world):
    ds = ShardDataset.open(data_dir)
    kwargs = dict(batch_size=4, seq_len=T, world_size=world, seed=11, log=lambda _: None)
    uninterrupted = TrainLoader(ds, rank=rank, **kwargs)
    read(uninterrupted, 4)
    saver = TrainLoader(ds, rank=0, **kwargs)  # train.py saves rank 0's state; every rank loads it
    read(saver, 4)
    buffer = io.BytesIO()
    torch.save({"loader": saver.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["loader"]
    assert state == saver.state_dict() and state["window"] == 4 * world * 4  # 4 micro-batches of 4 on each rank
    resumed = TrainLoader(ds, rank=rank, **kwargs)
    resumed.load_state_dict(state)
    for _ in range(12):  # well into the next epoch
        a, b = uninterrupted.next_batch(), resumed.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_resume_refuses_other_settings_or_data(data_dir, tmp_path):
    ds = ShardDataset.open(data_dir)
    loader = TrainLoader(ds, batch_size=4, seq_len=T, seed=0)
    read(loader, 2)
    state = loader.state_dict()
    with pytest.raises(UserError, match="seq_len 8"):
        TrainLoader(ds, batch_size=4, seq_len=T // 2, seed=0).load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        TrainLoader(ds, batch_size=4, seq_len=T, seed=1).load_state_dict(state)
    other = ShardDataset.open(make_dataset(tmp_path / "other", train_sizes=[300, 300]))
    with pytest.raises(UserError, match="dataset"):
        TrainLoader(other, batch_size=4, seq_len=T, seed=0).load_state_dict(state)
    with pytest.raises(UserError, match="inconsistent"):
        TrainLoader(ds, batch_size=4, seq_len=T, seed=0).load_state_dict({**state, "window": 7})


@pytest.mark.parametrize("saved_world,saved_batch,world,batch", [(2, 4, 1, 2), (1, 2, 2, 4), (2, 2, 4, 1)])
def test_resume_under_another_layout_continues_at_the_next_window(data_dir, saved_world, saved_batch, world, batch):
    """Elastic resume: ranks x micro-batch change, the token batch per step (8 windows) stays; after the resume the
    ranks together read exactly the windows the saving layout would have read, epoch crossing included."""
    ds = ShardDataset.open(data_dir)

    def step_windows(loaders, steps):  # the (x) rows of each optimizer step, all ranks' micro-batches in stream order
        accum = 8 // (len(loaders) * loaders[0].batch_size)
        out = []
        for _ in range(steps):
            per_rank = [[ld.next_batch()[0] for _ in range(accum)] for ld in loaders]
            out.append(torch.cat([per_rank[r][k] for k in range(accum) for r in range(len(loaders))]))
        return out

    def loaders(n, b):
        return [TrainLoader(ds, batch_size=b, seq_len=T, rank=r, world_size=n, seed=5, log=lambda _: None)
                for r in range(n)]
    uninterrupted = step_windows(loaders(saved_world, saved_batch), 10)
    saving = loaders(saved_world, saved_batch)
    step_windows(saving, 3)
    resumed = loaders(world, batch)
    for ld in resumed:
        ld.load_state_dict(saving[0].state_dict())
    for a, b in zip(uninterrupted[3:], step_windows(resumed, 7)):  # 10 steps of 8 windows: into the next epoch
        assert torch.equal(a, b)


@pytest.mark.parametrize("rank,world,batch", [(0, 1, 4), (1, 2, 3)])
def test_resumed_loader_logs_each_epoch_crossing_once(data_dir, rank, world, batch):
    """Interrupted after any batch and resumed, a loader logs the epoch crossings the uninterrupted one logs, at the
    same batches: none again after a resume past a crossing, none missed before one."""
    ds = ShardDataset.open(data_dir)
    steps = -(-2 * 44 // (world * batch)) + 1  # into the third epoch

    def run(batches, state=None):
        logs = []
        loader = TrainLoader(ds, batch_size=batch, seq_len=T, rank=rank, world_size=world, seed=2,
                             log=lambda m: logs.append((len(got), m)))
        if state is not None:
            loader.load_state_dict(state)
        got = []
        for _ in range(batches):
            loader.next_batch()
            got.append(None)
        return loader.state_dict(), logs
    _, whole = run(steps)
    assert len(whole) == 2  # epochs 1 and 2 started
    for split in range(1, steps):
        state, first = run(split)
        _, second = run(steps - split, state)
        assert first + [(i + split, m) for i, m in second] == whole, split


def test_loader_state_of_the_per_rank_format_still_loads(data_dir):
    """Checkpoints before the stream-position state saved v1 states: micro-batch count k of W ranks x B windows."""
    ds = ShardDataset.open(data_dir)
    reference = TrainLoader(ds, batch_size=2, seq_len=T, rank=1, world_size=2, seed=3, log=lambda _: None)
    read(reference, 5)
    old = {"format": "lf-llm-train-loader-v1", "dataset": ds.fingerprint, "batch_size": 2, "seq_len": T,
           "world_size": 2, "seed": 3, "micro_batch": 5, **{k: v for k, v in reference.state_dict().items()
                                                            if k in ("epoch", "shard")},
           "window": reference.state_dict()["shard_window"]}
    resumed = TrainLoader(ds, batch_size=2, seq_len=T, rank=1, world_size=2, seed=3, log=lambda _: None)
    resumed.load_state_dict(old)
    assert torch.equal(resumed.next_batch()[0], reference.next_batch()[0])
    with pytest.raises(UserError, match="inconsistent"):
        resumed.load_state_dict({**old, "micro_batch": 4})


def test_batch_larger_than_every_shard_is_refused(data_dir):
    """Named in windows, needed and held, as the val split is."""
    ds = ShardDataset.open(data_dir)
    with pytest.raises(UserError, match=r"needs 25 windows of 9 tokens .* in one train shard, but the largest train "
                                        r"shard of .* holds 200 tokens: 24 such windows at stride 8;"):
        TrainLoader(ds, batch_size=25, seq_len=T)  # 25 x 8 + 1 > 200 tokens
    TrainLoader(ds, batch_size=24, seq_len=T)  # fits the largest shard exactly


@pytest.mark.parametrize("seq_len", [4, T, 33])
def test_the_largest_batches_are_where_the_loaders_refuse(data_dir, seq_len):
    """largest_train_batch and largest_val_batch (what train.py's --micro-batch auto takes at most, and its up-front
    check judges) are exactly the largest batches TrainLoader and val_batches take, for each number of ranks and
    token limit."""
    from dataloader import largest_train_batch, largest_val_batch
    ds = ShardDataset.open(data_dir)
    largest = largest_train_batch(ds, seq_len)
    TrainLoader(ds, batch_size=largest, seq_len=seq_len)
    with pytest.raises(UserError, match=f"needs {largest + 1} windows"):
        TrainLoader(ds, batch_size=largest + 1, seq_len=seq_len)
    for world_size, max_tokens in itertools.product((1, 2, 3), (None, 3 * seq_len, 7 * seq_len + 1)):
        largest = largest_val_batch(ds, seq_len, world_size, max_tokens)
        assert largest >= 1
        val_batches(ds, largest, seq_len, world_size=world_size, max_tokens=max_tokens)
        with pytest.raises(UserError, match=f"needs {(largest + 1) * world_size} windows"):
            val_batches(ds, largest + 1, seq_len, world_size=world_size, max_tokens=max_tokens)


def val_window_starts(ds, **kwargs):
    return [x[:, 0].tolist() for x, _ in val_batches(ds, seq_len=T, **kwargs)]


def test_val_batches_deterministic_and_split_evenly_between_ranks(data_dir):
    ds = ShardDataset.open(data_dir)
    x, y = next(val_batches(ds, batch_size=2, seq_len=T))
    assert x.shape == y.shape == (2, T) and x.dtype == torch.int64 and torch.equal(y, x + 1)
    assert val_window_starts(ds, batch_size=2) == val_window_starts(ds, batch_size=2)
    whole = [s for batch in val_window_starts(ds, batch_size=2) for s in batch]
    assert len(whole) == 24  # (100 - 1) // 8 = 12 windows per val shard, all used
    ranks = [val_window_starts(ds, batch_size=2, rank=r, world_size=3) for r in range(3)]
    assert len({len(batches) for batches in ranks}) == 1  # same number of batches on every rank
    union = [s for batches in ranks for batch in batches for s in batch]
    assert len(union) == len(set(union)) == 24 and set(union) == set(whole)


def test_val_token_bound_spreads_windows_over_the_split(data_dir):
    ds = ShardDataset.open(data_dir)
    starts = [s for batch in val_window_starts(ds, batch_size=2, max_tokens=4 * T) for s in batch]
    assert len(starts) == 4
    assert any(s < 100 for s in starts) and any(s >= 100 for s in starts)  # both val shards, not just the first
    with pytest.raises(UserError, match="allows 1; raise the limit"):
        val_batches(ds, batch_size=2, seq_len=T, max_tokens=T)  # less than one batch


def test_too_small_val_split_is_named_in_windows(data_dir, tmp_path):
    """The first GPU user's case in small: a split of exactly batch x seq-len tokens holds one window too few,
    since a window is seq-len + 1 tokens; the message counts windows, needed and held (and what a limit allows)."""
    exact = ShardDataset.open(make_dataset(tmp_path / "exact", val_sizes=[4 * T]))  # (32 - 1) // 8 = 3 windows
    with pytest.raises(UserError, match=r"needs 4 windows of 9 tokens .* holds 32 tokens: 3 such windows at stride 8;"):
        val_batches(exact, batch_size=4, seq_len=T)
    with pytest.raises(UserError, match=r"needs 2 windows .* 24 such windows .* limit of 8 tokens allows 1; raise the "
                                        r"limit or lower --micro-batch or --seq-len$"):  # (the split holds enough)
        val_batches(ShardDataset.open(data_dir), batch_size=2, seq_len=T, max_tokens=T)


@pytest.mark.parametrize("batch_size, world_size", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_the_remedies_of_a_small_split_are_only_those_that_can_help(batch_size, world_size, tmp_path):
    """A micro-batch of 1 was told to lower --micro-batch; fewer processes were never offered."""
    tiny = ShardDataset.open(make_dataset(tmp_path / "tiny", train_sizes=[T], val_sizes=[T]))  # 0 windows each
    with pytest.raises(UserError) as val:
        val_batches(tiny, batch_size=batch_size, seq_len=T, world_size=world_size)
    with pytest.raises(UserError) as train:
        TrainLoader(tiny, batch_size=batch_size, seq_len=T)
    for error in (val, train):
        assert ("--micro-batch" in str(error.value)) == (batch_size > 1) and "--seq-len" in str(error.value)
    assert ("the process count" in str(val.value)) == (world_size > 1)


def test_open_refuses_missing_or_unfinished_data(tmp_path):
    with pytest.raises(UserError, match="does not exist.*data_prep.py --source"):
        ShardDataset.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest.json.*data_prep.py --source"):
        ShardDataset.open(tmp_path / "empty")


def edit_manifest(data_dir, **changes):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    (data_dir / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def test_open_refuses_another_tokenizer(data_dir):
    edit_manifest(data_dir, tokenizer_sha256="0" * 64)
    with pytest.raises(UserError, match="another tokenizer"):
        ShardDataset.open(data_dir)


def test_open_refuses_truncated_or_corrupt_shards(data_dir):
    shard = data_dir / "train_000002.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(UserError, match="train_000002.bin is truncated"):
        ShardDataset.open(data_dir)
    shard.write_bytes(b"NOTOURS!" + data[8:])
    with pytest.raises(UserError, match="bad header"):
        ShardDataset.open(data_dir)
    flipped = bytearray(data)
    flipped[-1] ^= 1  # same size and header, different content: only the sha256 check sees it
    shard.write_bytes(bytes(flipped))
    ShardDataset.open(data_dir)
    with pytest.raises(UserError, match="sha256"):
        ShardDataset.open(data_dir, verify_sha256=True)


def test_open_refuses_a_manifest_that_disagrees_with_a_shard(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["shards"][0]["tokens"] += 1
    edit_manifest(data_dir, shards=manifest["shards"])
    with pytest.raises(UserError, match="the manifest says"):
        ShardDataset.open(data_dir)
    (data_dir / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt or not a data_prep.py manifest"):
        ShardDataset.open(data_dir)


def test_shard_order_is_redrawn_every_epoch(data_dir):
    """Each epoch visits the train shards in its own order (4 shards: one order repeated over 6 epochs would mean
    the draw ignores the epoch)."""
    ds = ShardDataset.open(data_dir)
    loader = TrainLoader(ds, batch_size=1, seq_len=T, seed=0, log=lambda _: None)
    shard_of = {int(ds.tokens(s)[j * T]): i for i, s in enumerate(ds.train_shards) for j in range((s.tokens - 1) // T)}
    starts = read(loader, 6 * loader.epoch_windows)[0][:, 0].tolist()
    orders = set()
    for e in range(6):
        visited = [shard_of[s] for s in starts[e * loader.epoch_windows:(e + 1) * loader.epoch_windows]]
        order = tuple(dict.fromkeys(visited))
        assert sorted(order) == [0, 1, 2, 3] and len(visited) == loader.epoch_windows
        assert [shard for shard, _ in itertools.groupby(visited)] == list(order)  # one shard after the other
        orders.add(order)
    assert len(orders) > 1
