"""memory_estimate.py: memory per GPU, DDP vs FSDP, against counts by hand."""
import json
import subprocess

import pytest

from conftest import run_script
from helpers import assert_one_line_error


def test_figures_against_hand_counts(tmp_path):
    """The estimate for the debug model (C 128, 4 layers, 4 heads, SwiGLU hidden 512, vocab 50257) at 16 x 128 on
    8 GPUs: parameter bytes and FSDP shards against counts by hand, the bytes autograd saves against a list of what
    the model's code keeps for backward (one storage once), and checkpointing saving activations."""
    out = tmp_path / "memory.json"
    run_script("memory_estimate.py", "--configs", "debug", "--micro-batch", "16", "--seq-len", "128",
               "--gpus", "8", "--out", out, check=True)
    r = json.loads(out.read_text())["configs"]["debug"]
    C, h, H, D, V, L, T, B, G = 128, 512, 4, 32, 50257, 4, 128, 16, 8
    block = (C * 3 * C + 3 * C) + (C * C + C) + (C * 2 * h + 2 * h) + (h * C + C) + 2 * C  # weights, biases, norms
    root = V * C + C  # embedding (= tied head) and the final norm
    total = L * block + root
    assert total == 7_489_280 == r["parameters"]
    shard = -(-V // G) * C + (total - V * C) // G  # every other dim 0 divides by 8; the embedding's rows round up
    ddp, ddp_ac, fsdp, fsdp_ac = (r["per_gpu"][k] for k in ("ddp", "ddp_ac", "fsdp", "fsdp_ac"))
    assert (ddp["weights"], ddp["gradients"], ddp["adamw"]) == (4 * total, 8 * total, 8 * total)  # grads + buckets
    assert fsdp["weights"] == 4 * shard + 2 * (root + 2 * block)  # fp32 shard + bf16 root and two blocks
    assert fsdp["gradients"] == 4 * shard + 4 * (root + block) and fsdp["adamw"] == 8 * shard

    # Saved per token by one block under bf16 autocast (fp32 residual stream, bf16 matmuls, preset dropout on):
    # norm1: input, rsqrt, normalized (fp32), its bf16 cast; rotated q and k, the fused qkv output (v is a view of
    # it), logsumexp per head (the flash-style kernel keeps no T x T matrix), attention output, dropout mask (bf16 on
    # CPU); residual, norm2 as norm1; FFN input projection output, SiLU output, dropout mask, masked product.
    per_token = (C * 4 + 4 + C * 4 + C * 2 + 2 * C * 2 + 3 * C * 2 + H * 4 + C * 2 + C * 2
                 + C * 4 + 4 + C * 4 + C * 2 + 2 * h * 2 + h * 2 + h * 2 + h * 2)
    rope_casts = 4 * T * D * 2  # cos and sin cast to bf16, for q and for k
    m = r["measured_at_batch_1"]
    assert m["block"]["activations"] == T * per_token + rope_casts
    assert m["block"]["weight_copies"] == 2 * (3 * C * C + C * C + 2 * h * C + h * C)  # bf16 casts of the matrices
    # Head: token ids and targets (int64), embedding output, final norm's rsqrt and output, its bf16 cast, the fp32
    # log-softmax over the vocabulary, the loss's scalar; the tied head's bf16 weight copy.
    assert m["head"]["activations"] == T * (8 + 8 + C * 4 + 4 + C * 4 + C * 2 + V * 4) + 4
    assert m["head"]["weight_copies"] == 2 * V * C
    assert m["block_input"] == T * C * 4
    assert m["attention_saves"] == {"ScaledDotProductFlashAttentionForCpuBackward0":
                                    ["key", "logsumexp", "output", "query", "value"]}
    act, copies, head = m["block"]["activations"], m["block"]["weight_copies"], m["head"]["activations"]
    assert fsdp["activations"] == B * (L * act + head)
    assert ddp["activations"] == B * (L * (act + copies) + head + 2 * V * C)
    assert fsdp_ac["activations"] == B * (L * T * C * 4 + act - T * C * 4 + head)
    assert fsdp_ac["activations"] < fsdp["activations"] and ddp_ac["activations"] < ddp["activations"]
    for row in r["per_gpu"].values():
        assert row["total"] == row["weights"] + row["gradients"] + row["adamw"] + row["activations"]


# --- bad flags: every one named, in one line, before anything is measured or written -------------------------------

BAD_FLAGS = {"--configs": ["debug,nope", "nope,debug,nope2"], "--micro-batch": ["0", "-2"], "--seq-len": ["0", "129"],
             "--gpus": ["0", "-1"], "--gpu-gib": ["0", "-1", "nan", "inf"]}  # --seq-len 129: past debug's 128


def bad_flag_combinations() -> list[list[str]]:
    """Every non-empty set of the flags, each given a bad value (the values taking turns); --configs always holds
    debug, whose context --seq-len 129 is past."""
    import itertools
    flags, cases = list(BAD_FLAGS), []
    for size in range(1, len(flags) + 1):
        for i, chosen in enumerate(itertools.combinations(flags, size)):
            cases.append([part for flag in chosen for part in (flag, BAD_FLAGS[flag][i % len(BAD_FLAGS[flag])])])
    return cases


@pytest.mark.parametrize("bad", bad_flag_combinations(), ids=" ".join)
def test_every_bad_flag_is_named_in_one_line_and_nothing_is_written(bad, tmp_path, capsys):
    """(It named only the first, without its value, and made --out's folder first.)"""
    import memory_estimate
    out = tmp_path / "new" / "memory.json"
    argv = ["--configs", "debug", *bad, "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        memory_estimate.main(argv)
    err = capsys.readouterr().err
    line = assert_one_line_error(subprocess.CompletedProcess(argv, exit_info.value.code, "", err), status=2,
                                 alone=True)
    for flag, value in zip(bad[::2], bad[1::2]):
        assert f"{flag} {float(value) if flag == '--gpu-gib' else value}" in line or f"{flag} {value!r}" in line, line
    assert not (tmp_path / "new").exists()


def test_an_out_whose_folder_takes_no_file_is_named_with_the_bad_flags(tmp_path, capsys):
    import memory_estimate
    (tmp_path / "a_file").write_text("x")
    argv = ["--configs", "nope", "--out", str(tmp_path / "a_file" / "memory.json")]
    with pytest.raises(SystemExit) as exit_info:
        memory_estimate.main(argv)
    assert_one_line_error(subprocess.CompletedProcess(argv, exit_info.value.code, "", capsys.readouterr().err),
                          "--configs 'nope'", f"--out's folder {tmp_path / 'a_file'} is not writable", status=2,
                          alone=True)
