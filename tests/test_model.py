import math

import pytest
import torch

from devices import mfu, peak_flops
from model import GPT, GPTConfig, IGNORE_INDEX, PRESETS, Sampling


def tiny_config(**overrides):
    return GPTConfig(**{**dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32, ffn_hidden=64,
                               attn_dropout=0.0, ffn_dropout=0.0), **overrides})


def test_reference_parameter_counts_exact():
    with torch.device("meta"):  # shapes only: no 1.3 GB allocation
        model = GPT(GPTConfig.from_preset("lf_llm_269m"))
    assert model.num_params() == 320_145_408
    assert model.num_params(include_embedding=False) == 268_682_240


def test_1b_preset_parameter_and_flop_counts_exact():
    """lf_llm_1b: OLMo-1B's shape (C 2048, 16 layers, 16 heads, SwiGLU hidden 8192) with this family's biases,
    RMSNorm weights and GPT-2 vocabulary; counted by hand per tensor below, and pinned."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("lf_llm_1b"))
    C, hidden, V = 2048, 8192, 50257
    block = (C * 3 * C + 3 * C) + (C * C + C) + (C * 2 * hidden + 2 * hidden) + (hidden * C + C) + 2 * C
    assert model.num_params() == 16 * block + V * C + C == 1_177_161_728
    assert model.num_params(include_embedding=False) == 1_074_235_392
    assert model.config.n_head == 16 and model.config.block_size == 2048 and model.config.vocab_size == V
    matmul = 16 * (C * 3 * C + C * C + C * 2 * hidden + hidden * C) + V * C
    assert model.flops_per_token(2048) == 6 * matmul + 12 * 16 * C * 2048 == 7_865_315_328


def test_reference_architecture_shapes():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("lf_llm_269m"))
    block = model.blocks[0]
    assert len(model.blocks) == 16 and model.config.head_dim == 64
    assert tuple(block.attn.qkv.weight.shape) == (3072, 1024) and block.attn.qkv.bias is not None
    assert tuple(block.ffn.fc.weight.shape) == (8192, 1024) and tuple(block.ffn.proj.weight.shape) == (1024, 4096)
    assert block.attn_drop.p == 0.1 and block.ffn.drop.p == 0.15
    assert block.norm1.eps == 1e-5 and model.config.rope_theta == 10000.0
    assert not any(n.startswith("lm_head") for n, _ in model.named_parameters())  # head is tied to wte


def test_flops_per_token_formula():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("lf_llm_269m"))
    matmul = 16 * (1024 * 3072 + 1024 * 1024 + 1024 * 8192 + 4096 * 1024) + 50257 * 1024
    assert model.flops_per_token(2048) == 6 * matmul + 12 * 16 * 1024 * 2048
    assert abs(model.flops_per_token(2048) / 1e9 - 2.32) < 0.01


def test_padded_vocab_keeps_counts_and_logits():
    base = GPT(tiny_config(), seed=3)
    padded = GPT(tiny_config(pad_vocab_to=64), seed=3)
    assert padded.wte.weight.shape[0] == 128 and padded.num_params() == base.num_params()
    assert padded.flops_per_token(32) == base.flops_per_token(32)
    with torch.no_grad():
        padded.load_state_dict({**base.state_dict(), "wte.weight": torch.cat(
            [base.wte.weight, torch.zeros(128 - 97, 32)])})
    idx = torch.randint(0, 97, (2, 16))
    (l1, loss1), (l2, loss2) = base(idx, idx), padded(idx, idx)
    assert l2.shape[-1] == 97 and torch.allclose(l1, l2, atol=1e-6) and torch.allclose(loss1, loss2)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as e:
        GPTConfig.from_preset("gpt5")
    for name in PRESETS:
        assert name in str(e.value)


def test_causality():
    model = GPT(tiny_config(), seed=0).eval()
    idx = torch.randint(0, 97, (1, 24))
    logits, _ = model(idx)
    for t in (0, 7, 23):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 97
        logits2, _ = model(changed)
        assert torch.allclose(logits[:, :t], logits2[:, :t], atol=1e-6), f"token {t} leaked backwards"
        assert not torch.allclose(logits[:, t], logits2[:, t])


def test_kv_cache_matches_full_recompute():
    model = GPT(tiny_config(), seed=1).eval()
    from model import KVCache
    idx = torch.randint(0, 97, (2, 20))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, 32, "cpu", torch.float32)
    prefill, _ = model(idx[:, :12], cache=cache, input_pos=torch.arange(12))
    steps = [model(idx[:, t:t + 1], cache=cache, input_pos=torch.tensor([t]))[0] for t in range(12, 20)]
    cached = torch.cat([prefill, *steps], dim=1)
    assert torch.allclose(full, cached, atol=1e-5)


def greedy_without_cache(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("prompt_len,new", [(5, 20), (30, 10)])  # the second runs past the 32-token window
def test_greedy_generation_equals_argmax_recompute(prompt_len, new):
    model = GPT(tiny_config(), seed=2).eval()
    idx = torch.randint(0, 97, (2, prompt_len))
    assert torch.equal(model.generate(idx, Sampling(new, temperature=0)), greedy_without_cache(model, idx, new))


def test_sampling_reproducible_with_generator():
    model = GPT(tiny_config(), seed=2).eval()
    idx = torch.randint(0, 97, (1, 4))
    runs = [model.generate(idx, Sampling(15, temperature=1.0, top_k=20, top_p=0.9),
                           generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_top_k_one_and_tiny_top_p_are_greedy():
    from model import sample_next
    logits = torch.randn(4, 97)
    greedy = logits.argmax(-1, keepdim=True)
    assert torch.equal(sample_next(logits, Sampling(1, top_k=1)), greedy)
    assert torch.equal(sample_next(logits, Sampling(1, top_p=1e-6)), greedy)


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    """On [.5, .3, .2] a nucleus of 0.7 is the first two tokens (.5 alone falls short; .8 reaches it), and 0.85
    needs all three."""
    from model import sample_next
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(2000, 3)  # 2000 rows: 2000 draws in one call
    for top_p, kept in ((0.7, {0, 1}), (0.85, {0, 1, 2})):
        draws = sample_next(logits, Sampling(1, top_p=top_p), torch.Generator().manual_seed(0))
        assert set(draws.flatten().tolist()) == kept, top_p


def test_stop_token():
    model = GPT(tiny_config(), seed=0).eval()
    prompt = torch.randint(0, 97, (2, 3))
    free = model.generate(prompt, Sampling(10, temperature=0))
    # Stop at the 3rd token row 0 generates: generation must end right there for that row.
    eot = free[0, 5].item()
    stopped = model.generate(prompt, Sampling(10, temperature=0), stop_token=eot)
    first_eot_row1 = [t for t in range(3, 13) if free[1, t] == eot]
    assert stopped.shape[1] == max(6, (first_eot_row1 or [12])[0] + 1)
    assert torch.equal(stopped[0, :6], free[0, :6]) and (stopped[0, 6:] == eot).all()


def test_loss_at_init_close_to_uniform():
    model = GPT(GPTConfig.from_preset("debug"), seed=0).eval()
    gen = torch.Generator().manual_seed(0)  # seeded: the global RNG's state depends on the tests run before
    idx, targets = (torch.randint(0, 50257, (16, 128), generator=gen) for _ in range(2))
    _, loss = model(idx, targets)  # about 0.2 above uniform for this init; 2 x 64 tokens once drew 0.306
    assert abs(loss.item() - math.log(50257)) < 0.3


def test_ignore_index_targets():
    model = GPT(tiny_config(), seed=0).eval()
    idx = torch.randint(0, 97, (1, 10))
    targets = idx.clone()
    targets[0, 5:] = IGNORE_INDEX
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, :5], idx[0, :5])
    assert torch.allclose(loss, expected)


def test_init_statistics_match_scheme():
    cfg = GPTConfig.from_preset("debug")
    model = GPT(cfg, seed=0)
    std_in, std_out = math.sqrt(2 / (5 * cfg.n_embd)), 1 / (math.sqrt(cfg.n_embd) * cfg.n_layer)
    checks = {"wte.weight": std_in}
    for i in range(cfg.n_layer):
        checks |= {f"blocks.{i}.attn.qkv.weight": std_in, f"blocks.{i}.ffn.fc.weight": std_in,
                   f"blocks.{i}.attn.proj.weight": std_out, f"blocks.{i}.ffn.proj.weight": std_out}
    params = dict(model.named_parameters())
    for name, std in checks.items():
        p = params[name]
        assert abs(p.mean().item()) < 3 * std / math.sqrt(p.numel()) + 1e-6, name
        assert abs(p.std().item() / std - 1) < 0.02, name
    for name, p in params.items():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        if "norm" in name:
            assert torch.all(p == 1), name


def test_init_is_seeded():
    a, b, c = (GPT(tiny_config(), seed=s) for s in (5, 5, 6))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.wte.weight, c.wte.weight)


def test_optimizer_groups_cover_every_parameter_once():
    model = GPT(tiny_config(), seed=0)
    groups = model.param_groups(weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    decay = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (name.endswith("weight") and "norm" not in name), name
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.param_groups[1]["weight_decay"] == 0.0


def test_mfu_peaks():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None and mfu(10, 10, None) is None
    assert mfu(2_322_044_928, 38_600, 312e12) == pytest.approx(0.287, abs=0.001)  # the reference run's ~29%


def block_by_hand(block, x, cos, sin, attn_mask=1.0, ffn_mask=1.0):
    """The reference block with explicit dropout masks: x + mask_a * attn(norm1(x)), then
    h + proj(mask_f * value * silu(gate)) (the FFN's dropout after the activation, before the output projection)."""
    import torch.nn.functional as F
    h = x + attn_mask * block.attn(block.norm1(x), cos, sin)
    value, gate = block.ffn.fc(block.norm2(h)).chunk(2, dim=-1)
    return h + block.ffn.proj(ffn_mask * value * F.silu(gate))


def test_dropout_sits_on_the_attention_output_and_after_the_swiglu_activation():
    """With both dropouts at 1 the attention branch vanishes and the FFN branch is its output bias; at 0.5 the block
    equals the one by hand with masks drawn from the same seed in the block's order (attention's (B, T, C), then the
    FFN's (B, T, hidden)); in eval mode it equals the one by hand without masks."""
    import torch.nn.functional as F
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    for p in (1.0, 0.5):
        model = GPT(tiny_config(attn_dropout=p, ffn_dropout=p), seed=1).train()
        block = model.blocks[0]
        with torch.no_grad():
            for param in block.parameters():  # biases and norm weights away from 0 and 1, where a misplaced op hides
                if param.dim() == 1:
                    param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
        cos, sin = model.rope_cos[:8], model.rope_sin[:8]
        torch.manual_seed(3)
        out = block(x, cos, sin)
        with torch.no_grad():
            if p == 1.0:
                assert torch.equal(out, x + block.ffn.proj.bias)
            torch.manual_seed(3)
            masks = F.dropout(torch.ones(2, 8, 32), p), F.dropout(torch.ones(2, 8, 64), p)  # 0 or 1 / (1 - p)
            torch.testing.assert_close(out, block_by_hand(block, x, cos, sin, *masks), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(block.eval()(x, cos, sin), block_by_hand(block, x, cos, sin))


def test_activation_checkpointing_gives_same_loss_and_grads():
    torch.manual_seed(0)
    idx = torch.randint(0, 97, (2, 16))
    results = []
    for checkpointing in (False, True):
        model = GPT(tiny_config(attn_dropout=0.1, ffn_dropout=0.15), seed=4).train()
        if checkpointing:
            model.enable_activation_checkpointing()
        torch.manual_seed(1)  # same dropout masks: checkpointing replays the RNG state in its recompute
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
