import gzip
import importlib
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import tiktoken

from app.services import tokens
from app.services.tokens import (
    CL100K_BASE,
    DEFAULT_TABLES_DIR,
    O200K_BASE,
    REPLY_PRIMING_TOKENS,
    TokenCount,
    Tokenizer,
    TokenTableError,
    load_encoding,
    table_path,
)

# Counts from the encodings built here, cross-checked against bpe-openai 0.1.4's own Rust
# tokenizer (`tokenizer_for_encoding(name).count(text)`), which gave the same numbers.
KNOWN_COUNTS = [
    ("hello world", 2, 2),
    ("Hello, world!", 4, 4),
    ("The quick brown fox jumps over the lazy dog.", 10, 10),
    ("tiktoken is great!", 6, 6),
    ("antidisestablishmentarianism", 6, 6),
    ("こんにちは世界", 2, 4),
    ("Ünïcödé façade \u2013 naïve café", 10, 13),
    ("def add(a, b):\n    return a + b\n", 12, 12),
    ("1234567890", 4, 4),
    ("", 0, 0),
]

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


def _len(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode(text))


@pytest.mark.parametrize(("text", "o200k", "cl100k"), KNOWN_COUNTS)
def test_known_strings_count_exactly(tokenizer: Tokenizer, text: str, o200k: int, cl100k: int) -> None:
    assert tokenizer.count_text(text, "gpt-4o") == TokenCount(tokens=o200k, exact=True, encoding=O200K_BASE)
    assert tokenizer.count_text(text, "gpt-4") == TokenCount(tokens=cl100k, exact=True, encoding=CL100K_BASE)


def test_hello_world_is_two_tokens_in_both_encodings(tokenizer: Tokenizer) -> None:
    assert tokenizer.encoding(O200K_BASE).encode("hello world") == [24912, 2375]
    assert tokenizer.encoding(CL100K_BASE).encode("hello world") == [15339, 1917]


def test_pattern_and_special_tokens_match_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    # tiktoken's own constructors, with the download replaced by an empty table.
    openai_public = importlib.import_module("tiktoken_ext.openai_public")  # untyped, hence not imported directly
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *_a, **_k: {})
    for name in (O200K_BASE, CL100K_BASE):
        upstream: dict[str, Any] = getattr(openai_public, name)()
        enc = load_encoding(name)
        assert enc._pat_str == upstream["pat_str"]
        assert enc._special_tokens == upstream["special_tokens"]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", O200K_BASE),
        ("gpt-4o-2024-08-06", O200K_BASE),
        ("gpt-4o-mini", O200K_BASE),
        ("chatgpt-4o-latest", O200K_BASE),
        ("gpt-4.1-nano", O200K_BASE),
        ("gpt-4.5-preview", O200K_BASE),
        ("gpt-5", O200K_BASE),
        ("gpt-5-mini-2025-08-07", O200K_BASE),
        ("gpt-5.1", O200K_BASE),
        ("o1", O200K_BASE),
        ("o3-mini", O200K_BASE),
        ("o4-mini", O200K_BASE),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", O200K_BASE),
        ("gpt-4", CL100K_BASE),
        ("gpt-4-0613", CL100K_BASE),
        ("gpt-4-turbo", CL100K_BASE),
        ("gpt-3.5-turbo-0125", CL100K_BASE),
        ("text-embedding-3-small", CL100K_BASE),
        ("smollm2-135m-instruct", None),
        ("llama-3", None),
        ("o10-local", None),
        ("gpt-4omni-local", None),
    ],
)
def test_encoding_for_model(tokenizer: Tokenizer, model: str, expected: str | None) -> None:
    assert tokenizer.encoding_for_model(model) == expected


def test_unknown_model_is_an_o200k_estimate(tokenizer: Tokenizer) -> None:
    assert tokenizer.count_text("hello world", "llama-3") == TokenCount(tokens=2, exact=False, encoding=O200K_BASE)
    assert tokenizer.count_messages(CHAT, "smollm2") == TokenCount(tokens=24, exact=False, encoding=O200K_BASE)


def test_special_token_text_counts_as_plain_text(tokenizer: Tokenizer) -> None:
    text = "before <|endoftext|> after <|endofprompt|>"
    enc = tokenizer.encoding(O200K_BASE)
    assert tokenizer.count_text(text, "gpt-4o").tokens == len(enc.encode_ordinary(text))
    assert tokenizer.count_text("<|endoftext|>", "gpt-4o").tokens == 7
    assert tokenizer.count_text("<|endoftext|>", "gpt-3.5-turbo").tokens == 7
    assert tokenizer.count_messages([{"role": "user", "content": "<|fim_prefix|>"}], "gpt-4").tokens == 3 + 1 + 7 + 3


def test_lone_surrogate_does_not_raise(tokenizer: Tokenizer) -> None:
    assert tokenizer.count_text("\ud800 lone", "gpt-4o").tokens == 2


def test_two_message_chat_follows_cookbook_formula(tokenizer: Tokenizer) -> None:
    enc = tokenizer.encoding(O200K_BASE)
    by_hand = sum(3 + _len(enc, m["role"]) + _len(enc, m["content"]) for m in CHAT) + 3
    assert by_hand == 3 + (3 + 1 + 6) + (3 + 1 + 7)
    assert tokenizer.count_messages(CHAT, "gpt-4o") == TokenCount(tokens=by_hand, exact=True, encoding=O200K_BASE)
    assert by_hand == 24


def test_two_message_chat_in_cl100k(tokenizer: Tokenizer) -> None:
    enc = tokenizer.encoding(CL100K_BASE)
    by_hand = sum(3 + _len(enc, m["role"]) + _len(enc, m["content"]) for m in CHAT) + 3
    assert tokenizer.count_messages(CHAT, "gpt-3.5-turbo").tokens == by_hand == 24


def test_name_costs_one_extra_token(tokenizer: Tokenizer) -> None:
    message = {"role": "user", "name": "bob", "content": "Paris."}
    assert tokenizer.count_message(message, "gpt-4o") == 3 + 1 + 1 + 1 + 2


def test_per_message_counts_add_up_to_the_chat_count(tokenizer: Tokenizer) -> None:
    per_message = [tokenizer.count_message(m, "gpt-4o") for m in CHAT]
    assert per_message == [10, 11]
    assert sum(per_message) + REPLY_PRIMING_TOKENS == tokenizer.count_messages(CHAT, "gpt-4o").tokens


def test_content_parts_count_their_text(tokenizer: Tokenizer) -> None:
    message = {
        "role": "user",
        "content": [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}],
    }
    assert tokenizer.count_message(message, "gpt-4o") == 3 + 1 + 4 + 3


def test_image_part_is_not_counted_and_marks_count_inexact(tokenizer: Tokenizer) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello world"}, image]}]
    assert tokenizer.count_messages(messages, "gpt-4o") == TokenCount(
        tokens=3 + 1 + 2 + 3, exact=False, encoding=O200K_BASE
    )


def test_tool_calls_count_function_name_and_arguments(tokenizer: Tokenizer) -> None:
    enc = tokenizer.encoding(O200K_BASE)
    arguments = '{"city": "Paris"}'
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
        ],
    }
    assert tokenizer.count_message(call, "gpt-4o") == 3 + 1 + _len(enc, "get_weather") + _len(enc, arguments) == 12
    result = {"role": "tool", "tool_call_id": "call_1", "content": "18C"}
    assert tokenizer.count_message(result, "gpt-4o") == 3 + 1 + _len(enc, "call_1") + _len(enc, "18C")


def test_corrupted_table_raises_naming_the_file(tmp_path: Path) -> None:
    data = bytearray(gzip.decompress(table_path(CL100K_BASE).read_bytes()))
    data[1000] ^= 0x01
    table_path(CL100K_BASE, tmp_path).write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(TokenTableError, match="SHA-256 mismatch") as info:
        Tokenizer(tmp_path).count_text("hello world", "gpt-4")
    assert info.value.path == tmp_path / "cl100k_base.tiktoken.gz"
    assert str(tmp_path / "cl100k_base.tiktoken.gz") in str(info.value)


def test_damaged_gzip_raises_naming_the_file(tmp_path: Path) -> None:
    path = table_path(O200K_BASE, tmp_path)
    shutil.copyfile(table_path(O200K_BASE), path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(TokenTableError, match="unreadable") as info:
        load_encoding(O200K_BASE, tmp_path)
    assert str(path) in str(info.value)


def test_missing_table_raises_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(TokenTableError, match="file not found") as info:
        Tokenizer(tmp_path).preload([O200K_BASE])
    assert str(tmp_path / "o200k_base.tiktoken.gz") in str(info.value)


def test_unknown_encoding_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown encoding 'p50k_base'"):
        load_encoding("p50k_base")


def test_shipped_tables_are_in_the_default_dir() -> None:
    assert sorted(p.name for p in DEFAULT_TABLES_DIR.iterdir()) == ["cl100k_base.tiktoken.gz", "o200k_base.tiktoken.gz"]


def test_concurrent_first_use_loads_each_encoding_once(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    real_load = tokens.load_encoding

    def counting_load(name: str, tables_dir: Path = DEFAULT_TABLES_DIR) -> tiktoken.Encoding:
        loads.append(name)
        return real_load(name, tables_dir)

    monkeypatch.setattr(tokens, "load_encoding", counting_load)
    shared = Tokenizer()
    results: list[tiktoken.Encoding] = []
    lock = threading.Lock()

    def use() -> None:
        enc = shared.encoding(CL100K_BASE)
        with lock:
            results.append(enc)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == [CL100K_BASE]
    assert len(results) == 8
    assert all(enc is results[0] for enc in results)
