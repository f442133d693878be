"""Chat templates render exactly as transformers renders them."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetero.errors import HeteroError
from hetero.tokenizer import Tokenizer, write_tokenizer

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And in Roman numerals, with “quotes” & <tags>? 🙂"},
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"}},
            "required": ["city"],
        },
    },
}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris and Zürich?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
        ],
    },
    {"role": "tool", "content": '{"temp": 18}'},
    {"role": "tool", "content": '{"temp": 12}'},
    {"role": "assistant", "content": "<think>\nBoth cities answered.\n</think>\n\nParis 18°C, Zürich 12°C."},
    {"role": "user", "content": "Thanks!"},
]
REASONING_CHAT = [
    {"role": "user", "content": "Think first: is 91 prime?"},
    {"role": "assistant", "content": "No, 91 = 7 × 13.", "reasoning_content": "Try 7: 7 × 13 = 91."},
    {"role": "user", "content": "And 97?"},
    {"role": "assistant", "content": "<think>\nNo divisor up to 9.\n</think>\n\nYes, 97 is prime."},
]
FAMILIES = {"deepseek": ("deepseek_v3", "deepseek-v3"), "qwen": ("qwen3_moe", "qwen3-30b-a3b")}
FAMILIES["mixtral"] = ("mixtral", "mixtral-8x7b")


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    out = {}
    for name, (family, preset) in FAMILIES.items():
        path: Path = tmp_path_factory.mktemp(f"chat-{name}")
        write_tokenizer(family, preset, path)
        out[name] = (Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path))
    return out


def assert_same(pair, messages, **kwargs):
    ours, ref = pair
    for generation_prompt in (True, False):
        text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, **kwargs)
        expected = ref.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False, **kwargs
        )
        assert text == expected
    ids = ours.apply_chat_template(messages, tokenize=True, **kwargs)
    ref_ids = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
    assert ids == list(ref_ids)
    return text


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("system", [False, True])
def test_multi_turn(tokenizers, name, system):
    messages = [SYSTEM, *TURNS] if system else TURNS
    text = assert_same(tokenizers[name], messages)
    if system:
        assert SYSTEM["content"] in text


def test_deepseek_template_is_the_packaged_one(tokenizers):
    ours, _ = tokenizers["deepseek"]
    text = ours.apply_chat_template([SYSTEM, *TURNS])
    assert text.startswith("<｜begin▁of▁sentence｜>" + SYSTEM["content"] + "<｜User｜>What is 2+2?")
    assert text.endswith("<｜Assistant｜>")
    assert ours.apply_chat_template(TURNS, tokenize=True)[0] == ours.bos_token_id


def test_deepseek_tool_calls(tokenizers):
    # transformers drops keys whose value is None before rendering, so compare with empty content;
    # hetero keeps None, which this template checks for (OpenAI clients send null content with tool calls).
    chat = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "content": '{"temp": 18}'},
        {"role": "assistant", "content": "18°C."},
    ]
    assert_same(tokenizers["deepseek"], chat)
    ours, _ = tokenizers["deepseek"]
    with_none = ours.apply_chat_template([chat[0], {**chat[1], "content": None}, *chat[2:]])
    assert "<｜Assistant｜><｜tool▁calls▁begin｜>" in with_none


@pytest.mark.parametrize("system", [False, True])
def test_qwen_tools(tokenizers, system):
    messages = [SYSTEM, *TOOL_CHAT] if system else TOOL_CHAT
    text = assert_same(tokenizers["qwen"], messages, tools=[WEATHER_TOOL])
    assert "<tools>\n" + '{"type": "function"' in text and "Zürich" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n" + '{"temp": 18}' + "\n</tool_response>" in text
    assert "Both cities answered" not in text  # reasoning of earlier turns is dropped


def test_qwen_reasoning(tokenizers):
    text = assert_same(tokenizers["qwen"], REASONING_CHAT)
    assert "Try 7" not in text and "<think>\nNo divisor up to 9.\n</think>\n\nYes, 97 is prime." in text
    assert_same(tokenizers["qwen"], TURNS, enable_thinking=False)
    ours, _ = tokenizers["qwen"]
    assert ours.apply_chat_template(TURNS, enable_thinking=False).endswith("<think>\n\n</think>\n\n")


def test_mixtral_puts_system_prompt_in_last_user_turn(tokenizers):
    ours, _ = tokenizers["mixtral"]
    text = ours.apply_chat_template([SYSTEM, *TURNS], add_generation_prompt=False)
    assert text == (
        "<s>[INST] What is 2+2? [/INST] 4.</s>[INST] "
        + SYSTEM["content"]
        + "\n\n"
        + TURNS[2]["content"]
        + " [/INST]"
    )


def test_template_errors_and_sandbox(tokenizers):
    ours, ref = tokenizers["mixtral"]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        ours.apply_chat_template(bad)
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        ref.apply_chat_template(bad, tokenize=False)
    unsafe = Tokenizer(ours._tok, {"chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(jinja2.exceptions.SecurityError):
        unsafe.apply_chat_template(TURNS)
    with pytest.raises(HeteroError, match="chat_template"):
        Tokenizer(ours._tok, {}).apply_chat_template(TURNS)
    fancy = Tokenizer(
        ours._tok, {"chat_template": "{{ {'b': '<é>', 'a': [1]} | tojson }}|{{ strftime_now('%Y') }}"}
    )
    assert fancy.apply_chat_template([]).startswith('{"b": "<é>", "a": [1]}|20')
