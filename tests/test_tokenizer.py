import hashlib
import shutil

import pytest

import tokenizer
from cli import UserError


def test_known_ids():
    enc = tokenizer.get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("HTML stands for") == [28656, 6296, 329]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257


def test_ranks_hash_equals_tiktoken_r50k_base():
    assert tokenizer.tokenizer_sha256() == tokenizer.RANKS_SHA256


def test_unicode_round_trip():
    enc = tokenizer.get_tokenizer()
    text = "naïve café — 東京 🚀 \t\n  Ünïcödé\u200b ok <|endoftext|>"
    assert enc.decode(enc.encode(text, allowed_special="all")) == text
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_no_network_needed(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("tokenizer touched the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    tokenizer.get_tokenizer.cache_clear()
    assert tokenizer.get_tokenizer().encode("offline") == [2364, 1370]


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_corrupt_bpe_file_refused(tmp_path, monkeypatch, name):
    shutil.copytree(tokenizer.BPE_DIR, tmp_path / "bpe")
    path = tmp_path / "bpe" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    monkeypatch.setattr(tokenizer, "VOCAB_BPE", tmp_path / "bpe" / "vocab.bpe")
    monkeypatch.setattr(tokenizer, "ENCODER_JSON", tmp_path / "bpe" / "encoder.json")
    tokenizer.get_tokenizer.cache_clear()
    try:
        with pytest.raises(UserError, match=f"{name}.*corrupt"):
            tokenizer.get_tokenizer()
    finally:
        tokenizer.get_tokenizer.cache_clear()


def test_committed_files_hash():
    for path, sha in [(tokenizer.VOCAB_BPE, tokenizer.VOCAB_BPE_SHA256),
                      (tokenizer.ENCODER_JSON, tokenizer.ENCODER_JSON_SHA256)]:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
