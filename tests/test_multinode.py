"""Two nodes without a second machine: two torchrun agents on this host, one process each, meet through a c10d
rendezvous on localhost. They must train exactly like one 2-process --standalone run, only global rank 0 (node 0's
local rank 0) may write, and every node checks the data's sha256 once (its local rank 0)."""
import os
import shutil
import signal
import subprocess
import sys

from helpers import (NO_DROPOUT, ONE_THREAD, REPO, TINY, assert_same_weights, final_weights, free_port,
                     train_events)


def run_two_nodes(nodes: list[tuple], run_id: str, timeout: int = 400) -> list[subprocess.CompletedProcess]:
    """Start one torchrun agent per (data, out) in `nodes`, node i as 127.0.0.(i+1): c10d orders the nodes by
    address (--node_rank only applies to the static rendezvous), so node 0 gets global rank 0. Node 0 hosts the
    rendezvous store. Returns each agent's result; on a timeout every process of both agents is killed."""
    port = free_port()
    procs = []
    for i, (data, out) in enumerate(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(i),
               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", run_id, "--rdzv_conf", f"is_host={int(i == 0)}", "--local_addr", f"127.0.0.{i + 1}",
               "train.py", *TINY, *NO_DROPOUT, "--data", str(data), "--out", str(out)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                                   **ONE_THREAD}))
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return [subprocess.CompletedProcess(proc.args, proc.returncode, out) for proc, out in zip(procs, outputs)]


def test_two_nodes_train_like_one_two_process_run(embedded_data, ddp_run_without_dropout, tmp_path):
    """Node 1 gets its own copy of the data and its own --out, as a machine with its own disk would: it reads the
    same windows (global rank 1's) and must leave its --out untouched. Same ranks, world size, gloo all-reduce of
    two and thread count as the standalone run (conftest's, shared with test_train): losses, gradient norms and
    weights are bitwise equal."""
    single = ddp_run_without_dropout
    node1_data = tmp_path / "node1_data"
    shutil.copytree(embedded_data, node1_data)
    node0_out, node1_out = tmp_path / "node0_out", tmp_path / "node1_out"

    node0, node1 = run_two_nodes([(embedded_data, node0_out), (node1_data, node1_out)], run_id="multinode-train")

    assert node0.returncode == 0 and node1.returncode == 0, node0.stdout[-3000:] + node1.stdout[-3000:]
    ours, theirs = train_events(node0_out), train_events(single)
    assert [e["step"] for e in ours] == list(range(8))
    for a, b in zip(ours, theirs):
        assert (a["step"], a["loss"], a["grad_norm"], a["lr"]) == (b["step"], b["loss"], b["grad_norm"], b["lr"])
    assert_same_weights(final_weights(node0_out), final_weights(single))
    assert "processes: 2," in (node0_out / "train.log").read_text()  # one world of two, not two runs of one
    # Global rank 0 wrote the run; node 1's only process (local rank 0, global rank 1) wrote nothing and logged
    # nothing, and every line rank 0 logs (steps, the end) is on node 0's console.
    assert not node1_out.exists()
    assert "| loss" not in node1.stdout and "done:" not in node1.stdout
    assert "| loss" in node0.stdout and "done: 8 steps" in node0.stdout
    assert sorted(p.name for p in node0_out.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl",
                                                           "train.lock", "train.log"]


def test_every_node_verifies_its_own_data(embedded_data, tmp_path):
    """Node 1's copy of a train shard has one byte changed inside its tokens (header and size intact): only the
    sha256 check finds it, and node 1's local rank 0 (global rank 1) runs that check, so the run stops with that
    one-line error on node 1 instead of training on other tokens than node 0's manifest promises."""
    node1_data = tmp_path / "node1_data"
    shutil.copytree(embedded_data, node1_data)
    shard = sorted(node1_data.glob("*train*"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))

    node0, node1 = run_two_nodes([(embedded_data, tmp_path / "node0_out"), (node1_data, tmp_path / "node1_out")],
                                 run_id="multinode-verify")

    assert node1.returncode != 0 and node0.returncode != 0
    assert "sha256" in node1.stdout and shard.name in node1.stdout, node1.stdout[-3000:]
    assert not any(f.name == "step_000008.pt" for f in (tmp_path / "node0_out").rglob("*"))
