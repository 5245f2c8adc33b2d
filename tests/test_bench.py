"""bench.py: every mode runs and reports its fields; the compiled training step computes what the eager one does."""
import json

import pytest
import torch

from helpers import assert_one_line_error, host_syncs_in_run, run_main

# Each mode runs as bench.py's main in this process (helpers.run_main), without a fresh interpreter importing torch
# for each; bench.py gpu still starts a process per row.
TINY_TRAIN = ["train", "--config", "debug", "--micro-batch", "2", "--seq-len", "32", "--steps", "2", "--warmup", "1"]


# Training FLOPs per token of the debug model (C 128, 4 layers, SwiGLU hidden 512) at 32 tokens, counted by hand:
# 6 x (per layer: QKV 128x384 + out 128x128 + FFN in 128x1024 + FFN out 512x128; tied head 50257x128)
# + 12 x layers x C x T for the attention scores.
DEBUG_FLOPS_PER_TOKEN_AT_32 = (6 * (4 * (128 * 384 + 128 * 128 + 128 * 1024 + 512 * 128) + 50257 * 128)
                               + 12 * 4 * 128 * 32)


def test_train_mode_reports_throughput_fields(embedded_data, tmp_path):
    import time
    out = tmp_path / "train.json"
    start = time.perf_counter()
    run_main("bench.py", *TINY_TRAIN, "--total-batch-tokens", "128", "--data", embedded_data, "--no-compile",
             "--peak-flops", "1e12", "--out", out, check=True)  # 128 tokens: 2 micro-batches of 2 x 32 a step
    wall = time.perf_counter() - start  # the whole run: more than the 2 timed steps it contains
    result = json.loads(out.read_text())
    for key in ("tokens_per_s", "step_ms", "mfu", "peak_memory_bytes", "loader_fraction", "device"):
        assert key in result, key
    assert result["device"].startswith("cpu") and result["peak_memory_bytes"] is None  # CUDA-only figure
    assert result["tokens_per_step"] == 2 * 32 * 2 and result["accum"] == 2
    # bounds from the clock outside: a wrong unit or a figure from the wrong span would cross them
    assert 0 < 2 * result["step_ms"] / 1000 < wall and result["tokens_per_s"] > 2 * 128 / wall
    assert result["flops_per_token"] == DEBUG_FLOPS_PER_TOKEN_AT_32
    assert result["mfu"] == pytest.approx(DEBUG_FLOPS_PER_TOKEN_AT_32 * result["tokens_per_s"] / 1e12)
    assert 0 < result["loader_fraction"] < 1
    assert result["step_ms_min"] <= result["step_ms"] <= result["step_ms_max"]
    row = result["benchmarks_md_row"].strip("| ").split(" | ")  # pasted into BENCHMARKS.md's table as it is
    assert len(row) == 9 and row[1] == result["device"] and row[3].startswith("`train --config debug")
    assert "--out" not in row[3] and "--no-compile" in row[3]
    assert row[4] == f"{result['tokens_per_s']:,.0f}" and row[6] == f"{result['mfu']:.1%}"


def test_compiled_step_matches_eager_step(embedded_data, tmp_path):
    """torch.compile must not change what a training step computes (float32 on CPU; dropout off, since compiled
    dropout draws its masks differently), and compiles once."""
    from devices import Dist
    from train import TrainConfig, Trainer
    losses, norms = {}, {}
    for compiled in (False, True):
        cfg = TrainConfig.from_preset("debug", data=str(embedded_data), out=str(tmp_path / f"run{compiled}"),
                                      micro_batch="2", seq_len=32, total_batch_tokens=128, compile=compiled,
                                      attn_dropout=0.0, ffn_dropout=0.0)
        trainer = Trainer(cfg, "debug", Dist(), torch.device("cpu"))
        torch._dynamo.utils.counters.clear()
        steps = [trainer.train_step() for _ in range(3)]
        if compiled:  # compiled once, at the first step; later steps reuse it (no recompilation)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        losses[compiled] = torch.stack([loss for loss, _ in steps])
        norms[compiled] = torch.stack([norm for _, norm in steps])
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(norms[True], norms[False], rtol=1e-3, atol=1e-4)
    assert losses[False][2] < losses[False][0]  # the steps did train


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_training_forward_compiles_to_one_graph(checkpointing):
    """A graph break would split the compiled step and leave the pieces between graphs in eager mode (slower on GPU)."""
    from model import GPT, GPTConfig
    model = GPT(GPTConfig.from_preset("debug"))
    if checkpointing:
        model.enable_activation_checkpointing()
    idx = torch.zeros((2, 32), dtype=torch.long)
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    if checkpointing:  # a block dynamo cannot trace runs eagerly beside the graph, without a break being reported
        nodes = explanation.graphs[0].graph.nodes
        assert sum("checkpoint" in str(n.target) for n in nodes if n.op == "call_function") == model.config.n_layer


def test_generate_mode_compares_cache_with_recompute(tmp_path):
    """Both paths decode the same greedy continuation; --profile profiles one more KV-cache run of --new-tokens
    tokens and sets its operator time per token beside the timed wall time per token."""
    out = tmp_path / "gen.json"
    proc = run_main("bench.py", "generate", "--new-tokens", "8", "--repeats", "1", "--profile", "--out", out,
                    check=True)
    result = json.loads(out.read_text())
    assert result["kv_cache_tokens_per_s"] > 0 and result["recompute_tokens_per_s"] > 0
    assert result["same_tokens"] is True
    assert "cudagraph_skips" not in result  # a CUDA-graph figure only
    profile = result["profile"]
    assert profile["unit"] == "CPU operator self time" and 0 < len(profile["top"]) <= 20
    assert profile["ms_per_token"] == pytest.approx(profile["total_ms"] / 8)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in profile["attention"]
    assert profile["per_token"].endswith("(profiled run)") and profile["per_token"] in proc.stdout  # no share: CPU


def test_the_generation_profile_gives_the_gpus_share_of_a_token():
    from bench import generation_profile_line
    result = {"profile": {"ms_per_token": 0.3, "unit": "GPU kernel self time"}, "ms_per_token": {"kv_cache": 0.86}}
    assert generation_profile_line(result) == ("KV cache per token: 0.860 ms wall (timed), 0.300 ms of GPU kernel self "
                                               "time (profiled run): 35%")


@pytest.mark.parametrize("flags, said", [
    (["--block-size", "2"], ["--block-size 2: shorter than the 3-token prompt; give >= 3"]),
    (["--peer", "--block-size", "16", "--new-tokens", "30"], ["--peer with --block-size 16", ">= 33"]),
    (["--block-size", "2", "--device", "tpu"], ["--block-size 2: shorter", "--device 'tpu'"]),
], ids=["prompt", "peer-window", "both"])
def test_generate_mode_refuses_a_context_the_comparison_does_not_fit(flags, said, tmp_path):
    proc = run_main("bench.py", "generate", *flags, "--out", tmp_path / "out" / "gen.json")
    assert_one_line_error(proc, *said, status=2, alone=True)
    assert not (tmp_path / "out").exists()


def test_bad_flag_values_are_one_line_errors(embedded_data):
    proc = run_main("bench.py", *TINY_TRAIN, "--data", embedded_data, "--micro-batch", "lots")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--micro-batch" in proc.stderr
    proc = run_main("bench.py", "train", "--config", "debug", "--data", "/nonexistent/data")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "data_prep.py" in proc.stderr


@pytest.mark.parametrize("flags, named", [(["--resume"], "--resume: "),
                                          (["--allow-fresh-start"], "--allow-fresh-start: "),
                                          (["--resume", "--allow-token-batch-change"],
                                           "--resume --allow-token-batch-change: ")])
def test_train_mode_refuses_a_resume_it_has_no_run_for_with_its_other_flags(flags, named, embedded_data, capsys):
    """bench.py train --resume said 'no checkpoint in /tmp/tmpXXXX/checkpoints', a folder the user never named;
    --allow-fresh-start alone was told to add --resume, which bench.py refuses."""
    import bench
    import subprocess
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["train", "--config", "debug", "--data", str(embedded_data), *flags, "--warmup", "-1"])
    line = assert_one_line_error(subprocess.CompletedProcess([], exit_info.value.code, "", capsys.readouterr().err),
                                 "--warmup must be >= 0, got -1", status=2, alone=True)
    assert f"; {named}bench.py train runs in a temporary folder of its own" in line, line


def test_training_steps_do_not_wait_for_the_device_between_log_steps(embedded_data, tmp_path):
    """The syncs of the log step and checkpoint at the end are the same for 2 steps and for 6: a step that is not
    logged reads no tensor value back (which on CUDA would stall the queue of kernels)."""
    short = host_syncs_in_run(embedded_data, tmp_path / "short", steps=2)
    long = host_syncs_in_run(embedded_data, tmp_path / "long", steps=6)
    assert short > 0  # the counter does see the log step's reads (loss, grad norm, NaN check)
    assert long == short


# ----------------------------------------------------------------------------------------------------------------
# Training levers, the transformers peer and `bench.py gpu`

@pytest.mark.parametrize("pad_vocab_to", [1, 64])
def test_chunked_loss_equals_the_plain_loss_and_gradients(pad_vocab_to):
    """The chunked head + loss: the same loss and parameter gradients as the plain (B*T, V) logits (float32, CPU),
    with ignored targets, chunks that do not divide the rows (the last one short), padded vocab rows; no logits are
    returned and no-grad evaluation gives the same loss; compiled it stays one graph."""
    from model import GPT, IGNORE_INDEX, GPTConfig
    model = GPT(GPTConfig.from_preset("debug", pad_vocab_to=pad_vocab_to, attn_dropout=0.0, ffn_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, 50257, (3, 20), generator=gen) for _ in range(2))
    targets[0, :5] = IGNORE_INDEX
    grads = {}
    for chunk in (0, 7, 60):  # 0: plain; 7: 9 chunks, the last of 4 rows; 60: one chunk
        model.zero_grad()
        model.enable_chunked_loss(chunk)
        logits, loss = model(idx, targets)
        loss.backward()
        grads[chunk] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        if chunk:
            assert logits is None
            with torch.no_grad():
                torch.testing.assert_close(model(idx, targets)[1], loss.detach())
    for chunk in (7, 60):
        torch.testing.assert_close(grads[chunk][0], grads[0][0], rtol=1e-6, atol=1e-6)
        for name, grad in grads[0][1].items():
            torch.testing.assert_close(grads[chunk][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert grads[7][1]["wte.weight"][50257:].abs().sum() == 0  # padded rows get no gradient
    if pad_vocab_to > 1:
        return
    explanation = torch._dynamo.explain(model)(idx, targets)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def attention_ops(model, idx) -> set:
    with torch.profiler.profile() as prof:
        model(idx, idx)
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


def test_attention_backend_pins_the_sdpa_kernel_and_device_only_ones_are_refused(embedded_data, tmp_path):
    from cli import UserError
    from devices import Dist
    from model import GPT, GPTConfig
    from train import TrainConfig, Trainer
    model, idx = GPT(GPTConfig.from_preset("debug")).eval(), torch.zeros((1, 16), dtype=torch.long)
    model.set_attention_backend("math")
    assert "aten::_scaled_dot_product_attention_math" in attention_ops(model, idx)
    model.set_attention_backend("flash")
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in attention_ops(model, idx)
    for flags, message in ((dict(attn_backend="cudnn"), "--attn-backend cudnn is a CUDA kernel"),
                           (dict(fp8=True), "--fp8 needs a CUDA GPU of compute capability 8.9"),
                           (dict(attn_backend="fast"), "--attn-backend 'fast': choose auto, flash"),
                           (dict(loss_chunk_rows=-1), "--loss-chunk-rows -1: must be >= 0")):
        cfg = TrainConfig.from_preset("debug", data=str(embedded_data), out=str(tmp_path / "run"), **flags)
        with pytest.raises(UserError, match=message):
            Trainer(cfg, "debug", Dist(), torch.device("cpu"))


def test_train_mode_peer_and_profile(embedded_data, tmp_path):
    """--peer: transformers' Llama from the same weights sees the same batches: the same first loss; --profile:
    the top operators and the attention that ran; the levers are recorded."""
    out = tmp_path / "peer.json"
    run_main("bench.py", *TINY_TRAIN, "--total-batch-tokens", "64", "--data", embedded_data, "--no-compile",
             "--peer", "--profile", "--loss-chunk-rows", "16", "--attn-backend", "math", "--out", out, check=True)
    result = json.loads(out.read_text())
    peer = result["peer"]
    assert result["dropout"] == [0.0, 0.0] and result["loss_chunk_rows"] == 16 and result["attn_backend"] == "math"
    assert len(peer["losses"]) == len(result["losses"]) == 3 and peer["tokens_per_s"] > 0
    assert peer["losses"][0] == pytest.approx(result["losses"][0], abs=1e-4)  # same weights, same first batch
    assert result["peer_speedup"] == pytest.approx(result["tokens_per_s"] / peer["tokens_per_s"])
    profile = result["profile"]
    assert "aten::_scaled_dot_product_attention_math" in profile["attention"]
    assert 0 < len(profile["top"]) <= 20 and all(0 < e["share"] <= 1 for e in profile["top"])
    assert [e["ms"] for e in profile["top"]] == sorted((e["ms"] for e in profile["top"]), reverse=True)


def test_gpu_mode_rows_errors_skips_and_deadline(embedded_data, tmp_path):
    """bench.py gpu on the CPU (its dry run): rows run in order as subprocesses, a failing row is recorded with its
    one-line error and the rest go on, a row whose kernel the default row already ran is skipped; under a deadline
    a running row is killed at it and the others are recorded as skipped, and the JSON holds every row."""
    out = tmp_path / "gpu.json"
    proc = run_main("bench.py", "gpu", "--device", "cpu", "--config", "debug", "--data", embedded_data,
                    "--rows", "train_compiled,generate,attn_cudnn,attn_flash", "--steps", "1", "--warmup", "0",
                    "--deadline-s", "240", "--out", out, check=True)
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["train_compiled", "generate", "attn_cudnn", "attn_flash"]
    assert "generate: KV cache per token: " in proc.stdout  # the generate row is profiled and reported
    assert rows["train_compiled"]["status"] == "ok" and rows["train_compiled"]["result"]["tokens_per_s"] > 0
    assert rows["attn_cudnn"]["status"] == "error" and "is a CUDA kernel" in rows["attn_cudnn"]["error"]
    assert rows["attn_flash"]["status"] == "skipped" and "already ran flash" in rows["attn_flash"]["reason"]
    assert "train_compiled: | " in proc.stdout and "attn_cudnn: error: --attn-backend cudnn" in proc.stdout

    # a row still running at the deadline is killed ("timeout"; a deadline not honoured lets it finish "ok"); no
    # wall-clock bound is asserted: a busy machine may take any time to start the processes
    run_main("bench.py", "gpu", "--device", "cpu", "--config", "debug", "--rows", "train_eager,generate,fp8",
             "--deadline-s", "1", "--out", out, check=True)
    result = json.loads(out.read_text())
    assert [row["status"] for row in result["rows"]] == ["timeout", "skipped", "skipped"]
    assert result["data"] == "random tokens"
