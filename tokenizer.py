"""The GPT-2 byte-level BPE (tiktoken's `r50k_base`), built offline from files committed in this repo.

tiktoken normally downloads its BPE file on first use; compute nodes of GPU clusters often have no internet.
Here the encoding is assembled from OpenAI's original `encoder.json` + `vocab.bpe` (assets/gpt2_bpe/), each
checked by sha256 before use, so the result is byte-identical to `tiktoken.get_encoding("r50k_base")` and no
network access ever happens.
"""
import base64
import functools
import hashlib
import json
from pathlib import Path

import tiktoken

from cli import UserError

BPE_DIR = Path(__file__).resolve().parent / "assets" / "gpt2_bpe"
ENCODER_JSON = BPE_DIR / "encoder.json"
VOCAB_BPE = BPE_DIR / "vocab.bpe"
# The hashes tiktoken pins for these two files, and for the `.tiktoken` dump of the merged ranks.
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
# GPT-2's pre-tokenizer: contractions, letters, numbers, other symbols, whitespace runs.
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _read_verified(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"tokenizer file {path} cannot be read ({e.strerror}); restore it with "
                        f"`git checkout -- assets/gpt2_bpe/{path.name}`")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"tokenizer file {path} is corrupt (sha256 mismatch); restore it from the repository "
                        f"(`git checkout -- assets/gpt2_bpe/{path.name}`)")
    return data


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) are shifted to 256+n in the
    order they appear, so that every byte has a visible, non-whitespace stand-in inside vocab.bpe and encoder.json.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def _mergeable_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """Token bytes -> rank: the 256 single bytes first (in the map's order), then one token per merge line."""
    byte_map = _byte_to_unicode()
    char_to_byte = {c: b for b, c in byte_map.items()}
    ranks = {bytes([b]): rank for rank, b in enumerate(byte_map)}
    merge_lines = vocab_bpe.decode("utf-8").split("\n")[1:]  # line 0 is a version comment
    for line in merge_lines:
        if not line:
            continue
        first, second = line.split()
        ranks[bytes(char_to_byte[c] for c in first + second)] = len(ranks)

    # encoder.json must agree with the ranks derived from the merges (it also holds the special token).
    encoder = json.loads(encoder_json)
    derived = {"".join(byte_map[b] for b in token): rank for token, rank in ranks.items()}
    encoder.pop(EOT_TOKEN, None)
    if encoder != derived:
        raise UserError("tokenizer files encoder.json and vocab.bpe disagree; "
                        "restore assets/gpt2_bpe/ from the repository")
    return ranks


def ranks_sha256(ranks: dict[bytes, int]) -> str:
    """sha256 of the ranks written in tiktoken's `.tiktoken` format (base64 token, space, rank; ranks ascending)."""
    lines = (base64.b64encode(tok) + b" " + str(rank).encode() + b"\n"
             for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    return hashlib.sha256(b"".join(lines)).hexdigest()


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 / r50k_base `tiktoken.Encoding`, loaded from the committed BPE files (never from the network)."""
    ranks = _mergeable_ranks(_read_verified(VOCAB_BPE, VOCAB_BPE_SHA256),
                             _read_verified(ENCODER_JSON, ENCODER_JSON_SHA256))
    enc = tiktoken.Encoding(name="r50k_base", pat_str=PAT_STR, mergeable_ranks=ranks,
                            special_tokens={EOT_TOKEN: EOT_ID}, explicit_n_vocab=VOCAB_SIZE)
    assert enc.eot_token == EOT_ID
    return enc


def tokenizer_sha256() -> str:
    """The tokenizer's identity, stored in data manifests: the hash of its `.tiktoken` dump."""
    return ranks_sha256(get_tokenizer()._mergeable_ranks)
