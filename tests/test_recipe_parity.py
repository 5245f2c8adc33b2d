"""The training step pinned to the reference recipe: train.py's Trainer against a loop written here, in plain
PyTorch, from the recipe's own numbers (shared/reference: AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
matrices only, grad clip 1.0, linear warmup then cosine to min_lr, loss averaged over accumulation steps).

The reference gets the same token windows (recorded from the Trainer's loader), the same initial weights (the
model's seeded init) and the same dropout stream (the global RNG seeded with seed + rank, as the recipe's DDP
does), so on CPU in float32 the two compute the same ops in the same order: losses, pre-clip grad norms and final
weights are compared bitwise; the logged LR to 1e-12 (the schedule is written from the formula here, not copied).
"""
import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script
from dataloader import ShardDataset, TrainLoader, val_batches
from devices import Dist
from model import GPT, GPTConfig
from train import TrainConfig, Trainer

# The recipe (lf_llm_269m), written out rather than read from TrainConfig: a changed default must show up here.
BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.95), 1e-8, 0.1, 1.0
MAX_LR, MIN_LR = 2.1e-3, 2.1e-4
# A short run of the debug model: 6 steps of 2 accumulated micro-batches of 4 x 32 tokens, dropout on.
SEED, MICRO, SEQ, ACCUM, WARMUP, STEPS = 1337, 4, 32, 2, 2, 6
VAL_TOKENS = 512  # per evaluation: 4 batches of 4 x 32


def reference_lr(step: int) -> float:
    """Warmup: max_lr * (step + 1) / warmup; then a half cosine from max_lr (step = warmup) to min_lr (last step)."""
    if step < WARMUP:
        return MAX_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / (STEPS - 1 - WARMUP)
    return MIN_LR + (MAX_LR - MIN_LR) * (1 + math.cos(math.pi * progress)) / 2


def reference_optimizer(model):
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                              {"params": vectors, "weight_decay": 0.0}], lr=MAX_LR, betas=BETAS, eps=EPS)


def loss_of(model, x, y):
    logits = model(x)[0]  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def reference_training(model, rank_batches: list[list], rng_seeds: list[int]) -> list[dict]:
    """The recipe's optimizer steps over `rank_batches[r]` (rank r's micro-batches, in order), each rank drawing
    dropout masks from its own stream (the global RNG seeded with rng_seeds[r]); gradients are the mean over ranks
    and micro-batches, as DDP with accumulation gives. One event per step: mean loss, lr, pre-clip grad norm."""
    optimizer = reference_optimizer(model)
    world = len(rank_batches)
    streams = []
    for seed in rng_seeds:
        torch.manual_seed(seed)
        streams.append(torch.get_rng_state())
    model.train()
    events = []
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = reference_lr(step)
        losses = []
        for rank in range(world):
            torch.set_rng_state(streams[rank])
            for micro in range(ACCUM):
                x, y = rank_batches[rank][step * ACCUM + micro]
                loss = loss_of(model, x, y)
                (loss / (ACCUM * world)).backward()
                losses.append(loss.detach())
            streams[rank] = torch.get_rng_state()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        per_rank = [sum(losses[r * ACCUM:(r + 1) * ACCUM], torch.zeros(())) / ACCUM for r in range(world)]
        events.append({"step": step, "loss": (sum(per_rank) / world).item(), "lr": reference_lr(step),
                       "grad_norm": norm.item()})
    return events


@torch.no_grad()
def reference_val_loss(model, dataset) -> float:
    """Mean loss over the validation batches with dropout off (eval mode)."""
    model.eval()
    losses = [loss_of(model, x, y) for x, y in val_batches(dataset, MICRO, SEQ, max_tokens=VAL_TOKENS)]
    return (sum(losses) / len(losses)).item()


def trainer_config(data, out, **overrides) -> TrainConfig:
    """The debug preset on the short schedule; the optimizer settings stay the defaults, i.e. the recipe's."""
    return TrainConfig.from_preset(
        "debug", data=str(data), out=str(out), micro_batch=str(MICRO), seq_len=SEQ,
        total_batch_tokens=MICRO * SEQ * ACCUM, max_steps=STEPS, warmup_steps=WARMUP, max_lr=MAX_LR, min_lr=MIN_LR,
        seed=SEED, log_every=1, eval_every=STEPS // 2, val_tokens=VAL_TOKENS, final_val_tokens=VAL_TOKENS,
        hellaswag_every=0, hellaswag_limit=2, sample_every=0, sample_tokens=2, ckpt_every=0, **overrides)


def read_events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trainer_run(embedded_data, tmp_path_factory):
    """train.py's Trainer in this process, its loader's batches recorded; returns (run dir, batches, final model)."""
    out = tmp_path_factory.mktemp("parity") / "run"
    trainer = Trainer(trainer_config(embedded_data, out), "debug", Dist(), torch.device("cpu"))
    batches, next_batch = [], trainer.loader.next_batch

    def recorded():
        batches.append(next_batch())
        return batches[-1]
    trainer.loader.next_batch = recorded
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        trainer.run()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return out, batches, trainer.model


@pytest.fixture(scope="module")
def reference_run(trainer_run, embedded_data):
    """The reference loop on the recorded batches; returns (events, final model, val losses {step: loss})."""
    _, batches, _ = trainer_run
    model = GPT(GPTConfig.from_preset("debug"), seed=SEED)
    dataset = ShardDataset.open(embedded_data, verify_sha256=False)
    val = {0: reference_val_loss(model, dataset)}
    events = reference_training(model, [batches], [SEED])
    val[STEPS] = reference_val_loss(model, dataset)
    return events, model, val


def test_losses_lr_and_grad_norms_equal_the_reference(trainer_run, reference_run):
    run_dir, batches, _ = trainer_run
    reference, _, _ = reference_run
    assert len(batches) == STEPS * ACCUM
    logged = [{k: e[k] for k in ("step", "loss", "lr", "grad_norm")} for e in read_events(run_dir) if "loss" in e]
    assert [e["step"] for e in logged] == list(range(STEPS))
    for ours, ref in zip(logged, reference):
        assert ours["lr"] == pytest.approx(ref["lr"], rel=1e-12, abs=0), ours["step"]
        assert (ours["loss"], ours["grad_norm"]) == (ref["loss"], ref["grad_norm"]), ours["step"]
    # clipping is exercised: the steps' gradients are larger than the clip threshold (else it would be untested)
    assert max(e["grad_norm"] for e in reference) > GRAD_CLIP


def test_final_weights_equal_the_reference(trainer_run, reference_run):
    _, _, trained = trainer_run
    _, reference, _ = reference_run
    ours, theirs = trained.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_validation_loss_is_an_eval_mode_mean_over_the_same_batches(trainer_run, reference_run):
    run_dir, _, _ = trainer_run
    _, _, reference_val = reference_run
    logged = {e["step"]: e["val_loss"] for e in read_events(run_dir) if "val_loss" in e}
    assert sorted(logged) == [0, STEPS // 2, STEPS]
    for step in (0, STEPS):
        assert logged[step] == pytest.approx(reference_val[step], rel=1e-6), step


# --- DDP: each rank its own data and dropout stream ----------------------------------------------------------------

def test_ddp_with_dropout_matches_the_reference_with_a_dropout_stream_per_rank(embedded_data, tmp_path):
    """2 gloo processes, dropout on: rank r draws its masks from the stream seeded with seed + r. The reference
    replays both ranks in one process; only the order of the gradient sums differs (DDP adds the ranks' gradients
    after each accumulated them), a rounding difference that AdamW's normalised update can amplify in near-zero
    gradient elements: so the losses, which average over every weight, are compared to 1e-5, not bitwise. Ranks
    with the same masks move the very first loss (identical weights) by ~1e-3."""
    out = tmp_path / "ddp"
    flags = ["--config", "debug", "--micro-batch", MICRO, "--seq-len", SEQ, "--total-batch-tokens", MICRO * SEQ * 2 * 2,
             "--max-steps", STEPS, "--warmup-steps", WARMUP, "--max-lr", MAX_LR, "--min-lr", MIN_LR, "--seed", SEED,
             "--log-every", 1, "--eval-every", 0, "--hellaswag-every", 0, "--sample-every", 0, "--ckpt-every", 0,
             "--val-tokens", VAL_TOKENS, "--final-val-tokens", VAL_TOKENS, "--hellaswag-limit", 2,
             "--sample-tokens", 2]
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *flags,
               "--data", embedded_data, "--out", out, check=True)
    dataset = ShardDataset.open(embedded_data, verify_sha256=False)
    rank_batches = []
    for rank in range(2):
        loader = TrainLoader(dataset, MICRO, SEQ, rank=rank, world_size=2, seed=SEED)
        rank_batches.append([loader.next_batch() for _ in range(STEPS * ACCUM)])
    reference = reference_training(GPT(GPTConfig.from_preset("debug"), seed=SEED), rank_batches, [SEED, SEED + 1])
    logged = [e for e in read_events(out) if "loss" in e]
    assert [e["step"] for e in logged] == list(range(STEPS))
    for ours, ref in zip(logged, reference):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5), ours["step"]
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), ours["step"]
