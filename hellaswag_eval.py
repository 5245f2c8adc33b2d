"""HellaSwag: pick the most likely of 4 endings for each context, scored by a GPT of this repo.

  python hellaswag_eval.py --checkpoint runs/debug                      # the official validation split (10,042)
  python hellaswag_eval.py --checkpoint runs/debug --data assets/hellaswag/hellaswag_val_head10.jsonl
  torchrun --nproc_per_node 8 hellaswag_eval.py --checkpoint runs/full  # examples split over the processes

Scoring: each ending is tokenized as " " + ending after the context's tokens, and only the ending's (completion)
tokens are scored. `acc` picks the ending with the highest sum of completion log-probs, `acc_norm` the one with the
highest mean log-prob per completion token (the reference run's metric). When context + ending do not fit the
model's context, the ending is kept whole and the context is cropped from the left (its oldest tokens go).

Many examples x 4 endings go through one forward pass: rows are right-padded, and since attention is causal the
padding never influences the scored positions; only completion positions are read out of the logits.
"""
import argparse
import cli
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import load_checkpoint, model_from_state
from cli import (REPO_DIR, UserError, check_result_out, first_new_folder, main_entry, path_arg, positive_int,
                 raise_all, remove_empty_folders, utf8_lines, write_json)
from devices import checked_device, exit_with, init_distributed
from model import GPT, IGNORE_INDEX, evaluating
from tokenizer import EOT_ID, get_tokenizer

OFFICIAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
OFFICIAL_EXAMPLES = 10042  # lines of the official validation file
CACHE_FILE = REPO_DIR / "temp_data" / "hellaswag" / "hellaswag_val.jsonl"
SAMPLE_FILE = REPO_DIR / "assets" / "hellaswag" / "hellaswag_val_head10.jsonl"  # its first 10 examples, committed
N_ENDINGS = 4
WRITTEN_BY = "hellaswag_eval.py"  # the marker of its --out results (cli.write_json): it replaces only those


# ----------------------------------------------------------------------------------------------------------------
# Data

def _example_problem(line: str) -> tuple[dict | None, str]:
    """(the example dict, "") of one jsonl line, or (None, what is wrong with it): the fields the scorer reads
    (ctx, endings, label) are checked."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})"
    if not isinstance(example, dict):
        return None, "expected a JSON object with 'ctx', 'endings' and 'label'"
    ctx, endings, label = example.get("ctx"), example.get("endings"), example.get("label")
    if not isinstance(ctx, str) or not ctx.strip():
        return None, "'ctx' must be a non-empty string"
    if not (isinstance(endings, list) and len(endings) == N_ENDINGS
            and all(isinstance(e, str) and e.strip() for e in endings)):
        return None, f"'endings' must be a list of {N_ENDINGS} non-empty strings"
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        return None, f"'label' must be an integer from 0 to {N_ENDINGS - 1}, got {label!r}"
    return example, ""


MAX_NAMED_LINES = 8  # bad lines named one by one in the error; more are counted


def bad_lines_error(path: Path, bad: list[tuple[int, str]], fix: str) -> UserError:
    """One line naming each bad line as FILE:LINE: PROBLEM (the first MAX_NAMED_LINES, then how many more)."""
    named = "; ".join(f"{path}:{number}: {problem}" for number, problem in bad[:MAX_NAMED_LINES])
    more = (f"; and {len(bad) - MAX_NAMED_LINES:,} more bad lines, the last at line {bad[-1][0]}"
            if len(bad) > MAX_NAMED_LINES else "")
    return UserError(f"{named}{more}; {fix} {'that line' if len(bad) == 1 else 'those lines'}")


def numbered_examples(path) -> list[tuple[int, dict]]:
    """(line number, example) of every example of a HellaSwag jsonl file (blank lines skipped); one UserError
    naming every bad line (not UTF-8: with its byte offset in the file; not JSON; a field the scorer cannot use)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"HellaSwag file {path} is a folder, not a jsonl file; pass --data FILE "
                        f"(e.g. {SAMPLE_FILE.relative_to(REPO_DIR)})")
    if not path.is_file():
        raise UserError(f"HellaSwag file {path} does not exist; pass --data FILE "
                        f"(e.g. {SAMPLE_FILE.relative_to(REPO_DIR)})")
    numbered, bad = [], []
    with open(path, "rb") as f:
        for number, line, problem in utf8_lines(f):
            if not problem and line.strip():
                example, problem = _example_problem(line)
                if not problem:
                    numbered.append((number, example))
            if problem:
                bad.append((number, problem))
    if bad:
        raise bad_lines_error(path, bad, "fix or remove")
    if not numbered:
        raise UserError(f"HellaSwag file {path} holds no examples")
    return numbered


def read_examples(path) -> list[dict]:
    """Every example of a HellaSwag jsonl file (blank lines skipped); UserError naming its bad lines."""
    return [example for _, example in numbered_examples(path)]


def _check_official(examples: list, path: Path, expected: int) -> None:
    if len(examples) != expected:
        raise UserError(f"{path} has {len(examples)} examples, the official validation split has {expected}; "
                        f"delete it to download it again")


def download_official(dest: Path, url: str, expected: int) -> None:
    """Fetch the validation file to a temporary name, check it (example count, schema of every line), then rename
    it to `dest`, so an interrupted or wrong download never sits under the cached name; a failed one leaves no
    folder it made either."""
    made = first_new_folder(dest.parent)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        fetch_and_check(dest, url, expected)
    except BaseException:
        if made is not None:
            remove_empty_folders(dest.parent, made)
        raise


def fetch_and_check(dest: Path, url: str, expected: int) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f, tqdm(
                    total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                    desc="download HellaSwag val") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as e:
            reason = str(getattr(e, "reason", e)).replace("\n", " ")
            raise UserError(f"cannot download the HellaSwag validation set from {url} ({reason}); run once with "
                            f"internet access, or give a HellaSwag file (hellaswag_eval.py --data, train.py --hellaswag-data; "
                            f"e.g. {SAMPLE_FILE.relative_to(REPO_DIR)})")
        try:
            _check_official(read_examples(tmp), dest, expected)
        except UserError as e:
            raise UserError(f"the download from {url} failed its integrity check: {e}")
        os.replace(tmp, dest)
    finally:  # (Ctrl-C included)
        tmp.unlink(missing_ok=True)


def load_numbered(path=None) -> tuple[Path, list[tuple[int, dict]]]:
    """(the file, its (line number, example) pairs): a jsonl file, or (path None) the official validation split,
    downloaded once into temp_data/hellaswag/."""
    if path is None:
        if not CACHE_FILE.is_file():
            download_official(CACHE_FILE, OFFICIAL_URL, OFFICIAL_EXAMPLES)
        numbered = numbered_examples(CACHE_FILE)
        _check_official(numbered, CACHE_FILE, OFFICIAL_EXAMPLES)
        return CACHE_FILE, numbered
    return Path(path), numbered_examples(path)


def load_examples(path=None, limit: int | None = None, block_size: int | None = None) -> list[dict]:
    """HellaSwag examples from a jsonl file, or (path None) the official validation split, downloaded once into
    temp_data/hellaswag/. `limit` keeps the first N. `block_size` (a model's context): each kept example's endings
    are tokenized and checked to fit it now (check_fits), not when the scorer reaches them."""
    file, numbered = load_numbered(path)
    numbered = numbered[:limit] if limit is not None else numbered
    if block_size is not None:
        check_fits(file, numbered, block_size)
    return [example for _, example in numbered]


def check_fits(path: Path, numbered: list[tuple[int, dict]], block_size: int) -> None:
    """One UserError naming every line of `path` with an ending too long for a model of context `block_size`
    (example_rows' rule: the ending is never cropped), found before a model is built or an example scored."""
    enc = get_tokenizer()
    bad = []
    for number, example in numbered:
        lengths = [len(enc.encode(" " + ending)) for ending in example["endings"]]
        too_long = [(i, n) for i, n in enumerate(lengths) if not ending_fits(n, block_size)]
        if too_long:
            bad.append((number, "ending " + ", ".join(f"{i} has {n:,} tokens" for i, n in too_long)))
    if bad:
        raise bad_lines_error(path, bad, f"every ending must fit the model's context of {block_size} tokens: "
                                         "shorten or remove")


# ----------------------------------------------------------------------------------------------------------------
# Scoring

def example_rows(example: dict, enc, block_size: int) -> list[tuple[list[int], int]]:
    """The 4 scored sequences of an example: (context + ending tokens, number of ending tokens) each.

    A sequence of n tokens is fed as n - 1 inputs, so it fits when n - 1 <= block_size; longer ones lose context
    tokens from the left. The ending is never cropped (its first token needs at least one context token before it).
    """
    ctx = enc.encode(example["ctx"])
    rows = []
    for ending in example["endings"]:
        completion = enc.encode(" " + ending)
        room = block_size + 1 - len(completion)  # context tokens that still fit
        if not ending_fits(len(completion), block_size):
            raise UserError(f"HellaSwag ending {ending[:40]!r}... has {len(completion)} tokens, too long for the "
                            f"model's context of {block_size}")
        rows.append((ctx[-room:] + completion, len(completion)))
    return rows


def ending_fits(tokens: int, block_size: int) -> bool:
    """Whether an ending of `tokens` tokens fits a model of context `block_size`: it needs at least one context
    token before it, and the n - 1 inputs of a sequence of n tokens must fit."""
    return tokens <= block_size


def _batch_tensors(rows: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs (R, T) and targets (R, T) where only completion tokens are kept (others IGNORE_INDEX)."""
    T = max(len(tokens) for tokens, _ in rows) - 1
    inputs = torch.full((len(rows), T), EOT_ID, dtype=torch.long)  # any valid id: causal attention never sees it
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for r, (tokens, n_completion) in enumerate(rows):
        length = len(tokens) - 1
        inputs[r, :length] = torch.tensor(tokens[:-1])
        targets[r, length - n_completion:length] = torch.tensor(tokens[-n_completion:])
    return inputs, targets


@torch.no_grad()
def completion_logprob_sums(model: GPT, rows: list[tuple[list[int], int]], device) -> torch.Tensor:
    """Sum of log-probs of each row's completion tokens, (R,) on the CPU, from one forward pass."""
    inputs, targets = (t.to(device) for t in _batch_tensors(rows))
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=inputs.device.type == "cuda"):
        logits, _ = model(inputs)  # (R, T, V)
    scored = targets != IGNORE_INDEX  # (R, T)
    picked = logits[scored]  # (N, V): completion positions only, so the float copy stays small
    # log_softmax in at least float32 (bf16 loses too much); float64 models stay float64.
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))
    token_logprobs = picked.log_softmax(-1).gather(1, targets[scored][:, None])[:, 0]  # (N,)
    row_of_token = torch.arange(len(rows), device=inputs.device)[:, None].expand_as(scored)[scored]  # (N,)
    sums = torch.zeros(len(rows), dtype=token_logprobs.dtype, device=inputs.device)
    return sums.index_add_(0, row_of_token, token_logprobs).cpu()


def score_examples(model: GPT, examples: list[dict], device, batch_size: int = 16,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion log-probs, completion token counts), each (N, 4), for the examples in order."""
    enc = get_tokenizer()
    sums, counts = [], []
    for start in tqdm(range(0, len(examples), batch_size), desc="HellaSwag", unit="batch", disable=not progress):
        batch = examples[start:start + batch_size]
        rows = [row for ex in batch for row in example_rows(ex, enc, model.config.block_size)]
        sums.append(completion_logprob_sums(model, rows, device).view(-1, N_ENDINGS))
        counts.append(torch.tensor([n for _, n in rows]).view(-1, N_ENDINGS))
    if not sums:
        return torch.zeros(0, N_ENDINGS), torch.zeros(0, N_ENDINGS, dtype=torch.long)
    return torch.cat(sums), torch.cat(counts)


def evaluate_hellaswag(model: GPT, examples: list[dict], device, batch_size: int = 16, rank: int = 0,
                       world_size: int = 1, progress: bool = False) -> dict:
    """acc and acc_norm (fractions) with their counts over all examples; each rank scores examples[rank::world_size]
    and the counts are summed over ranks. Every rank must call it when world_size > 1.

    Safe on a live training model: it switches to eval mode and back, draws no random numbers, and needs the plain
    (uncompiled) module.
    """
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("evaluate_hellaswag with world_size > 1 needs an initialized torch.distributed process group")
    mine = examples[rank::world_size]
    with evaluating(model):
        sums, counts = score_examples(model, mine, device, batch_size, progress=progress and rank == 0)
    labels = torch.tensor([ex["label"] for ex in mine], dtype=torch.long)
    correct = int((sums.argmax(1) == labels).sum())
    correct_norm = int(((sums / counts).argmax(1) == labels).sum())
    totals = torch.tensor([correct, correct_norm, len(mine)], dtype=torch.long, device=device)
    if world_size > 1:
        dist.all_reduce(totals)
    correct, correct_norm, total = totals.tolist()
    return {"acc": correct / max(total, 1), "acc_norm": correct_norm / max(total, 1),
            "correct": correct, "correct_norm": correct_norm, "total": total}


# ----------------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=path_arg,
                        help="a checkpoint file, or a run directory (its newest valid checkpoint is used)")
    parser.add_argument("--download-only", action="store_true",
                        help="only download (and check) the official validation split into temp_data/hellaswag/")
    parser.add_argument("--data", type=path_arg,
                        help="a HellaSwag jsonl file (default: the official validation split, downloaded "
                                       f"once into temp_data/hellaswag/; offline: {SAMPLE_FILE.relative_to(REPO_DIR)})")
    parser.add_argument("--limit", type=positive_int, help="score only the first N examples (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="examples per forward pass, each 4 rows (default: 16)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available; under torchrun "
                                         "each process takes cuda:LOCAL_RANK)")
    parser.add_argument("--out", type=path_arg, help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.download_only:
        parser.error("--checkpoint is required (unless --download-only)")
    return args


@main_entry(memory_hint="lower --batch-size")
def main(argv=None):
    args = parse_args(argv)
    if args.download_only:
        print(f"HellaSwag validation: {len(load_examples(args.data))} examples ready")
        return
    # Refused now, not after the whole evaluation, every problem in one line: the checkpoint (peeked: its tensors
    # not built), every bad line of the data, an --out that is a folder, a file not ours or in a folder that takes
    # no file, the device; then the checkpoint loaded (the fallback past a damaged one) together with each scored
    # example's endings against the model's context (tokenized: seconds), before a model is built.
    (peeked, _), (data_file, numbered), *_ = raise_all(
        lambda: load_checkpoint(args.checkpoint, peek=True), lambda: load_numbered(args.data),
        lambda: args.out and check_result_out(args.out, WRITTEN_BY),  # (its folder checked, not made)
        lambda: checked_device(args.device, int(os.environ.get("LOCAL_RANK", 0))))
    block_size = peeked["model_config"]["block_size"]
    chosen = numbered[:args.limit] if args.limit is not None else numbered
    (state, checkpoint_file), _ = raise_all(lambda: load_checkpoint(args.checkpoint),  # past a damaged newest one
                                            lambda: check_fits(data_file, chosen, block_size))
    if state["model_config"]["block_size"] != block_size:  # a fallback of another context
        check_fits(data_file, chosen, state["model_config"]["block_size"])
    d, device = init_distributed(args.device)
    rank, world_size = d.rank, d.world_size
    try:
        model = model_from_state(state, checkpoint_file, device)
        examples = [example for _, example in chosen]
        result = evaluate_hellaswag(model, examples, device, args.batch_size, rank, world_size, progress=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        total, step = result["total"], state.get("step")
        short = (f": --limit {args.limit} is more than the {len(numbered):,} examples of {data_file}"
                 if args.limit is not None and args.limit > len(numbered) else "")
        print(f"HellaSwag ({total:,} example{'' if total == 1 else 's'}{short}) of {checkpoint_file}"
              f"{'' if step is None else f' (step {step:,})'}: acc {result['acc']:.4f} "
              f"({result['correct']}/{total}), acc_norm {result['acc_norm']:.4f} ({result['correct_norm']}/{total})")
        if args.out:
            source = {"checkpoint": str(args.checkpoint), "checkpoint_file": str(checkpoint_file), "step": step,
                      "data": str(args.data or OFFICIAL_URL)}
            write_json(args.out, {**result, **source}, written_by=WRITTEN_BY)
            print(f"wrote {args.out}")


if __name__ == "__main__":
    exit_with(main)
