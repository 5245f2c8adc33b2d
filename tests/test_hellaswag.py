import json

import pytest
import torch

import hellaswag_eval
from cli import UserError
from hellaswag_eval import SAMPLE_FILE, download_official, evaluate_hellaswag, load_examples, score_examples
from helpers import assert_one_line_error, run_script, run_scripts, save_tiny_checkpoint, tiny_config
from model import GPT
from tokenizer import get_tokenizer


def reference_scores(model, example) -> tuple[list[float], list[float]]:
    """One ending at a time, unbatched, unpadded: (sum, mean) of the ending tokens' log-probs for each ending.
    A sequence longer than the context keeps its last block_size + 1 tokens (block_size inputs, shifted targets)."""
    enc = get_tokenizer()
    sums, means = [], []
    for ending in example["endings"]:
        completion = enc.encode(" " + ending)
        tokens = (enc.encode(example["ctx"]) + completion)[-(model.config.block_size + 1):]
        with torch.no_grad():
            logits, _ = model(torch.tensor([tokens[:-1]]))
        logprobs = logits[0].log_softmax(-1)  # (T, V)
        first = len(tokens) - len(completion)  # index of the first ending token
        total = sum(logprobs[i - 1, tokens[i]].item() for i in range(first, len(tokens)))
        sums.append(total)
        means.append(total / len(completion))
    return sums, means


@pytest.mark.parametrize("block_size", [256, 40])  # 40 crops most contexts from the left
def test_batched_scorer_matches_one_ending_at_a_time(block_size):
    # float64 so that batched and unbatched matmuls agree far below the 1e-5 tolerance
    model = GPT(tiny_config(block_size=block_size), seed=3).double().eval()
    examples = load_examples(SAMPLE_FILE)
    sums, counts = score_examples(model, examples, "cpu", batch_size=3)  # 3 does not divide 10: a short last batch
    ref = [reference_scores(model, ex) for ex in examples]
    ref_sums = torch.tensor([r[0] for r in ref], dtype=torch.float64)
    ref_means = torch.tensor([r[1] for r in ref], dtype=torch.float64)
    assert torch.allclose(sums, ref_sums, rtol=0, atol=1e-5)
    assert torch.allclose(sums / counts, ref_means, rtol=0, atol=1e-5)

    result = evaluate_hellaswag(model, examples, "cpu", batch_size=4)
    labels = torch.tensor([ex["label"] for ex in examples])
    # the two metrics must count differently here, or acc_norm computed from the sums would go unnoticed
    assert int((ref_sums.argmax(1) == labels).sum()) != int((ref_means.argmax(1) == labels).sum())
    assert result["total"] == 10
    assert result["correct"] == int((ref_sums.argmax(1) == labels).sum())
    assert result["correct_norm"] == int((ref_means.argmax(1) == labels).sum())
    assert result["acc_norm"] == result["correct_norm"] / 10


def test_eval_restores_mode_and_draws_no_random_numbers():
    model = GPT(tiny_config(), seed=2)  # dropout on: a train-mode forward would change the scores
    examples = load_examples(SAMPLE_FILE, limit=4)
    in_eval = evaluate_hellaswag(model.eval(), examples, "cpu")
    model.train()
    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    in_train = evaluate_hellaswag(model, examples, "cpu")
    assert model.training and torch.equal(torch.get_rng_state(), rng_before)
    assert in_train == in_eval


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hs") / "tiny.pt"
    save_tiny_checkpoint(path, seed=3)
    return path


def test_cli_two_gloo_ranks_count_like_one_process(checkpoint_file, tmp_path):
    common = ["--checkpoint", checkpoint_file, "--data", SAMPLE_FILE, "--limit", 9, "--batch-size", 2,
              "--device", "cpu"]  # 9 examples: ranks get 5 and 4
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    single, double = run_scripts(["hellaswag_eval.py", *common, "--out", tmp_path / "one.json"],
                                 [*launcher, "hellaswag_eval.py", *common, "--out", tmp_path / "two.json"], timeout=120)
    assert single.returncode == 0, single.stderr
    assert double.returncode == 0, double.stderr
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    keys = ["acc", "acc_norm", "correct", "correct_norm", "total"]
    assert {k: one[k] for k in keys} == {k: two[k] for k in keys} and one["total"] == 9
    assert double.stdout.count("HellaSwag (9 examples)") == 1  # only rank 0 reports


@pytest.mark.parametrize("bad_line, words", [
    ('{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}', "4 non-empty strings"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}', "'label'"),
    ('{"ctx": 3, "endings": ["b", "c", "d", "e"], "label": 1}', "'ctx'"),
    ('{"ctx": " ", "endings": ["b", "c", "d", "e"], "label": 1}', "'ctx' must be a non-empty"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1', "not valid JSON"),
    ('[1, 2]', "JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, words):
    path = tmp_path / "bad.jsonl"
    good = SAMPLE_FILE.read_text().splitlines()
    path.write_text("\n".join(good[:2] + [bad_line] + good[2:]) + "\n")
    with pytest.raises(UserError, match=f"{path}:3: .*{words}"):
        load_examples(path)


def test_cli_malformed_file_is_one_line(checkpoint_file, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(SAMPLE_FILE.read_text().splitlines()[0] + "\nnot json\n")
    result = run_script("hellaswag_eval.py", "--checkpoint", checkpoint_file, "--data", path)
    assert_one_line_error(result, f"{path}:2", alone=True)


def test_download_checks_count_and_renames(tmp_path):
    lines = SAMPLE_FILE.read_text().splitlines()
    source = tmp_path / "served.jsonl"
    source.write_text("\n".join(lines * 3) + "\n")  # 30 examples
    dest = tmp_path / "cache" / "hellaswag_val.jsonl"
    with pytest.raises(UserError, match="integrity check: .* has 30 examples"):
        download_official(dest, source.as_uri(), expected=31)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no partial file left behind
    download_official(dest, source.as_uri(), expected=30)
    assert dest.read_bytes() == source.read_bytes()


def test_offline_without_cache_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag_eval, "CACHE_FILE", tmp_path / "hellaswag_val.jsonl")
    monkeypatch.setattr(hellaswag_eval, "OFFICIAL_URL", "http://127.0.0.1:9/hellaswag_val.jsonl")  # nothing listens
    with pytest.raises(UserError, match="cannot download the HellaSwag validation set") as e:
        load_examples()
    assert "\n" not in str(e.value) and "--data" in str(e.value)


def test_download_only_checks_a_given_file_without_a_checkpoint():
    proc = run_script("hellaswag_eval.py", "--download-only", "--data", "assets/hellaswag/hellaswag_val_head10.jsonl")
    assert proc.returncode == 0 and "10 examples ready" in proc.stdout
    proc = run_script("hellaswag_eval.py", "--data", "assets/hellaswag/hellaswag_val_head10.jsonl")
    assert proc.returncode != 0 and "--checkpoint is required" in proc.stderr


def test_data_that_is_a_folder_is_named_a_folder_not_missing(tmp_path):
    """--data DIR: 'is a folder, not a jsonl file', not 'does not exist'."""
    with pytest.raises(UserError, match="is a folder, not a jsonl file") as e:
        hellaswag_eval.read_examples(tmp_path)
    assert "does not exist" not in str(e.value) and "--data" in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        hellaswag_eval.read_examples(tmp_path / "nowhere.jsonl")
