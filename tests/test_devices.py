"""devices.py: the Dist collectives on 2 gloo processes (joined through init_distributed, as torchrun's workers
do), the GPU each torchrun process takes, and the per-attempt rendezvous store. CPU only: CUDA is faked where the
choice of GPU is checked."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import devices
from cli import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collectives_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    d, device = devices.init_distributed("cpu")
    try:
        result = {
            "dist": [d.rank, d.local_rank, d.world_size, d.is_main], "device": str(device),
            "gather": d.gather({"rank": rank}),
            "any_one": d.any(rank == world - 1), "any_none": d.any(False), "any_all": d.any(True),
            "mean": d.mean(local := torch.tensor([rank + 1.0, 10.0])).tolist(),
            "mean_input_after": local.tolist(),  # the caller's tensor is left as it was
        }
        d.barrier()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_dist_collectives_on_two_processes(tmp_path):
    mp.spawn(collectives_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["dist"] == [rank, rank, 2, rank == 0] and result["device"] == "cpu"
        assert result["gather"] == [{"rank": 0}, {"rank": 1}]
        assert (result["any_one"], result["any_none"], result["any_all"]) == (True, False, True)
        assert result["mean"] == [1.5, 10.0]  # the mean over ranks, not the sum
        assert result["mean_input_after"] == [rank + 1.0, 10.0]


def test_one_process_collectives_are_the_identity():
    d = devices.Dist()
    value = torch.tensor([3.0])
    assert d.gather("x") == ["x"] and d.any(True) and not d.any(False) and d.mean(value) is value and d.is_main


@pytest.fixture
def four_fake_gpus(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_each_torchrun_process_takes_its_local_rank_gpu(four_fake_gpus):
    assert devices.pick_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert devices.pick_device(None, local_rank=2) == torch.device("cuda", 2)  # the best available: CUDA
    assert devices.pick_device("cuda:1", local_rank=3) == torch.device("cuda", 1)  # an explicit GPU wins
    assert four_fake_gpus == [torch.device("cuda", 3), torch.device("cuda", 2), torch.device("cuda", 1)]
    with pytest.raises(UserError, match="4 GPU"):
        devices.pick_device("cuda", local_rank=4)
    assert devices.pick_device("cpu", local_rank=3) == torch.device("cpu")


def test_each_restart_attempt_has_its_own_store_keys(monkeypatch):
    """torchrun's agent store outlives a restart of the worker group: a restarted rank must not read the keys the
    dead group left there (it would try to connect to dead processes)."""
    port = free_port()
    agent = dist.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # connect to the agent's store as a client
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = devices.attempt_store(devices.Dist(0, 0, 2))
    first.set("rank0_address", "dead process")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = devices.attempt_store(devices.Dist(0, 0, 2))
    assert not second.check(["rank0_address"])
    second.set("rank0_address", "live process")
    assert first.get("rank0_address") == b"dead process" and second.get("rank0_address") == b"live process"
    del agent


# --- how a torchrun worker exits ------------------------------------------------------------------------------------

EXIT_SCRIPT = """
import atexit, os, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
sys.path.insert(0, {repo!r})
from devices import exit_with
out = Path({out!r})

class Finalized:  # what it needs is bound now: finalization clears module globals in an order of its own
    def __del__(self, path=str(out / "finalized"), os_open=os.open, close=os.close, flags=os.O_CREAT | os.O_WRONLY):
        close(os_open(path, flags))

kept = Finalized()  # a module global: Python's finalization deletes it, an exit that skips finalization does not
pool = ThreadPoolExecutor(2)  # kept, with idle workers (as torch.compile's inductor keeps one): they end at exit
atexit.register(lambda: (out / "atexit").touch())

def main():
    threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").touch())).start()
    pool.submit(lambda: None).result()
    print("printed", end="")  # no newline: still in the buffer at exit
    return {status}
exit_with(main)
"""


EXIT_STATUSES = ["None", "3", "'a message'", "sys.exit(4)"]


def run_exit_script(out, status: str, torchrun: bool):
    """EXIT_SCRIPT returning `status`, as a torchrun worker (RANK set) or not, writing into the folder `out`."""
    import subprocess
    import sys
    script = out / "script.py"
    script.write_text(EXIT_SCRIPT.format(repo=os.path.dirname(devices.__file__), out=str(out), status=status))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "PYTHONUNBUFFERED")}  # stdout: a buffered pipe
    env |= {"RANK": "0"} if torchrun else {}
    try:
        return subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired as e:  # a hang at exit fails its own case, not the fixture of every case
        return subprocess.CompletedProcess(e.cmd, None, "", f"timed out after {e.timeout} s")


@pytest.fixture(scope="module")
def exits(tmp_path_factory):
    """{(status, torchrun): (the exit script's finished process, its folder)} for every case, two processes at a time
    (each is mostly a fresh interpreter importing torch, on one core)."""
    from concurrent.futures import ThreadPoolExecutor
    cases = [(status, torchrun) for status in EXIT_STATUSES for torchrun in (True, False)]
    folders = [tmp_path_factory.mktemp("exit") for _ in cases]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(run_exit_script, folders, *zip(*cases)))
    return dict(zip(cases, zip(procs, folders)))


@pytest.mark.parametrize("status", EXIT_STATUSES)
@pytest.mark.parametrize("torchrun", [True, False])
def test_a_torchrun_worker_exits_without_finalizing_but_with_its_status_output_threads_and_atexit(exits, status,
                                                                                                  torchrun):
    """Under torchrun a gloo worker thread can still release the last collective's tensors while Python finalizes,
    and its taking the GIL then aborts a run that succeeded (exit -6, seen in CI after FSDP and DDP runs): a worker
    ends with os._exit instead. Nothing else may change: the exit status, the message, buffered output, a running
    thread and atexit handlers are those of sys.exit(main()), and a kept ThreadPoolExecutor's idle workers do not
    hold the exit up (joined before threading's exit hooks ended them, they hung a compiled DDP run in CI)."""
    proc, folder = exits[(status, torchrun)]
    expected = {"None": 0, "3": 3, "'a message'": 1, "sys.exit(4)": 4}[status]
    assert proc.returncode == expected, proc.stderr
    assert proc.stdout == "printed"
    assert ("a message" in proc.stderr) == (status == "'a message'")
    assert (folder / "thread").exists() and (folder / "atexit").exists()
    assert (folder / "finalized").exists() != torchrun


def test_a_device_this_machine_lacks_is_refused_without_starting_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flag, message in (("mps", "--device mps: no Apple MPS device"), ("cuda", "--device cuda: no CUDA device"),
                          ("cuda:1", "--device cuda:1: no CUDA device"), ("tpu", "--device 'tpu': use cuda, mps")):
        with pytest.raises(UserError, match=message):
            devices.checked_device(flag)
    assert devices.checked_device(None) == torch.device("cpu")  # the best available
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.checked_device("mps") == devices.checked_device(None) == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("checked_device made a GPU current"))
    assert devices.checked_device("cuda:1") == torch.device("cuda", 1)


# Every tool that takes --device, given inputs that are fine and a device this machine lacks: one line naming the
# device before any work, nothing written ({out}: a path in a folder that does not exist yet).
DEVICE_TOOLS = [("train.py", "--config", "debug", "--data", "{data}", "--out", "{out}"),
                ("generate.py", "--checkpoint", "{ckpt}"),
                ("hellaswag_eval.py", "--checkpoint", "{ckpt}", "--data", "assets/hellaswag/hellaswag_val_head10.jsonl",
                 "--out", "{out}/result.json"),
                ("bench.py", "generate", "--out", "{out}/result.json"),
                ("bench.py", "train", "--data", "{data}", "--out", "{out}/result.json"),
                ("bench.py", "gpu", "--out", "{out}/gpu.json")]


@pytest.mark.skipif(torch.backends.mps.is_available() or torch.cuda.is_available(), reason="needs a CPU-only machine")
def test_every_tool_refuses_a_missing_device_in_one_line_before_work(tmp_path, embedded_data):
    """Each tool's main in this process: refused before any work, a run costs milliseconds where a fresh interpreter
    costs seconds of importing torch."""
    from helpers import assert_one_line_error, run_main, save_tiny_checkpoint
    ckpt = tmp_path / "tiny.pt"
    save_tiny_checkpoint(ckpt)
    cases = [(tool, device) for tool in DEVICE_TOOLS for device in ("mps", "cuda")]
    for i, (tool, device) in enumerate(cases):
        proc = run_main(*[arg.format(out=tmp_path / f"out{i}", data=embedded_data, ckpt=ckpt) for arg in tool],
                        "--device", device)
        assert_one_line_error(proc, f"--device {device}: no ", status=2, alone=True)
        assert not (tmp_path / f"out{i}").exists(), (tool, device)
