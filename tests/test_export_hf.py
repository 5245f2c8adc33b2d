"""export_hf.py: the transformers model computes what ours computes, the round trip is bitwise, bad input is one
line."""
import dataclasses
import gc
import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # set before transformers is imported: the export must load with no network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import export_hf
import tokenizer
from checkpoint import checkpoint_path, load_model, save_checkpoint
from helpers import assert_one_line_error
from model import GPT, GPTConfig, Sampling

EOT = tokenizer.EOT_ID
MARKER = "export_hf.json"  # the mark of an export (README): what --force may replace


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    """Our init, with biases and norm weights made random too (init has them at 0 and 1, where a swapped or
    missing bias would go unnoticed)."""
    model = GPT(config, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        model.wte.weight[config.vocab_size:].zero_()  # padded rows stay 0, as in training
    return model


def assert_transformers_matches(model: GPT, export_dir, n_tokens: int = 16, new_tokens: int = 20):
    hf = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    assert hf.dtype == torch.float32 and type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = model(ids)[0]
        theirs = hf(ids).logits
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-4
    ours_gen = model.generate(ids, Sampling(new_tokens, temperature=0))
    hf_gen = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                         pad_token_id=EOT)
    # transformers stops at <|endoftext|> (the export's EOS); ours runs on: compare up to where transformers stopped.
    assert hf_gen.size(1) == ids.size(1) + new_tokens or hf_gen[0, -1].item() == EOT
    assert torch.equal(hf_gen, ours_gen[:, :hf_gen.size(1)])
    del hf


def assert_round_trip(model: GPT, export_dir):
    config, state = export_hf.load_hf_dir(export_dir)
    assert config == model.config
    ours = model.state_dict()
    assert state.keys() == ours.keys()
    for name, tensor in ours.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


def test_norm_and_rope_match_llama_layers_over_the_whole_context():
    """The 16-token logits tests only reach the first positions; RoPE must agree up to block_size too."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    from model import RMSNorm, rope_tables
    config = GPTConfig.from_preset("lf_llm_269m")
    # the reference model's values, written out (not passed through export_hf): RMSNorm eps 1e-5, RoPE theta 10,000
    # over head dim 64, context 2048
    hf_config = LlamaConfig(hidden_size=1024, num_attention_heads=16, num_key_value_heads=16, rms_norm_eps=1e-5,
                            rope_theta=10000.0, max_position_embeddings=2048)
    x = torch.randn(2, 8, config.n_embd, generator=torch.Generator().manual_seed(0))
    ours, theirs = RMSNorm(config.n_embd, config.norm_eps), LlamaRMSNorm(config.n_embd, hf_config.rms_norm_eps)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
        assert (ours(x) - theirs(x)).abs().max().item() < 1e-6
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)  # (T, D)
        hf_cos, hf_sin = LlamaRotaryEmbedding(hf_config)(x, torch.arange(config.block_size)[None])  # (1, T, D)
    assert (cos - hf_cos[0]).abs().max().item() < 1e-4 and (sin - hf_sin[0]).abs().max().item() < 1e-4


def test_debug_preset_matches_transformers_and_round_trips(tmp_path):
    model = random_model(GPTConfig.from_preset("debug"))
    out = export_hf.export_model(model, tmp_path / "export")
    saved = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in saved  # tied: saved once, as transformers does
    assert saved["model.layers.0.self_attn.k_proj.bias"].shape == (128,)
    assert_transformers_matches(model, out)
    assert_round_trip(model, out)


def test_full_size_model_matches_transformers_and_round_trips(tmp_path):
    """The real lf_llm_269m shape (320M parameters, 1.3 GB float32), random init. Generation is compared over 4
    tokens (the cache past the prompt): each token costs about a second per model here, and the debug preset's test
    compares 20."""
    model = random_model(GPTConfig.from_preset("lf_llm_269m"))
    out = export_hf.export_model(model, tmp_path / "export")
    assert_transformers_matches(model, out, new_tokens=4)
    gc.collect()
    assert_round_trip(model, out)


def test_padded_vocab_rows_dropped_on_export_restored_on_import(tmp_path):
    config = GPTConfig.from_preset("debug", pad_vocab_to=64, n_layer=1)
    model = random_model(config)
    assert model.wte.weight.shape[0] == 50304
    out = export_hf.export_model(model, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 50257
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].shape == (50257, 128)
    assert_transformers_matches(model, out, new_tokens=5)
    assert_round_trip(model, out)


def test_bfloat16_export_holds_rounded_weights(tmp_path):
    model = random_model(GPTConfig.from_preset("debug", n_layer=1))
    out = export_hf.export_model(model, tmp_path / "export", "bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    _, state = export_hf.load_hf_dir(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor.bfloat16().float()), name


def test_tokenizer_from_export_encodes_like_ours(tmp_path):
    model = random_model(GPTConfig.from_preset("debug", n_layer=1))
    out = export_hf.export_model(model, tmp_path / "export")
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token == hf_tok.bos_token == hf_tok.unk_token == tokenizer.EOT_TOKEN
    assert hf_tok.eos_token_id == EOT
    ours = tokenizer.get_tokenizer()
    texts = ["HTML stands for", "If animals could talk, my pet would probably say",
             "Ünïcödé: naïve café, 日本語のテキスト, emoji 🦊🪶 and math ∑x²",
             "  leading spaces\n\n\ttabs   and\r\nCRLF",
             "first document<|endoftext|>second document", "don't you'll I'm 12345 3.14"]
    for text in texts:
        ids = hf_tok(text)["input_ids"]
        assert ids == ours.encode(text, allowed_special={tokenizer.EOT_TOKEN}), text
        assert hf_tok.decode(ids) == text


def write_run(run_dir, step: int) -> GPTConfig:
    """A run directory as train.py leaves it: a checkpoint at `step` (after step x 4,096 tokens) and metrics before
    and after it (the train event of step S counts update S: (S + 1) x 4,096 tokens)."""
    config = GPTConfig.from_preset("debug", n_layer=1)
    model = random_model(config)
    save_checkpoint({"model_config": dataclasses.asdict(config), "model": model.state_dict(), "step": step,
                     "tokens_seen": step * 4096}, checkpoint_path(run_dir, step))
    records = [{"step": 10, "loss": 5.0, "lr": 1e-3, "grad_norm": 1.0, "step_ms": 9.0, "tokens_per_s": 1e3,
                "mfu": None, "tokens": 45056},
               {"step": 10, "val_loss": 4.5678},
               {"step": 10, "hellaswag_acc": 0.3, "hellaswag_acc_norm": 0.25},
               {"step": 20, "loss": 4.0, "lr": 1e-3, "grad_norm": 1.0, "step_ms": 9.0, "tokens_per_s": 1e3,
                "mfu": None, "tokens": 86016},
               {"step": 20, "val_loss": 3.9876},
               {"step": 30, "val_loss": 3.1111}]  # after the exported checkpoint: not its metric
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4')
    return config


def test_cli_export_then_import_gives_a_loadable_checkpoint(tmp_path):
    write_run(tmp_path / "run", step=20)
    export_hf.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    card = (tmp_path / "export" / "README.md").read_text()
    assert "3.9876 (step 20)" in card and "3.1111" not in card  # latest metric at or before the checkpoint
    assert "81,920 (step 20)" in card and "0.2500 (step 10)" in card  # tokens seen: the checkpoint's own
    assert "86,016" not in card
    assert f"{load_model(tmp_path / 'run').num_params():,}" in card
    export_hf.main(["--from-hf", str(tmp_path / "export"), "--out", str(tmp_path / "back.pt")])
    original, imported = load_model(tmp_path / "run"), load_model(tmp_path / "back.pt")
    assert imported.config == original.config
    for name, tensor in original.state_dict().items():
        assert torch.equal(imported.state_dict()[name], tensor), name
    state = torch.load(tmp_path / "back.pt", weights_only=True)
    assert "optimizer" not in state


def test_model_card_without_metrics_says_not_available(tmp_path):
    config = GPTConfig.from_preset("debug", n_layer=1)
    path = tmp_path / "model.pt"
    save_checkpoint({"model_config": dataclasses.asdict(config), "model": random_model(config).state_dict()}, path)
    export_hf.main(["--checkpoint", str(path), "--out", str(tmp_path / "export")])
    card = (tmp_path / "export" / "README.md").read_text()
    assert card.count("not available") == 3


def test_failed_export_leaves_no_output(tmp_path, monkeypatch):
    def broken_tokenizer_files(*args):
        raise OSError("disk full")
    monkeypatch.setattr(export_hf, "write_tokenizer_files", broken_tokenizer_files)
    with pytest.raises(OSError):
        export_hf.export_model(random_model(GPTConfig.from_preset("debug", n_layer=1)), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_an_earlier_export(tmp_path):
    out = tmp_path / "export"
    export_hf.export_model(random_model(GPTConfig.from_preset("debug", n_layer=1)), out)
    second = random_model(GPTConfig.from_preset("debug", n_layer=2), seed=5)
    export_hf.export_model(second, out, force=True)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folders left


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """(a weights-only checkpoint, an export of it): a 1-layer debug model."""
    folder = tmp_path_factory.mktemp("small_export")
    config = GPTConfig.from_preset("debug", n_layer=1)
    save_checkpoint({"model_config": dataclasses.asdict(config), "model": random_model(config).state_dict()},
                    folder / "model.pt")
    return folder / "model.pt", export_hf.export_checkpoint(folder / "model.pt", folder / "export")


def tree(folder) -> dict:
    """{relative path: bytes, or the link's target} of everything under `folder`, links not followed."""
    return {str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def llama_folder(out, export):
    """A user's own LlamaForCausalLM folder: its config says Llama, its weights and notes are not an export's."""
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (out / "model.safetensors").write_bytes(b"someone else's weights")
    (out / "NOTES.txt").write_text("keep me")


def export_plus(name, data):
    def make(out, export):
        import shutil
        shutil.copytree(export, out)
        (out / name).write_bytes(data)
    return make


def export_without(name):
    def make(out, export):
        export_plus("x", b"")(out, export)
        (out / "x").unlink()
        (out / name).unlink()
    return make


def marker_of_another_tool(out, export):
    export_plus("x", b"")(out, export)
    (out / "x").unlink()
    marker = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps({**marker, "written_by": "hellaswag_eval.py"}))


NOT_AN_EXPORT = {  # (how the --out folder is made, what the error says about it)
    "a user's llama folder": (llama_folder, "no export_hf.json"),
    "an export with a note added": (export_plus("NOTES.txt", b"keep me"), "NOTES.txt, which no export writes"),
    "an export's weights replaced": (export_plus("model.safetensors", b"fine-tuned"), "model.safetensors changed"),
    "an export's card edited": (export_plus("README.md", b"my notes"), "README.md changed"),
    "an export without its mark": (export_without(MARKER), "no export_hf.json"),
    "another tool's mark": (marker_of_another_tool, "no export_hf.json"),
}


@pytest.mark.parametrize("case", NOT_AN_EXPORT)
def test_force_replaces_only_an_unchanged_export_of_this_tool(case, small_export, tmp_path, capsys):
    """--force replaced any folder whose config.json said LlamaForCausalLM: a user's own model and notes were gone.
    Now only a folder holding export_hf.json and nothing but the unchanged files it lists is replaced."""
    checkpoint, export = small_export
    make, phrase = NOT_AN_EXPORT[case]
    out = tmp_path / "out"
    make(out, export)
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main(["--checkpoint", str(checkpoint), "--out", str(out), "--force"])
    error = subprocess.CompletedProcess([], exit_info.value.code, "", capsys.readouterr().err)
    assert_one_line_error(error, f"--out {out} ", "not an unchanged export of export_hf.py", phrase, status=2,
                          alone=True)
    assert tree(tmp_path) == before


def test_force_replaces_an_export_that_lost_a_file(small_export, tmp_path):
    """What the mark lists and the folder lacks does not matter: the rest is still the export's own."""
    checkpoint, export = small_export
    out = tmp_path / "out"
    export_without("README.md")(out, export)
    export_hf.main(["--checkpoint", str(checkpoint), "--out", str(out), "--force"])
    assert tree(out) == tree(export) and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("target", ["an earlier export", "an empty folder", "nothing"])
@pytest.mark.parametrize("force", [True, False])
def test_a_symbolic_link_out_is_refused_and_nothing_changes(target, force, small_export, tmp_path, capsys):
    """`--out LINK --force`, LINK to an earlier export, left a stray .LINK.old<PID> link and a real folder in the
    link's place while the export it pointed to stayed. A link is refused in one line; nothing is touched."""
    checkpoint, export = small_export
    pointed = tmp_path / "target"
    if target == "an earlier export":
        export_plus("x", b"")(pointed, export)
        (pointed / "x").unlink()
    elif target == "an empty folder":
        pointed.mkdir()
    link = tmp_path / "link"
    link.symlink_to(pointed)
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main(["--checkpoint", str(checkpoint), "--out", str(link)] + ["--force"] * force)
    error = subprocess.CompletedProcess([], exit_info.value.code, "", capsys.readouterr().err)
    assert_one_line_error(error, f"--out {link} is a symbolic link", status=2, alone=True)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("step, tokens_seen, metrics, shown", [
    # a fallback to an older checkpoint: no metrics event at or before its step counts tokens
    (2, 2048, [{"step": 4, "loss": 5.0, "tokens": 5120}], "2,048 (step 2)"),
    # the metrics' figure at the step counts one more update than the checkpoint holds
    (20, 81920, [{"step": 20, "loss": 4.0, "tokens": 86016}], "81,920 (step 20)"),
    (0, 0, [{"step": 0, "loss": 11.0, "tokens": 4096}], "0 (step 0)"),
    (20, None, [{"step": 20, "loss": 4.0, "tokens": 86016}], "not available"),  # a weights-only checkpoint
])
def test_model_card_tokens_seen_is_the_exported_checkpoints(step, tokens_seen, metrics, shown, tmp_path):
    config = GPTConfig.from_preset("debug", n_layer=1)
    state = {"model_config": dataclasses.asdict(config), "model": random_model(config).state_dict(), "step": step}
    save_checkpoint({**state, **({} if tokens_seen is None else {"tokens_seen": tokens_seen})},
                    checkpoint_path(tmp_path / "run", step))
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    export_hf.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"| tokens seen | {shown} |" in card, card


def bad_input_cases(tmp_path):
    """(argv, a phrase the one-line error must contain) for each kind of bad input; the issue's four kinds first."""
    config = GPTConfig.from_preset("debug", n_layer=1)
    good = tmp_path / "good.pt"
    save_checkpoint({"model_config": dataclasses.asdict(config), "model": random_model(config).state_dict()}, good)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    gqa = tmp_path / "gqa"
    gqa.mkdir()
    (gqa / "config.json").write_text(json.dumps({**export_hf.hf_config(config, "float32"), "num_key_value_heads": 2}))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(export_hf.hf_config(config, "float32")))
    nameless = tmp_path / "nameless"
    nameless.mkdir()
    (nameless / "config.json").write_text(json.dumps({"hidden_size": 128}))
    run = tmp_path / "run"
    write_run(run, step=2)
    (run / "config.json").write_text(json.dumps({"model": "debug", "seq_len": 128}))  # train.py's, not transformers'
    text_file = tmp_path / "foreign.txt"
    text_file.write_text("keep me")
    new, new_pt, missing = str(tmp_path / "new"), str(tmp_path / "x.pt"), str(tmp_path / "missing.pt")
    return [
        (["--checkpoint", str(foreign), "--out", new], "not a checkpoint of this repo"),
        (["--checkpoint", str(good), "--out", str(busy)], "--force"),
        (["--checkpoint", str(good), "--out", new, "--dtype", "int8"], "--dtype 'int8' is not supported"),
        (["--from-hf", str(gpt2), "--out", new_pt], "GPT2LMHeadModel"),
        (["--checkpoint", missing, "--out", new], "does not exist"),
        (["--checkpoint", str(good), "--out", str(busy), "--force"], "not an unchanged export"),
        (["--from-hf", str(gqa), "--out", new_pt], "num_key_value_heads is 2"),
        (["--from-hf", str(no_weights), "--out", new_pt], "has no model.safetensors"),
        (["--checkpoint", str(good), "--out", new, "--dtype", ""], "--dtype '' is not supported"),
        (["--from-hf", str(run), "--out", new_pt], f"--from-hf {run} is a training run of this repo",
         f"--checkpoint {run}"),
        (["--from-hf", str(run / "checkpoints"), "--out", new_pt], "is a training run of this repo"),
        (["--from-hf", str(good), "--out", new_pt], f"--from-hf {good} is a file, not a folder"),
        (["--from-hf", str(tmp_path / "nowhere"), "--out", new_pt], "does not exist"),
        (["--from-hf", str(nameless), "--out", new_pt], "names no model architecture"),
        # every problem at once: the checkpoint, --out and --dtype (it named --dtype alone)
        (["--checkpoint", missing, "--out", str(text_file), "--dtype", "int8"], "--dtype 'int8' is not supported",
         f"checkpoint {missing} does not exist", f"--out {text_file} is a file"),
        (["--from-hf", str(good), "--out", str(busy), "--dtype", "float16"], "is a file, not a folder",
         f"--out {busy} is a directory", "--dtype applies to an export"),
        # an --out in folders that do not exist yet: they are made only by a run that writes
        (["--checkpoint", missing, "--out", str(tmp_path / "new" / "sub" / "out")], "does not exist"),
        (["--from-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "new" / "sub" / "x.pt")], "does not exist"),
    ]


def test_bad_input_is_one_line_without_traceback(tmp_path, repo_dir, capsys):
    cases = bad_input_cases(tmp_path)
    # The four kinds as real processes (run side by side: each pays the torch import), the rest in-process.
    as_process, in_process = cases[:4], cases[4:]
    procs = [subprocess.Popen([sys.executable, str(repo_dir / "export_hf.py"), *argv], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv, *_ in as_process]
    for proc, (argv, *phrases) in zip(procs, as_process):
        _, stderr = proc.communicate(timeout=120)
        assert_one_line_error(subprocess.CompletedProcess(argv, proc.returncode, "", stderr), *phrases, alone=True)
    for argv, *phrases in in_process:
        with pytest.raises(SystemExit) as exit_info:
            export_hf.main(argv)
        error = subprocess.CompletedProcess(argv, exit_info.value.code, "", capsys.readouterr().err)
        assert_one_line_error(error, *phrases, alone=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "foreign.txt").read_text() == "keep me"
    assert not (tmp_path / "new").exists() and not (tmp_path / "x.pt").exists()
