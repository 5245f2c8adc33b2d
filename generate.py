"""Sample text from a checkpoint of this repo.

  python generate.py --checkpoint runs/debug --prompt "HTML stands for"
  python generate.py --checkpoint runs/full/checkpoints/step_019072.pt --prompts-file prompts.txt --num-samples 3

Without --prompt or --prompts-file the three prompts of the reference run are used. Decoding uses the model's KV
cache (model.GPT.generate); on CUDA the weights are cast to bfloat16 and the one-token decode step is compiled into a
CUDA graph (--no-compile: eager; compiling takes a while, once per process). A single sample (one prompt,
--num-samples 1) is streamed to the terminal token by token, several samples are printed one after the other under a
header each. One random generator, seeded with --seed, drives all the sampling,
so the same command gives the same text (on the same device and library versions); temperature 0 is greedy.

Prompts: `<|endoftext|>` in a prompt is the end-of-text token, so `--prompt "<|endoftext|>"` samples
unconditionally. An empty prompt, or one longer than the model's context, is refused. Prompt + new tokens may exceed
the context: the model then keeps the most recent block_size tokens in view.
"""
import argparse
import cli
import codecs
import sys

import torch

from checkpoint import load_checkpoint, load_model
from cli import UserError, main_entry, path_arg, raise_all, read_text_lines
from devices import pick_device
from model import GPT, Sampling, evaluating
from tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer

REFERENCE_PROMPTS = [
    "If animals could talk, my pet would probably say",
    "HTML stands for",
    "The clever fox built the strange machine with just a feather, a pebble, and a tiny twig",
]


# The flag of each Sampling setting here; train.py passes its own (--sample-tokens, ...).
SAMPLING_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                  "top_p": "--top-p"}


def check_sampling(sampling: Sampling, flags: dict[str, str] = SAMPLING_FLAGS) -> Sampling:
    """The one check of sampling settings a user gives: `sampling` itself, or a UserError naming the flag of a
    setting out of range."""
    errors = sampling.errors()
    if errors:
        raise UserError("; ".join(f"{flags[name]} {getattr(sampling, name)!r}: {rule}" for name, rule in errors.items()))
    return sampling


def encode_prompt(prompt: str, block_size: int) -> list[int]:
    """Token ids of a prompt; UserError when it is empty or longer than the model's context."""
    ids = get_tokenizer().encode(prompt, allowed_special={EOT_TOKEN})
    if not ids:
        raise UserError("a prompt is empty; give some text (or '<|endoftext|>' to sample unconditionally)")
    if len(ids) > block_size:
        raise UserError(f"prompt {prompt[:30]!r}... is {len(ids)} tokens, longer than the model's context of "
                        f"{block_size}; shorten it")
    return ids


def continuation_text(new_ids: list[int], stop_at_eot: bool) -> str:
    """Decode the sampled ids; with stop_at_eot the text ends before the first <|endoftext|>."""
    if stop_at_eot and EOT_ID in new_ids:
        new_ids = new_ids[:new_ids.index(EOT_ID)]
    return get_tokenizer().decode(new_ids)


class TokenPrinter:
    """A model.generate on_token callback that prints row 0's new tokens as text. Token bytes can split a UTF-8
    character, so they go through an incremental decoder that holds partial characters back until finish()."""

    def __init__(self, stop_at_eot: bool, out=None):
        self.enc, self.stop_at_eot, self.out = get_tokenizer(), stop_at_eot, out or sys.stdout  # (the one of now)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stopped = False

    def __call__(self, next_id: torch.Tensor) -> None:  # next_id (B, 1)
        token = int(next_id[0, 0])
        self.stopped = self.stopped or (self.stop_at_eot and token == EOT_ID)
        if not self.stopped:
            self._write(self.decoder.decode(self.enc.decode_single_token_bytes(token)))

    def finish(self) -> None:
        """Print what the decoder still holds (an incomplete character becomes U+FFFD, as in tiktoken's decode)."""
        self._write(self.decoder.decode(b"", final=True) + "\n")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


@torch.no_grad()
def sample_continuations(model: GPT, prompt_ids: list[int], num_samples: int, sampling: Sampling,
                         generator: torch.Generator, stop_at_eot: bool = True, on_token=None,
                         compile: bool | None = None) -> list[str]:
    """num_samples continuations of one prompt, sampled together as the rows of one batch (compile: see
    GPT.generate)."""
    device = model.wte.weight.device
    idx = torch.tensor(prompt_ids, dtype=torch.long, device=device).repeat(num_samples, 1)  # (S, T)
    out = model.generate(idx, sampling, generator, stop_token=EOT_ID if stop_at_eot else None, on_token=on_token,
                         compile=compile)
    return [continuation_text(row[len(prompt_ids):].tolist(), stop_at_eot) for row in out]


def generate_samples(model: GPT, prompts: list[str], sampling: Sampling, seed: int, device,
                     stop_at_eot: bool = True) -> list[str]:
    """One continuation per prompt (the prompt itself not included), with settings the caller checked
    (check_sampling).

    Uses its own generator seeded with `seed` (the global RNG streams are untouched, so training is unaffected),
    puts the model in eval mode and restores its mode afterwards. Eager (a compiled decode step would be compiled
    and its CUDA graph recorded for the few tokens of each call); on CUDA under bf16 autocast, so the training
    model keeps its float32 weights and no copy of them is made.
    """
    prompt_ids = [encode_prompt(p, model.config.block_size) for p in prompts]
    generator = torch.Generator(device=device).manual_seed(seed)
    on_cuda = torch.device(device).type == "cuda"
    with evaluating(model), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
        return [sample_continuations(model, ids, 1, sampling, generator, stop_at_eot, compile=False)[0]
                for ids in prompt_ids]


# ----------------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=path_arg, required=True,
                        help="a checkpoint file, or a run directory (its newest valid checkpoint is used)")
    parser.add_argument("--prompt", action="append", default=[],
                        help="a prompt; repeat the flag for several (default: the three reference prompts)")
    parser.add_argument("--prompts-file", type=path_arg,
                        help="a UTF-8 text file with one prompt per line (blank lines skipped); "
                                               "used after any --prompt")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to sample per sample (default: 100)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="softmax temperature; 0 = greedy, the most likely token each step (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=50,
                        help="sample only among the K most likely tokens; 0 = no cut (default: 50)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling: the smallest set of tokens reaching probability P, in (0, 1]; "
                             "1 = no cut (default: 1.0)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default: 1)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator (default: 1337)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    parser.add_argument("--no-stop-at-eot", dest="stop_at_eot", action="store_false",
                        help="keep sampling past <|endoftext|> (default: a sample ends at its first <|endoftext|>)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the decode step (on CUDA into a CUDA graph); default: on CUDA only")
    return parser.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        from_file = [line for line in read_text_lines(args.prompts_file, "--prompts-file") if line.strip()]
        if not from_file:
            raise UserError(f"--prompts-file {args.prompts_file} holds no prompt")
        prompts += from_file
    return prompts or REFERENCE_PROMPTS


def check_num_samples(num_samples: int) -> None:
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}")


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2 ** 64:
        raise UserError(f"--seed must be in [0, 2**64), the generator's range; got {seed}")


@main_entry(memory_hint="lower --max-new-tokens or --num-samples")
def main(argv=None):
    args = parse_args(argv)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    *_, prompts, device, (peeked, _) = raise_all(
        lambda: check_sampling(sampling), lambda: check_num_samples(args.num_samples), lambda: check_seed(args.seed),
        lambda: read_prompts(args), lambda: pick_device(args.device),
        lambda: load_checkpoint(args.checkpoint, peek=True))  # no tensor built yet
    block_size = peeked["model_config"]["block_size"]
    raise_all(*(lambda p=p: encode_prompt(p, block_size) for p in prompts))  # every prompt that is too long
    model = load_model(args.checkpoint, device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)  # inference only: half the bytes to read per token
    prompt_ids = [encode_prompt(p, model.config.block_size) for p in prompts]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stream = len(prompts) == 1 and args.num_samples == 1
    for p, (prompt, ids) in enumerate(zip(prompts, prompt_ids), start=1):
        def header(s):
            return f"=== prompt {p}/{len(prompts)}, sample {s}/{args.num_samples} (seed {args.seed}) ==="
        if stream:
            print(f"{header(1)}\n{prompt}", end="", flush=True)
            printer = TokenPrinter(args.stop_at_eot)
            try:
                sample_continuations(model, ids, 1, sampling, generator, args.stop_at_eot, on_token=printer,
                                     compile=args.compile)
            finally:  # (an error, Ctrl-C included, then starts a line of its own in a terminal)
                printer.finish()
        else:
            texts = sample_continuations(model, ids, args.num_samples, sampling, generator, args.stop_at_eot,
                                         compile=args.compile)
            for s, text in enumerate(texts, start=1):
                print(f"{header(s)}\n{prompt}{text}")


if __name__ == "__main__":
    main()
