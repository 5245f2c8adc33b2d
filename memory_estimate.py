"""Memory per GPU of training a preset: weights, gradients, AdamW state and activations, DDP vs FSDP, each with and
without activation checkpointing, computed from the model rather than typed in.

  python memory_estimate.py [--configs lf_llm_269m,lf_llm_1b] [--micro-batch 16] [--seq-len 2048] [--gpus 8]

Parameter bytes come from the model's own parameters (built on the meta device); activation bytes are the tensors
autograd saves for backward in a real training forward (CPU, bf16 autocast, train mode with the preset's dropout) of
the embedding + head + loss alone and with one block, at batch 1, scaled by the micro-batch and the blocks. Prints a
table and, with --out FILE, writes the figures as JSON.
"""
import argparse
import cli
import dataclasses

import torch

from cli import UserError, check_result_out, hardware_name, main_entry, path_arg, raise_all, run_and_write_result
from model import GPT, PRESETS, GPTConfig

WRITTEN_BY = "memory_estimate.py"  # the marker of its --out results (cli.write_json): it replaces only those


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="lf_llm_269m,lf_llm_1b",
                        help="model presets, comma-separated (default: lf_llm_269m,lf_llm_1b)")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per GPU (default: 16)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default: 2048)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs that FSDP shards over (default: 8)")
    parser.add_argument("--gpu-gib", type=float, default=80, help="memory per GPU in GiB (default: 80)")
    parser.add_argument("--out", type=path_arg, help="write the figures as JSON to this file")
    return parser.parse_args(argv)


def cast_of_parameter(t) -> bool:
    """Whether saved tensor t is autocast's bf16 copy of a parameter (maybe transposed): going back through its
    autograd history, only casts and transposes lead to a parameter."""
    fn = t.grad_fn
    while fn is not None and fn.name() in ("ToCopyBackward0", "TBackward0", "TransposeBackward0"):
        fn = fn.next_functions[0][0]
    return t.grad_fn is not None and fn is not None and fn.name() == "torch::autograd::AccumulateGrad"


def saved_tensor_bytes(model, idx, targets) -> tuple[dict, object]:
    """Bytes that autograd keeps for backward after model(idx, targets) under bf16 autocast, each storage once:
    'weight_copies' (autocast's bf16 casts of parameters, saved by the matmuls) and 'activations' (the rest). The
    fp32 parameters themselves are weights, not counted. Also returns the loss (its graph holds what was saved)."""
    seen, sizes = set(), {"activations": 0, "weight_copies": 0}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and not (t.requires_grad and t.grad_fn is None):
            seen.add(storage.data_ptr())
            sizes["weight_copies" if cast_of_parameter(t) else "activations"] += storage.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, targets)
    return sizes, loss


def attention_saves(loss) -> dict:
    """{attention backward node: names of the tensors it saved}, found by walking the loss's autograd graph."""
    found, stack, seen = {}, [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "Attention" in fn.name():
            found[fn.name()] = sorted(a[len("_saved_"):] for a in dir(fn)
                                      if a.startswith("_saved_") and isinstance(getattr(fn, a), torch.Tensor))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def model_with_blocks(cfg, n_layer: int):
    """The preset's shape with n_layer blocks, on CPU in train mode (random weights: memory does not depend on
    their values; built on meta first because the init scheme divides by the number of blocks)."""

    with torch.device("meta"):
        model = GPT(dataclasses.replace(cfg, n_layer=n_layer))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.reset_rope_tables()
    return model.train()


def measure_activations(cfg, seq_len: int) -> dict:
    """Saved bytes at batch 1 of the embedding + final norm + tied head + loss ('head'), of one block (the model
    with one block minus the head part), and of a block's input (what activation checkpointing keeps per block)."""
    gen = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, cfg.vocab_size, (1, seq_len), generator=gen) for _ in range(2))
    head, _ = saved_tensor_bytes(model_with_blocks(cfg, 0), idx, targets)
    model = model_with_blocks(cfg, 1)
    block_inputs = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: block_inputs.append(args[0].nbytes))
    one, loss = saved_tensor_bytes(model, idx, targets)
    return {"head": head, "block": {k: one[k] - head[k] for k in one}, "block_input": block_inputs[0],
            "attention_saves": attention_saves(loss)}


def fsdp_shard_numel(params, gpus: int) -> int:
    """Elements one GPU holds when every parameter is split along dim 0 into `gpus` chunks (FSDP2's fully_shard;
    the last chunks are padded up to the first's size, so this is what every rank allocates)."""
    return sum(-(-p.shape[0] // gpus) * (p.numel() // p.shape[0]) for p in params)


def memory_per_gpu(model, acts: dict, micro_batch: int, gpus: int) -> dict:
    """Bytes per GPU of each part, for DDP and FSDP, without and with activation checkpointing ('_ac').

    DDP: fp32 weights, fp32 .grad plus DDP's fp32 gradient buckets (a second copy: train.py does not pass
    gradient_as_bucket_view), AdamW's exp_avg and exp_avg_sq in fp32, and the saved activations including autocast's
    bf16 weight copies. FSDP (fully_shard per block and on the root, bf16 compute, fp32 master weights): weights,
    gradients and AdamW state sharded over the GPUs, plus the unsharded bf16 parameters of the root (embedding =
    tied head, all-gathered for the whole step) and of two blocks (the running one and the prefetched next), plus the
    unsharded gradients of the root and of one block before their reduce-scatter, counted in fp32. The bf16
    parameters are what the matmuls save, and they are freed after each block's forward: no weight copies in the
    activations. With checkpointing, each block keeps its input and one block's internals are live during its
    recompute in backward."""
    params = list(model.parameters())
    total, block = sum(p.numel() for p in params), sum(p.numel() for p in model.blocks[0].parameters())
    root, n_layer, B = total - model.config.n_layer * block, model.config.n_layer, micro_batch
    head, blk, x_in = acts["head"], acts["block"], acts["block_input"]
    head_act, block_act = head["activations"], blk["activations"]
    copies = n_layer * blk["weight_copies"] + head["weight_copies"]
    recompute = block_act - x_in  # one block's internals besides the input it already keeps
    shard = fsdp_shard_numel(params, gpus)
    ddp = {"weights": 4 * total, "gradients": 8 * total, "adamw": 8 * total}
    fsdp = {"weights": 4 * shard + 2 * (root + 2 * block), "gradients": 4 * shard + 4 * (root + block),
            "adamw": 8 * shard}
    activations = {
        "ddp": B * (n_layer * block_act + head_act) + B * copies,
        "ddp_ac": B * (n_layer * x_in + recompute + head_act) + B * (blk["weight_copies"] + head["weight_copies"]),
        "fsdp": B * (n_layer * block_act + head_act),
        "fsdp_ac": B * (n_layer * x_in + recompute + head_act),
    }
    return {name: {**(ddp if name.startswith("ddp") else fsdp), "activations": act,
                   "total": sum((ddp if name.startswith("ddp") else fsdp).values()) + act}
            for name, act in activations.items()}


def check_flags(args) -> None:
    """Every flag value that cannot work, all in one line, before anything is measured or written."""
    names = args.configs.split(",")
    unknown = [name for name in names if name not in PRESETS]
    problems = [f"--configs {args.configs!r}: unknown {', '.join(map(repr, unknown))}; valid presets are "
                f"{', '.join(PRESETS)}"] if unknown else []
    problems += [f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1"
                 for name in ("micro_batch", "seq_len", "gpus") if getattr(args, name) < 1]
    if not 0 < args.gpu_gib < float("inf"):
        problems.append(f"--gpu-gib {args.gpu_gib}: must be a finite number > 0")
    longer = [f"{name}'s context ({PRESETS[name].block_size})" for name in dict.fromkeys(names)
              if name in PRESETS and args.seq_len > PRESETS[name].block_size]
    if longer:
        problems.append(f"--seq-len {args.seq_len}: longer than {', '.join(longer)}; lower it")
    if problems:
        raise UserError("; ".join(problems))


def estimate(args) -> dict:
    names = args.configs.split(",")
    budget = args.gpu_gib * 2 ** 30
    result = {"micro_batch": args.micro_batch, "seq_len": args.seq_len, "gpus": args.gpus, "gpu_gib": args.gpu_gib,
              "torch": torch.__version__, "measured_on": hardware_name(torch.device("cpu")), "configs": {}}
    labels = {"ddp": "DDP", "ddp_ac": "DDP + activation ckpt", "fsdp": f"FSDP over {args.gpus}",
              "fsdp_ac": f"FSDP over {args.gpus} + activation ckpt"}
    for name in names:
        cfg = GPTConfig.from_preset(name)
        with torch.device("meta"):
            model = GPT(cfg)
        acts = measure_activations(cfg, args.seq_len)
        table = memory_per_gpu(model, acts, args.micro_batch, args.gpus)
        result["configs"][name] = {"parameters": model.num_params(), "measured_at_batch_1": acts, "per_gpu": table,
                                   "model_config": dataclasses.asdict(cfg)}
        print(f"\n{name}: {model.num_params():,} parameters, micro-batch {args.micro_batch} x {args.seq_len}, "
              f"{args.gpus} GPUs x {args.gpu_gib:g} GiB; GiB per GPU")
        print(f"{'':<32}{'weights':>9}{'grads':>9}{'AdamW':>9}{'activ.':>9}{'total':>9}  fits")
        for key, row in table.items():
            cells = "".join(f"{row[k] / 2 ** 30:>9.2f}" for k in ("weights", "gradients", "adamw", "activations",
                                                                    "total"))
            print(f"{labels[key]:<32}{cells}  {'yes' if row['total'] <= budget else 'no'}")
        for node, saved in acts["attention_saves"].items():
            print(f"attention: {node} saves {', '.join(saved)}")
    print("\nNot counted: the CUDA context and allocator slack, the step's transient buffers (e.g. the logits' "
          "gradient in backward, as large as the saved fp32 log-softmax), and FSDP's bf16 inputs to blocks (its "
          "mixed precision casts them; here the residual stream is measured in fp32 as autocast keeps it).")
    return result


@main_entry(memory_hint="try a lower --seq-len (activations are measured at one sequence of that length)")
def main(argv=None):
    args = parse_args(argv)
    raise_all(lambda: check_flags(args), lambda: args.out and check_result_out(args.out, WRITTEN_BY))  # one line
    run_and_write_result(estimate, args, WRITTEN_BY)


if __name__ == "__main__":
    main()
