"""Under `torchrun --nproc_per_node=2` (gloo, CPU), for tests/test_sharding.py:

  python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_probe_worker.py OUT

shards the debug model with sharding.shard_model and runs one forward and backward. Hooks on every leaf module
count, each time one runs, the parameter elements that are unsharded at that moment (FSDP2 keeps a sharded
parameter as a DTensor slice and swaps in the whole, plain tensor while its group is gathered), and which blocks are
gathered. Each rank writes OUT/probe_rank{r}.json with the peaks, the model's sizes and the per-block sizes.
"""
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sharding  # noqa: E402
from devices import exit_with  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

CONFIG = GPTConfig.from_preset("debug", vocab_size=1001, attn_dropout=0.0, ffn_dropout=0.0)


def unsharded(module, recurse=True) -> int:
    from torch.distributed.tensor import DTensor
    return sum(p.numel() for m in (module.modules() if recurse else [module])
               for p in m._parameters.values() if p is not None and not isinstance(p, DTensor))


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = GPT(CONFIG, seed=1)
    sizes = {"model": sum(p.numel() for p in model.parameters()),
             "blocks": [sum(p.numel() for p in b.parameters()) for b in model.blocks]}
    sizes["root"] = sizes["model"] - sum(sizes["blocks"])  # the embedding (and tied head) and the final norm
    sharding.shard_model(model, mixed_precision=False)
    at_rest = unsharded(model)
    seen = {"forward": [], "backward": []}

    def probe(phase):
        def hook(*_):
            gathered = [i for i, b in enumerate(model.blocks) if unsharded(b) > 0]
            seen[phase].append({"elements": unsharded(model), "blocks": gathered})
        return hook
    for module in model.modules():
        if not list(module.children()):
            module.register_forward_pre_hook(probe("forward"))
            module.register_forward_hook(probe("forward"))
            module.register_full_backward_pre_hook(probe("backward"))
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # the embedding's input: token ids
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 17), generator=gen)
    loss = model(tokens[:, :-1], tokens[:, 1:])[1]
    loss.backward()
    result = {"sizes": sizes, "at_rest": at_rest, "after_step": unsharded(model),
              **{f"{phase}_calls": len(calls) for phase, calls in seen.items()},
              **{f"{phase}_peak": max(c["elements"] for c in calls) for phase, calls in seen.items()},
              **{f"{phase}_most_blocks": max(len(c["blocks"]) for c in calls) for phase, calls in seen.items()}}
    (out / f"probe_rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    exit_with(lambda: main(Path(sys.argv[1])))
