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
    assert not dest.parent.exists()  # no partial file left behind, nor the folder made for it
    download_official(dest, source.as_uri(), expected=30)
    assert dest.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("folder", ["new", "new parents", "existing"])
@pytest.mark.parametrize("failure", ["offline", "wrong count", "ctrl-c"])
def test_a_failed_download_leaves_no_file_or_folder_it_made(failure, folder, tmp_path, monkeypatch):
    """An offline --download-only left an empty temp_data/hellaswag/ behind (a Ctrl-C, its partial file too)."""
    source = tmp_path / "served.jsonl"
    source.write_text(SAMPLE_FILE.read_text())  # 10 examples
    dest = {"new": tmp_path / "cache", "new parents": tmp_path / "a" / "b" / "cache",
            "existing": tmp_path}[folder] / "hellaswag_val.jsonl"
    url = "http://127.0.0.1:9/hellaswag_val.jsonl" if failure == "offline" else source.as_uri()
    if failure == "ctrl-c":
        monkeypatch.setattr(hellaswag_eval, "read_examples", lambda path: (_ for _ in ()).throw(KeyboardInterrupt))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(KeyboardInterrupt if failure == "ctrl-c" else UserError):
        download_official(dest, url, expected=11 if failure == "wrong count" else 10)
    assert sorted(tmp_path.rglob("*")) == before


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


# --- every problem before any work; what the result says ------------------------------------------------------

def sample_with(tmp_path, replaced: dict) -> "Path":
    """The committed 10-example sample with lines replaced ({line number: bytes}; past its end: added)."""
    lines = SAMPLE_FILE.read_bytes().splitlines()
    for number, data in replaced.items():
        lines += [lines[0]] * (number - len(lines))
        lines[number - 1] = data
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def long_ending(line: bytes, tokens: int = 5000) -> bytes:
    example = json.loads(line)
    example["endings"][2] = "word " * tokens  # ' word' is one token: 5,001 with the leading space
    return json.dumps(example).encode()


def run_main(argv, capsys, monkeypatch=None):
    import subprocess
    with pytest.raises(SystemExit) as exit_info:
        hellaswag_eval.main([str(a) for a in argv])
    return subprocess.CompletedProcess(argv, exit_info.value.code, "", capsys.readouterr().err)


def nothing_after_the_checks(monkeypatch):
    """Fail the test if main gets past its checks: no process group, no model, no scoring."""
    def boom(*args, **kwargs):
        raise AssertionError("main went on to set up the evaluation")
    monkeypatch.setattr(hellaswag_eval, "init_distributed", boom)
    monkeypatch.setattr(hellaswag_eval, "evaluate_hellaswag", boom)


@pytest.mark.parametrize("long_lines", [[10], [1, 7], list(range(1, 13))])
def test_an_ending_too_long_for_the_model_is_found_before_the_model_is_built(long_lines, checkpoint_file, tmp_path,
                                                                              capsys, monkeypatch):
    """Line 10 with a 5,001-token ending (context 64) was found after scoring 9 examples, unnamed. Now every scored
    example is tokenized first and the line names the file and each line (the first 8, then a count)."""
    lines = SAMPLE_FILE.read_bytes().splitlines()
    data = sample_with(tmp_path, {n: long_ending(lines[(n - 1) % 10]) for n in long_lines})
    nothing_after_the_checks(monkeypatch)
    error = run_main(["--checkpoint", checkpoint_file, "--data", data, "--device", "cpu"], capsys)
    line = assert_one_line_error(error, "ending 2 has 5,001 tokens", "context of 64 tokens", status=2, alone=True)
    for number in long_lines[:8]:
        assert f"{data}:{number}: ending 2 has 5,001 tokens" in line
    assert ("and 4 more bad lines, the last at line 12" in line) == (len(long_lines) == 12)


def test_a_too_long_ending_past_limit_is_not_scored_and_not_refused(checkpoint_file, tmp_path, capsys):
    data = sample_with(tmp_path, {10: long_ending(SAMPLE_FILE.read_bytes().splitlines()[9])})
    hellaswag_eval.main(["--checkpoint", str(checkpoint_file), "--data", str(data), "--limit", "9", "--device", "cpu"])
    assert "HellaSwag (9 examples)" in capsys.readouterr().out


NOT_UTF8 = b'{"ctx": "caf\xe9", "endings": ["a", "b", "c", "d"], "label": 0}'
NOT_JSON = b'{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1'
BAD_LABEL = b'{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 7}'


@pytest.mark.parametrize("bad, phrases", [
    ({3: NOT_JSON, 6: BAD_LABEL}, {3: "not valid JSON", 6: "'label' must be an integer from 0 to 3, got 7"}),
    ({4: NOT_UTF8}, {4: "not UTF-8 at byte {offset} (invalid continuation byte)"}),
    ({2: NOT_UTF8, 9: NOT_JSON, 10: b"[1]"}, {2: "not UTF-8", 9: "not valid JSON", 10: "expected a JSON object"}),
    ({n: NOT_JSON for n in range(1, 21)}, {n: "not valid JSON" for n in range(1, 9)}),
])
def test_every_bad_line_is_named_with_its_number(bad, phrases, tmp_path):
    """A file with bad lines 3 and 6 named line 3 only; a byte that is not UTF-8 was named by its offset without a
    line. Now each bad line (the first 8, then a count) is FILE:LINE: what is wrong, in one line."""
    path = sample_with(tmp_path, bad)
    with pytest.raises(UserError) as error:
        load_examples(path)
    message = str(error.value)
    assert "\n" not in message
    for number, phrase in phrases.items():
        offset = sum(len(line) + 1 for line in path.read_bytes().split(b"\n")[:number - 1]) + NOT_UTF8.index(b"\xe9")
        assert f"{path}:{number}: {phrase.format(offset=offset)}" in message, message
    assert ("and 12 more bad lines, the last at line 20" in message) == (len(bad) == 20)
    assert message.endswith("fix or remove that line" if len(bad) == 1 else "fix or remove those lines")


def test_every_bad_path_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    """--checkpoint /nope --data /nope.jsonl --out foreign.txt named only --out (and a bad --device was found after
    all of them were fixed)."""
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("keep me")
    nothing_after_the_checks(monkeypatch)
    error = run_main(["--checkpoint", tmp_path / "nope", "--data", tmp_path / "nope.jsonl", "--out", foreign,
                      "--device", "tpu"], capsys)
    assert_one_line_error(error, f"checkpoint {tmp_path / 'nope'} does not exist",
                          f"HellaSwag file {tmp_path / 'nope.jsonl'} does not exist", f"--out {foreign} exists",
                          "--device 'tpu': use cuda, mps or cpu", status=2, alone=True)
    error = run_main(["--checkpoint", tmp_path / "nope", "--data", SAMPLE_FILE, "--out", foreign / "result.json"],
                     capsys)
    assert_one_line_error(error, f"checkpoint {tmp_path / 'nope'} does not exist",
                          f"--out's folder {foreign} is not writable", status=2, alone=True)
    assert foreign.read_text() == "keep me"


@pytest.mark.parametrize("limit, header", [(1, "HellaSwag (1 example) of "), (10, "HellaSwag (10 examples) of "),
                                           (11, "HellaSwag (10 examples: --limit 11 is more than the 10 examples "
                                                f"of {SAMPLE_FILE}) of ")])
def test_the_result_names_the_checkpoint_and_step_scored_and_the_examples(limit, header, tmp_path, capsys):
    """The JSON said only the run directory given, not which checkpoint was scored after a damaged newest one was
    skipped; '--limit 1' printed '(1 examples)' and '--limit 11' on 10 examples ran 10 without a word."""
    import dataclasses

    from checkpoint import checkpoint_path, save_checkpoint
    run = tmp_path / "run"
    model = GPT(tiny_config(), seed=1)
    save_checkpoint({"model_config": dataclasses.asdict(model.config), "model": model.state_dict(), "step": 2},
                    checkpoint_path(run, 2))
    checkpoint_path(run, 4).write_bytes(b"")  # the newest, damaged: skipped
    out = tmp_path / "result.json"
    hellaswag_eval.main(["--checkpoint", str(run), "--data", str(SAMPLE_FILE), "--limit", str(limit),
                         "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"{header}{checkpoint_path(run, 2)} (step 2): acc " in printed, printed
    result = json.loads(out.read_text())
    assert result["total"] == min(limit, 10) and result["checkpoint"] == str(run)
    assert result["checkpoint_file"] == str(checkpoint_path(run, 2)) and result["step"] == 2
