"""The LF_LLM-269M model: a GPT-style decoder with RoPE, RMSNorm, SwiGLU and tied embeddings, in one file.

Reading order: config and presets, RMSNorm, RoPE, attention (with a KV cache), SwiGLU MLP, block, the model
(init, forward, parameter and FLOP counts, optimizer groups, checkpoint loading), then generation.

Shapes: B batch, T sequence length, C = d_model, H heads, D = C / H head dim, V vocabulary.
"""
import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # targets equal to this (padding) are left out of the loss
# Training attention kernels that --attn-backend can pin (auto: SDPA's own choice for the device and shapes)
ATTENTION_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


# ----------------------------------------------------------------------------------------------------------------
# Config

@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2 BPE, <|endoftext|> = 50256
    block_size: int = 2048  # context length
    n_layer: int = 16
    n_head: int = 16
    n_embd: int = 1024  # d_model
    ffn_hidden: int = 4096  # SwiGLU hidden width (the fused input projection is 2x this)
    attn_dropout: float = 0.1  # on the attention block's output, before the residual add
    ffn_dropout: float = 0.15  # after the SwiGLU activation
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # Round the embedding/head rows up to a multiple of this (1 = off). A speed knob only: padded rows start at 0,
    # their logits are dropped before the loss and sampling, so they never get a gradient or win a sample.
    pad_vocab_to: int = 1

    def __post_init__(self):
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd {self.n_embd} must split into {self.n_head} heads of even size (RoPE)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_to) * self.pad_vocab_to

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """From a checkpoint's saved config; unknown keys are refused, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    # The reference model: 320,145,408 parameters, 268,682,240 without the token embedding.
    "lf_llm_269m": GPTConfig(),
    # 1.18B parameters (1,177,161,728; 1,074,235,392 without the token embedding), 7.87 GFLOPs per token at 2048:
    # the shape of OLMo-1B (d_model 2048, 16 layers, 16 heads, SwiGLU hidden 8192, context 2048; its model card and
    # HF config.json) in this family, i.e. with biases, RMSNorm weights, GPT-2's vocabulary and the reference dropout.
    "lf_llm_1b": GPTConfig(n_embd=2048, ffn_hidden=8192),
    # Tiny: a few hundred CPU training steps take a couple of minutes. The 50257 x 128 embedding is most of it.
    "debug": GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128, ffn_hidden=512),
}


# ----------------------------------------------------------------------------------------------------------------
# Layers

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (bf16 squares lose too much precision), returned in x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_tables(head_dim: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (length, head_dim): angle pos * theta^(-2i/D) for the pair (i, i + D/2) (rotate-half)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # (length, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, D): both halves of a pair share an angle
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[..., i], x[..., i + D/2]) of x (B, H, T, D) by its position's angle; cos/sin (T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


class KVCache:
    """A static cache of every layer's keys and values: (B, H, max_len, D) per layer, allocated once and written in
    place at the positions of a tensor, so that its shapes never change while decoding (a compiled decode step and
    its CUDA graph stay valid). Attention always reads all max_len slots and masks out the ones past the query."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.head_dim)
        # zeros, not empty: masked slots still enter the attention matmul (0 x NaN garbage would be NaN)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.positions = torch.arange(max_len, device=device)  # (max_len,): slot i holds position i
        for t in (*self.k, *self.v):  # fixed addresses: CUDA graphs may write into them in place
            torch._dynamo.mark_static_address(t)

    def matches(self, batch_size: int, max_len: int, device, dtype) -> bool:
        k = self.k[0]
        return (k.size(0), k.size(2), k.device, k.dtype) == (batch_size, max_len, torch.device(device), dtype)

    def update(self, layer: int, input_pos, k, v):
        """Write k, v (B, H, T, D) at positions input_pos (T,); return the whole cache of the layer, 2 x (B, H,
        max_len, D)."""
        self.k[layer].index_copy_(2, input_pos, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, input_pos, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def mask(self, input_pos):
        """(T, max_len) boolean: the query at input_pos[t] sees the slots at or before its own position (later slots
        hold stale keys of an earlier sequence, or zeros)."""
        return self.positions[None, :] <= input_pos[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim, self.layer_idx = config.n_head, config.head_dim, layer_idx
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=True)  # fused q, k, v (in that order)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=True)
        self.backend = "auto"  # the SDPA kernel of the whole-sequence path (GPT.set_attention_backend)

    def forward(self, x, cos, sin, cache: KVCache | None = None, input_pos=None):
        """x (B, T, C); with a cache, input_pos (T,) are the tokens' positions, where their keys/values are written."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            mask, causal = None, True  # the whole sequence: plain causal attention, flash-eligible
        else:  # over all max_len slots (fixed shapes), the ones past each query masked out
            k, v = cache.update(self.layer_idx, input_pos, k, v)  # 2 x (B, H, max_len, D)
            mask, causal = cache.mask(input_pos), False  # (T, max_len)
        pinned = cache is None and self.backend != "auto"
        with sdpa_kernel(ATTENTION_BACKENDS[self.backend]) if pinned else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class SwiGLU(nn.Module):
    """value * SiLU(gate), with one fused C -> 2*hidden input projection (value first, gate second)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.ffn_hidden, bias=True)
        self.drop = nn.Dropout(config.ffn_dropout)
        self.proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=True)

    def forward(self, x):
        value, gate = self.fc(x).chunk(2, dim=-1)  # 2 x (B, T, hidden)
        return self.proj(self.drop(value * F.silu(gate)))


class Block(nn.Module):
    """Pre-norm: x + drop(attn(norm1(x))), then x + ffn(norm2(x)) (the FFN's dropout is inside it)."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.norm1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.attn_drop = nn.Dropout(config.attn_dropout)
        self.norm2 = RMSNorm(config.n_embd, config.norm_eps)
        self.ffn = SwiGLU(config)

    def forward(self, x, cos, sin, cache: KVCache | None = None, input_pos=None):
        x = x + self.attn_drop(self.attn(self.norm1(x), cos, sin, cache, input_pos))
        return x + self.ffn(self.norm2(x))


# ----------------------------------------------------------------------------------------------------------------
# The model

class GPT(nn.Module):
    def __init__(self, config: GPTConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)  # also the LM head (tied)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps)
        # RoPE tables live on the model's device and follow .to(); not saved (derived from the config).
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta, device=self.wte.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False  # see enable_activation_checkpointing
        self.loss_chunk_rows = 0  # see enable_chunked_loss
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Every tensor's init, in one place (the reference scheme). Reproducible for a given seed and device."""
        if self.wte.weight.is_meta:
            return  # shape-only model (parameter counting): nothing to fill
        C, L = self.config.n_embd, self.config.n_layer
        std_in = math.sqrt(2 / (5 * C))  # 0.019764 for C=1024: embedding, QKV, FFN-in
        std_out = 1 / (math.sqrt(C) * L)  # 0.001953 for C=1024, L=16: the two residual output projections
        gen = torch.Generator(device=self.wte.weight.device).manual_seed(seed)

        def normal(t, std):
            t.normal_(0.0, std, generator=gen)

        normal(self.wte.weight, std_in)
        self.wte.weight[self.config.vocab_size:].zero_()  # padded rows (if any) stay 0 forever
        for block in self.blocks:
            normal(block.attn.qkv.weight, std_in)
            block.attn.qkv.bias.zero_()
            normal(block.attn.proj.weight, std_out)
            block.attn.proj.bias.zero_()
            normal(block.ffn.fc.weight, std_in)
            block.ffn.fc.bias.zero_()
            normal(block.ffn.proj.weight, std_out)
            block.ffn.proj.bias.zero_()
            block.norm1.weight.fill_(1.0)
            block.norm2.weight.fill_(1.0)
        self.norm_f.weight.fill_(1.0)
        self.reset_rope_tables()

    @torch.no_grad()
    def reset_rope_tables(self) -> None:
        """(Re)compute the RoPE buffers in place, e.g. after to_empty() left them uninitialized."""
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.block_size, c.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, idx, targets=None, cache: KVCache | None = None, input_pos=None):
        """idx (B, T) token ids -> (logits (B, T, V), mean cross-entropy over targets != IGNORE_INDEX, or None).

        With a KV cache, input_pos (T,) holds the positions of idx's tokens (a tensor, so a compiled decode step
        takes a new position without recompiling): their keys/values are written there and each token attends to
        the cached positions up to its own. Without one, idx is a whole sequence from position 0.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size})")
        if cache is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D)
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # (T, D), looked up on the device
        x = self.wte(idx)  # (B, T, C)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)  # recomputed (same dropout) in backward
            else:
                x = block(x, cos, sin, cache, input_pos)
        x = self.norm_f(x)
        if targets is not None and self.loss_chunk_rows:  # the loss without the (B*T, V) logits: none returned
            head = self.wte.weight[:self.config.vocab_size]  # real rows only (padded ones get no gradient)
            need_grad = torch.is_grad_enabled() and (x.requires_grad or head.requires_grad)
            loss = ChunkedLinearCrossEntropy.apply(x.reshape(B * T, -1), head, targets.reshape(-1),
                                                   self.loss_chunk_rows, need_grad)
            return None, loss
        logits = F.linear(x, self.wte.weight)  # (B, T, padded V): the tied head
        logits = logits[..., :self.config.vocab_size]  # drop padded rows (a no-op view when unpadded)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return logits, loss

    def enable_activation_checkpointing(self) -> None:
        """Keep only each block's input during training and recompute the block in backward: activation memory
        drops from O(layers x block internals) to O(layers x C) per token, for about one more forward pass."""
        self.activation_checkpointing = True

    def enable_chunked_loss(self, rows: int) -> None:
        """With targets, compute the head and the loss `rows` rows at a time (ChunkedLinearCrossEntropy): the
        (B*T, V) float32 logits and their gradient are never held, only one chunk's. forward returns no logits."""
        self.loss_chunk_rows = rows

    def set_attention_backend(self, name: str) -> None:
        """Pin the SDPA kernel of training and evaluation attention (a key of ATTENTION_BACKENDS, or "auto")."""
        assert name == "auto" or name in ATTENTION_BACKENDS, name
        for block in self.blocks:
            block.attn.backend = name

    # ------------------------------------------------------------------------------------------------------------
    # Counting

    def num_params(self, include_embedding: bool = True) -> int:
        """Unique parameters (the tied head counts once; padded vocab rows never count).

        The reference's "269M" excludes the token embedding; its total is 320.1M.
        """
        total = sum(p.numel() for p in self.parameters())
        padding = (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        embedding = self.config.vocab_size * self.config.n_embd
        return total - padding - (0 if include_embedding else embedding)

    def num_matmul_params(self) -> int:
        """Weights that take part in a matmul per token: every Linear weight, plus the tied head once."""
        linear = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return linear + self.config.vocab_size * self.config.n_embd

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N for the matmuls (forward + backward) plus 12*L*C*T for attention scores."""
        c = self.config
        return 6 * self.num_matmul_params() + 12 * c.n_layer * c.n_embd * seq_len

    # ------------------------------------------------------------------------------------------------------------
    # Optimizer

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups by role: weight matrices and the tied embedding decay; biases and norm weights don't."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (decay if p.dim() >= 2 else no_decay).append((name, p))
        named = dict(self.named_parameters())
        covered = [n for n, _ in decay] + [n for n, _ in no_decay]
        assert sorted(covered) == sorted(named) and len(covered) == len(set(covered)), \
            "every parameter must be in exactly one optimizer group"
        return [{"params": [p for _, p in decay], "weight_decay": weight_decay, "role": "matrices"},
                {"params": [p for _, p in no_decay], "weight_decay": 0.0, "role": "biases_and_norms"}]

    def configure_optimizer(self, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8):
        fused = self.wte.weight.device.type == "cuda"
        return torch.optim.AdamW(self.param_groups(weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)

    # ------------------------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, idx, sampling: "Sampling", generator: torch.Generator | None = None,
                 stop_token: int | None = None, on_token=None, compile: bool | None = None):
        """Append up to sampling.max_new_tokens sampled tokens to idx (B, T) and return prompt + new ids.

        A prefill runs the context through the model once, writing every layer's keys/values into a static KVCache
        of block_size slots; then each new token is one decode step over one position (decode_step), compiled
        when `compile` (default: on CUDA; there with CUDA graphs). The context is cropped to the model's window: a
        prompt longer than block_size keeps its last block_size tokens in view, and once the window is full each
        step re-reads the last block_size tokens (exactly what recomputing the cropped context gives).
        Nothing waits for the device per token (sampling stays on it) except every STOP_CHECK_EVERY tokens, where
        generation ends if every row has emitted stop_token (<|endoftext|>): a row that emitted it keeps emitting
        it while the others go on, and the result is cut after the step where the last row stopped. on_token, if
        given, is called with each step's new ids (B, 1), for streaming (after every row stopped, it may get up to
        STOP_CHECK_EVERY - 1 more steps of stop tokens).
        """
        assert not sampling.errors(), sampling  # checked where the user gives it (generate.check_sampling)
        if idx.dim() == 1:
            idx = idx[None]
        (B, prompt_len), window, device = idx.shape, self.config.block_size, idx.device
        compile = device.type == "cuda" if compile is None else compile
        step = compiled_decode_step(device.type) if compile else decode_step
        cache = self._decode_cache(B, compile)
        out = torch.cat([idx, idx.new_zeros(B, sampling.max_new_tokens)], dim=1)  # (B, T + new), filled in place
        done = torch.zeros(B, dtype=torch.bool, device=device)
        input_pos = torch.zeros(1, dtype=torch.long, device=device)  # (1,): the position of the next decode token
        filled = window  # cache slots in use, counted on the host; a full cache means a (re)fill first
        for t in range(prompt_len, out.size(1)):  # t: the column the step writes
            if filled == window:  # prefill from the cropped context (its positions start at 0)
                context = out[:, max(0, t - window):t]
                filled = context.size(1)
                logits = self(context, cache=cache, input_pos=cache.positions[:filled])[0][:, -1]  # (B, V)
                input_pos.fill_(filled)
            else:  # the previous token at position input_pos; its logits are used before the next step runs
                if compile and device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the graph's previous outputs may be overwritten
                logits = step(self, cache, next_id, input_pos)  # (B, V)
                input_pos += 1
                filled += 1
            next_id = sample_next(logits, sampling, generator)  # (B, 1)
            if stop_token is not None:
                next_id = torch.where(done[:, None], stop_token, next_id)
                done |= next_id[:, 0] == stop_token
            out[:, t] = next_id[:, 0]
            if on_token is not None:
                on_token(next_id)
            if stop_token is not None and (t - prompt_len) % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 \
                    and bool(done.all()):
                break
        new = out[:, prompt_len:t + 1]  # (B, steps run)
        if stop_token is not None:  # cut after the step where the last row stopped (all of it if one never did)
            stops = new == stop_token
            lengths = torch.where(stops.any(dim=1), stops.int().argmax(dim=1) + 1, new.size(1))
            new = new[:, :int(lengths.max())]
        return torch.cat([idx, new], dim=1)

    def _decode_cache(self, batch_size: int, keep: bool) -> KVCache:
        """A KVCache of block_size slots in the dtype the activations have (autocast's, if on). With keep, the
        model holds on to it for later calls of the same shape: a CUDA graph recorded on its addresses replays
        only as long as they stay the same."""
        device = self.wte.weight.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
            else self.wte.weight.dtype
        kept = getattr(self, "kept_decode_cache", None)
        if keep and kept is not None and kept.matches(batch_size, self.config.block_size, device, dtype):
            return kept
        cache = KVCache(self.config, batch_size, self.config.block_size, device, dtype)
        if keep:
            self.kept_decode_cache = cache
        return cache


STOP_CHECK_EVERY = 16  # generate waits for the device to check for stop tokens once per this many tokens


def decode_step(model: GPT, cache: KVCache, idx, input_pos):
    """The logits (B, V) of one new token per row, idx (B, 1) at position input_pos (1,); its keys and values are
    written into the cache. Fixed shapes throughout, so one compiled graph serves every position."""
    return model(idx, cache=cache, input_pos=input_pos)[0][:, -1]


@functools.cache
def compiled_decode_step(device_type: str):
    """decode_step compiled once per process and device type: on CUDA into a CUDA graph (reduce-overhead), which
    replaces the step's hundreds of kernel launches from Python by one graph launch; elsewhere inductor's default."""
    return torch.compile(decode_step, mode="reduce-overhead" if device_type == "cuda" else None, fullgraph=True)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits x @ weight.T (x (N, C), weight (V, C)) over targets != IGNORE_INDEX, computed
    `chunk` rows at a time: each chunk's float32 logits give its loss terms and, in the same pass, its gradients
    (softmax - one-hot, over the count of counted targets) with respect to x and weight, and are freed. Backward
    only scales those by the incoming gradient. Under autocast the matmuls run in its dtype, as in the plain head.
    Memory: one chunk's logits instead of all N, plus the gradients of x and weight that backward needs anyway."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk: int, need_grad: bool):
        counted = targets != IGNORE_INDEX
        scale = 1.0 / counted.sum()  # inf when nothing counts: the loss is then nan, like F.cross_entropy's mean
        safe = torch.where(counted, targets, 0)  # an index to gather; its terms are zeroed below
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        for start in range(0, x.size(0), chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(x[rows], weight).float()  # (chunk, V)
            lse = logits.logsumexp(dim=-1)
            picked = logits.gather(1, safe[rows, None]).squeeze(1)
            loss = loss + torch.where(counted[rows], lse - picked, 0.0).sum()
            if need_grad:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad.scatter_add_(1, safe[rows, None], -torch.ones_like(grad[:, :1]))  # minus the one-hot target
                grad.mul_((counted[rows] * scale)[:, None])
                grad_x[rows] = F.linear(grad, weight.t())  # (chunk, C)
                grad_w += F.linear(grad.t(), x[rows].t())  # (V, C)
        if need_grad:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None


MIN_TEMPERATURE = 1e-4  # the lowest sampling temperature other than 0 (greedy): far below it, logits overflow


@dataclass(frozen=True)
class Sampling:
    """How generate picks each new token: greedy at temperature 0, else softmax(logits / temperature) cut to the
    top_k most likely tokens (0: no cut) and to the smallest set whose probability reaches top_p (1: no cut)."""
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def errors(self) -> dict[str, str]:
        """{setting: the rule its value breaks}; empty when every setting is in range."""
        rules = {"max_new_tokens": (self.max_new_tokens >= 1, "must be >= 1"),
                 # below MIN_TEMPERATURE, logits / temperature overflow float32: NaN probabilities
                 "temperature": (math.isfinite(self.temperature) and (self.temperature == 0
                                                                      or self.temperature >= MIN_TEMPERATURE),
                                 f"must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}"),
                 "top_k": (self.top_k >= 0, "must be >= 0 (0 = no top-k cut)"),
                 "top_p": (0 < self.top_p <= 1, "must be in (0, 1] (1 = no nucleus cut)")}
        return {name: rule for name, (ok, rule) in rules.items() if not ok}


def sample_next(logits, sampling: Sampling, generator: torch.Generator | None = None):
    """One token id per row from logits (B, V), as `sampling` says."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / sampling.temperature
    top_k, top_p = sampling.top_k, sampling.top_p
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # tokens past the nucleus (the top one always stays)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, V)
    # The draw of torch.multinomial(probs, 1, generator=generator), which is argmax(probs / E) for noise E ~ Exp(1)
    # from the generator, made here directly: multinomial first checks probs on the host, a sync per token.
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1, keepdim=True)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode (no dropout) inside the block and the model's previous mode after it, also after an error: for
    evaluations and samples taken from a model that is training."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
