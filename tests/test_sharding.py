"""sharding.shard_model's layout under FSDP2, measured while the model runs (2 gloo processes, CPU): one block's
parameters are gathered at a time, on top of the root's (the embedding/tied head and the final norm), so a forward
or backward never holds the whole model unsharded; at rest, and after the step, nothing is. The memory table of
BENCHMARKS.md relies on this per-block gathering; the at-rest byte counts of test_fsdp.py cannot see it."""
import json

import pytest

from helpers import REPO, run_script

TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_probe")
    run_script(*TORCHRUN_2, REPO / "tests" / "fsdp_probe_worker.py", out, env={"OMP_NUM_THREADS": "1"},
               check=True)
    return [json.loads((out / f"probe_rank{rank}.json").read_text()) for rank in range(2)]


def test_fsdp_gathers_one_block_at_a_time(probes):
    for probe in probes:
        sizes = probe["sizes"]
        assert len(sizes["blocks"]) >= 3 and probe["forward_calls"] > 0 and probe["backward_calls"] > 0
        assert probe["at_rest"] == 0 and probe["after_step"] == 0  # every parameter sharded outside the passes
        # forward: the root's parameters and exactly one block's, never two blocks
        assert probe["forward_most_blocks"] == 1, probe
        assert probe["forward_peak"] == sizes["root"] + max(sizes["blocks"]), probe
        # backward: one block, or two where the next block's gather is prefetched
        assert probe["backward_most_blocks"] in (1, 2), probe
        assert probe["backward_peak"] <= sizes["root"] + 2 * max(sizes["blocks"]) < sizes["model"], probe
