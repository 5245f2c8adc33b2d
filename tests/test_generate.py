import io
import subprocess

import pytest
import torch

from cli import UserError
from generate import (REFERENCE_PROMPTS, TokenPrinter, check_sampling, continuation_text, encode_prompt,
                      generate_samples, sample_continuations)
from helpers import assert_one_line_error, run_main, save_tiny_checkpoint, tiny_config
from model import GPT, GPTConfig, Sampling, evaluating
from tokenizer import EOT_ID, get_tokenizer


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "tiny.pt"
    save_tiny_checkpoint(path, seed=5, block_size=24)
    return path


def greedy_without_cache(model, prompt_ids: list[int], n: int) -> list[int]:
    """The plain definition: every step reruns the whole (cropped) context and takes the argmax."""
    idx = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -model.config.block_size:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(prompt_ids):].tolist()


def test_greedy_equals_argmax_decoding_without_cache():
    model = GPT(tiny_config(block_size=24), seed=2).eval()
    n = 40  # more than block_size: the window slides past the 4-token prompt
    texts = generate_samples(model, ["HTML stands for", "Hello"], Sampling(n, temperature=0), seed=0, device="cpu",
                             stop_at_eot=False)
    enc = get_tokenizer()
    for prompt, text in zip(["HTML stands for", "Hello"], texts):
        assert text == enc.decode(greedy_without_cache(model, enc.encode(prompt), n))


def test_same_seed_same_text_and_no_side_effects():
    model = GPT(tiny_config(), seed=3)
    model.train()
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    kwargs = dict(sampling=Sampling(12, temperature=1.0, top_k=200, top_p=0.95), device="cpu")
    first = generate_samples(model, REFERENCE_PROMPTS, seed=7, **kwargs)
    again = generate_samples(model, REFERENCE_PROMPTS, seed=7, **kwargs)
    other = generate_samples(model, REFERENCE_PROMPTS, seed=8, **kwargs)
    assert first == again and first != other
    assert len(first) == 3 and all(first)
    assert model.training  # mode restored
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched


def test_evaluating_restores_the_mode_after_an_error():
    model = GPT(tiny_config(), seed=0).train()
    with pytest.raises(RuntimeError, match="inside"), evaluating(model):
        assert not model.training
        raise RuntimeError("inside")
    assert model.training


def test_sampling_settings_are_refused_naming_the_callers_flag():
    """check_sampling is the one check (generate.py's flags by default; train.py passes its own names)."""
    fine = Sampling(1, temperature=0.0, top_k=0, top_p=1.0)
    assert check_sampling(fine) is fine
    with pytest.raises(UserError, match=r"^--top-k -1: must be >= 0"):
        check_sampling(Sampling(5, top_k=-1))
    with pytest.raises(UserError, match=r"^--sample-tokens 0: must be >= 1"):
        check_sampling(Sampling(0), {"max_new_tokens": "--sample-tokens"})


def test_a_prompt_of_exactly_the_context_is_accepted_one_more_token_is_not():
    ids = encode_prompt(" a" * 16, block_size=16)
    assert ids == get_tokenizer().encode(" a" * 16) and len(ids) == 16  # " a" is one token
    with pytest.raises(UserError, match="16 tokens, longer than the model's context of 15"):
        encode_prompt(" a" * 16, block_size=15)


def test_prompts_share_one_generator_drawing_on_from_the_previous_prompt():
    # One generator for the whole call: the same prompt twice gives two different samples, exactly the draws of two
    # successive sample_continuations calls on one generator seeded with `seed` (not one fresh generator per prompt).
    model = GPT(GPTConfig.from_preset("debug", n_layer=1), seed=0).eval()
    sampling = Sampling(8, temperature=1.0, top_k=0, top_p=1.0)
    texts = generate_samples(model, ["Hello", "Hello"], sampling, seed=7, device="cpu")
    generator = torch.Generator().manual_seed(7)
    ids = get_tokenizer().encode("Hello")
    expected = [sample_continuations(model, ids, 1, sampling, generator, compile=False)[0] for _ in range(2)]
    assert texts == expected and texts[0] != texts[1]


class EotLovingGPT(GPT):
    """A GPT whose most likely next token is always <|endoftext|>."""

    def forward(self, idx, targets=None, cache=None, input_pos=None):
        logits, loss = super().forward(idx, targets, cache, input_pos)
        logits[..., EOT_ID] += 1e4
        return logits, loss


def test_stop_at_eot_ends_the_text_before_endoftext():
    model = EotLovingGPT(tiny_config(), seed=4)
    stopped = generate_samples(model, ["Hello"], Sampling(5, temperature=0), 0, "cpu", stop_at_eot=True)
    kept = generate_samples(model, ["Hello"], Sampling(5, temperature=0), 0, "cpu", stop_at_eot=False)
    assert stopped == [""] and kept == ["<|endoftext|>" * 5]
    enc = get_tokenizer()
    assert continuation_text(enc.encode("Hi there") + [EOT_ID, 42], stop_at_eot=True) == "Hi there"


def test_token_printer_joins_characters_split_over_tokens():
    enc = get_tokenizer()
    ids = enc.encode(" 日本語 naïve") + [EOT_ID] + enc.encode("after")
    assert any(not is_utf8(enc.decode_single_token_bytes(t)) for t in ids)  # some token holds part of a character
    out = io.StringIO()
    printer = TokenPrinter(stop_at_eot=True, out=out)
    for t in ids:
        printer(torch.tensor([[t]]))
    printer.finish()
    assert out.getvalue() == " 日本語 naïve\n"


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# The CLI tests call generate.py's main in this process (helpers.run_main: its exit status and output as a process
# shows them): a fresh interpreter would spend seconds importing torch for each.

def test_cli_greedy_text_equals_plain_argmax_decoding(checkpoint_file):
    """The streamed CLI output against the definition (rerun the whole context, take the argmax), decoded here;
    30 new tokens pass the checkpoint's 24-token context."""
    result = run_main("generate.py", "--checkpoint", checkpoint_file, "--prompt", "HTML stands for",
                      "--max-new-tokens", 30, "--temperature", 0, "--no-stop-at-eot")
    assert result.returncode == 0, result.stderr
    enc = get_tokenizer()
    model = torch.load(checkpoint_file, weights_only=True)
    reference = GPT(GPTConfig(**model["model_config"])).eval()
    reference.load_state_dict(model["model"])
    text = enc.decode(greedy_without_cache(reference, enc.encode("HTML stands for"), 30))
    assert result.stdout.splitlines()[0].startswith("=== prompt 1/1, sample 1/1")
    assert result.stdout.split("\n", 1)[1] == "HTML stands for" + text + "\n"


def test_cli_sampling_follows_the_seed(checkpoint_file):
    def sample(seed):
        result = run_main("generate.py", "--checkpoint", checkpoint_file, "--prompt", "Hello",
                          "--max-new-tokens", 12, "--temperature", 0.9, "--top-k", 100, "--top-p", 0.9,
                          "--seed", seed, "--num-samples", 2, "--no-stop-at-eot")
        assert result.returncode == 0, result.stderr
        texts = result.stdout.split("\n=== prompt 1/1, sample 2/2")
        assert len(texts) == 2 and texts[0].startswith("=== prompt 1/1, sample 1/2")
        return [text.split("\n", 1)[1] for text in texts]  # without the headers (they name the seed)
    first = sample(11)
    assert first == sample(11) and first != sample(12)
    assert first[0] != first[1]  # the two samples of one run differ


@pytest.mark.parametrize("args, words", [
    (["--prompt", ""], ["prompt is empty"]),
    (["--prompt", " ".join(["word"] * 30)], ["30 tokens", "context of 24"]),
    (["--top-p", "0"], ["--top-p"]),
    (["--top-p", "1.5"], ["--top-p"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--top-k", "-1"], ["--top-k"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens"]),
])
def test_cli_bad_input_is_one_line(checkpoint_file, args, words):
    assert_one_line_error(run_main("generate.py", "--checkpoint", checkpoint_file, *args), *words, alone=True)


# Each problem generate.py can see before reading the checkpoint's tensors: (flags, what the line must say).
# {bad_file}: a prompts file whose line 2 is not UTF-8 (byte 8 of the file); {folder}: a folder.
UP_FRONT_PROBLEMS = {
    "temperature": (["--temperature", "nan"], "--temperature nan: must be 0 (greedy)"),
    "top_p": (["--top-p", "2"], "--top-p 2.0: must be in (0, 1]"),
    "top_k": (["--top-k", "-3"], "--top-k -3: must be >= 0"),
    "num_samples": (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    "seed": (["--seed", "-1"], "--seed must be in [0, 2**64)"),
    "prompts_bytes": (["--prompts-file", "{bad_file}"], "{bad_file} line 2: not UTF-8 at byte 8"),
    "prompts_folder": (["--prompts-file", "{folder}"], "--prompts-file {folder} is a folder"),
    "device": (["--device", "tpu"], "--device 'tpu': use cuda, mps or cpu"),
    "checkpoint": (["--checkpoint", "{folder}/nope.pt"], "checkpoint {folder}/nope.pt does not exist"),
}
PROBLEM_SETS = [[name] for name in UP_FRONT_PROBLEMS] + [[n for n in UP_FRONT_PROBLEMS if n != "prompts_folder"]]


@pytest.mark.parametrize("names", PROBLEM_SETS, ids="+".join)
def test_cli_names_every_problem_it_can_see_up_front_in_one_line(names, checkpoint_file, tmp_path, capsys):
    import generate
    bad_file = tmp_path / "prompts.txt"
    bad_file.write_bytes("fine\ncaf\xe9 ok\n".encode("latin-1"))
    argv = ["--checkpoint", str(checkpoint_file)]
    for name in names:
        argv += [a.format(bad_file=bad_file, folder=tmp_path) for a in UP_FRONT_PROBLEMS[name][0]]
    with pytest.raises(SystemExit) as exit_info:
        generate.main(argv)
    line = assert_one_line_error(subprocess.CompletedProcess(argv, exit_info.value.code, "", capsys.readouterr().err),
                                 status=2, alone=True)
    for name in names:
        assert UP_FRONT_PROBLEMS[name][1].format(bad_file=bad_file, folder=tmp_path) in line, (name, line)


def test_cli_names_every_prompt_too_long_for_the_context(checkpoint_file):
    long = " ".join(["word"] * 30)
    line = assert_one_line_error(run_main("generate.py", "--checkpoint", checkpoint_file, "--prompt", long,
                                          "--prompt", "fine", "--prompt", long + " more"), alone=True)
    assert line.count("longer than the model's context of 24") == 2 and "31 tokens" in line


def test_cli_missing_or_corrupt_checkpoint_is_one_line(tmp_path):
    assert_one_line_error(run_main("generate.py", "--checkpoint", tmp_path / "nope.pt"), "does not exist",
                          alone=True)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert_one_line_error(run_main("generate.py", "--checkpoint", corrupt), "corrupt", alone=True)


class SecondRowStopsGPT(GPT):
    """A GPT whose batch row 1 always emits <|endoftext|> (greedy); the other rows are the plain model's."""

    def forward(self, idx, targets=None, cache=None, input_pos=None):
        logits, loss = super().forward(idx, targets, cache, input_pos)
        logits[1, :, EOT_ID] += 1e4
        return logits, loss


def test_a_row_that_stops_leaves_the_others_generating():
    """Row 1 stops at its first token; row 0 must still get all its tokens (the check for stop tokens runs every
    STOP_CHECK_EVERY steps, so 40 tokens pass two checks), and the streamed row 0 is its whole text."""
    from generate import sample_continuations
    model = SecondRowStopsGPT(tiny_config(block_size=24), seed=6).eval()
    prompt, n = get_tokenizer().encode("HTML stands for"), 40  # 40 tokens also slide past the 24-token window
    expected = greedy_without_cache(GPT(tiny_config(block_size=24), seed=6).eval(), prompt, n)
    assert EOT_ID not in expected
    out = io.StringIO()
    printer = TokenPrinter(stop_at_eot=True, out=out)
    texts = sample_continuations(model, prompt, 2, Sampling(n, temperature=0), torch.Generator(), on_token=printer)
    printer.finish()
    assert texts == [get_tokenizer().decode(expected), ""]
    assert out.getvalue() == texts[0] + "\n"


def tiny_decoder(**overrides) -> GPT:
    """A 97-token vocabulary: the compiled step stays small (compiling takes most of a test's time)."""
    return GPT(tiny_config(vocab_size=97, block_size=16, **overrides), seed=8).eval()


def test_compiled_decode_step_equals_eager():
    """torch.compile's decode step (inductor on the CPU; on CUDA the same graph runs as a CUDA graph) against the
    eager one: the same ids greedy and sampled, over two calls with other prompts and batch sizes (the compiled
    graph and the kept cache are reused, so stale positions or cache state would show) and past the 16-token window
    (refills)."""
    model = tiny_decoder()
    gen = torch.Generator().manual_seed(0)
    for batch, prompt_len, sampling in ((2, 3, Sampling(20, temperature=0)),
                                        (1, 6, Sampling(14, temperature=0.8, top_k=20))):
        idx = torch.randint(0, 97, (batch, prompt_len), generator=gen)
        eager, compiled = (model.generate(idx, sampling, torch.Generator().manual_seed(prompt_len), compile=c)
                           for c in (False, True))
        assert torch.equal(eager, compiled), prompt_len


@pytest.mark.parametrize("sampling", [Sampling(1, temperature=1.0), Sampling(1, temperature=0.7, top_k=10),
                                      Sampling(1, temperature=1.3, top_p=0.8)])
def test_sampling_draws_what_multinomial_draws_from_the_seed(sampling):
    """The seed rule: each token is torch.multinomial's draw from the cut, tempered softmax with the one seeded
    generator, as before decoding stopped syncing with the host (so a seed gives the text it gave before)."""
    from model import sample_next
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    ours, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(20):
        drawn = sample_next(logits, sampling, ours)
        probs = sample_next_probs(logits, sampling)
        assert torch.equal(drawn, torch.multinomial(probs, 1, generator=reference))


def sample_next_probs(logits, sampling: Sampling):
    """The probabilities the rule draws from: softmax(logits / T) cut to the top_k, then to the top_p nucleus."""
    logits = logits / sampling.temperature
    if sampling.top_k:
        logits = logits.masked_fill(logits < logits.topk(sampling.top_k).values[:, -1:], float("-inf"))
    probs = logits.softmax(-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        probs = probs.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@pytest.mark.parametrize("failure", ["out of memory", "ctrl-c"])
def test_an_error_while_streaming_starts_its_own_line_and_names_the_flags_that_help(failure, checkpoint_file,
                                                                                     monkeypatch, capsys):
    """--max-new-tokens 100000000000 ran out of memory: the error line was glued to the streamed prompt and advised
    only --num-samples (already 1)."""
    import generate

    def fail_after_a_token(model, ids, num_samples, sampling, generator, stop_at_eot, on_token=None, compile=False):
        on_token(torch.tensor([[ids[-1]]]))
        if failure == "ctrl-c":
            raise KeyboardInterrupt
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 800000000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(generate, "sample_continuations", fail_after_a_token)
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--checkpoint", str(checkpoint_file), "--prompt", "hi", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert out.startswith("=== prompt 1/1") and out.endswith("\n"), out
    line = assert_one_line_error(subprocess.CompletedProcess([], exit_info.value.code, "", err), alone=True)
    assert ("lower --max-new-tokens or --num-samples" in line) == (failure == "out of memory"), line
