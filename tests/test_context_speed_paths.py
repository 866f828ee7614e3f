"""The window read in pages sized from stored token counts (app/services/context.py).

Pages are sized from the previous page's average message size, so chats whose sizes change
sharply make the estimate short (more pages) or long (a page reads more than it keeps): either
way the window keeps exactly the newest messages that fit, as if the whole chat were read.
Messages are stored directly with chosen token counts so that every expected value is exact.
"""

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.ext.asyncio import create_async_engine

from app.db.models import Chat, Message
from app.services.tokens import Tokenizer
from tests.conftest import Caller
from tests.test_context import preview, send

BUDGET = 2000  # the chats' max_context_tokens: 1,997 tokens of room beside the 3 reply-priming ones
CALL = {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": "{}"}}


def _message(seq: int, tokens: int | None, role: str = "user", **fields: Any) -> dict[str, Any]:
    """A stored message at `seq` whose o200k_base count is `tokens` (None: stored without a count)."""
    return {
        "role": role,
        "content": f"message {seq}",
        "tool_calls": None,
        "tool_call_id": None,
        "token_count": tokens,
        "token_encoding": None if tokens is None else "o200k_base",
    } | fields


async def _store_async(url: str, caller: Caller, chat_id: str, messages: list[dict[str, Any]]) -> None:
    engine = create_async_engine(url)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        {
            "id": f"msg_page_{seq:05d}",
            "chat_id": chat_id,
            "user_id": caller.user_id,
            "seq": seq,
            "status": "complete",
            "pinned": False,
            "active": True,
            "created_at": start + timedelta(seconds=seq),
        }
        | m
        for seq, m in enumerate(messages, start=1)
    ]
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(Message), rows)
            await conn.execute(
                update(Chat).where(Chat.id == chat_id).values(next_seq=len(rows) + 1, message_count=len(rows))
            )
    finally:
        await engine.dispose()


def store(database_url: str, caller: Caller, chat_id: str, messages: list[dict[str, Any]]) -> None:
    """Store `messages` as the chat's whole history, at positions 1, 2, ..."""
    asyncio.run(_store_async(database_url, caller, chat_id, messages))


def ids(first: int, last: int) -> list[str]:
    return [f"msg_page_{seq:05d}" for seq in range(first, last + 1)]


def test_window_keeps_reading_when_older_messages_are_much_smaller(alice: Caller, database_url: str) -> None:
    # 300 messages of 6 tokens, then 16 of 100: sized from the large newest ones, the next page
    # is far too short for the room they leave (397 tokens: 66 small messages).
    chat = alice.chat(context={"max_context_tokens": BUDGET})
    store(
        database_url,
        alice,
        chat["id"],
        [_message(s, 6) for s in range(1, 301)] + [_message(s, 100) for s in range(301, 317)],
    )
    view = preview(alice, chat["id"])
    assert [m["message_id"] for m in view["messages"]] == ids(235, 316)
    assert [m["tokens"] for m in view["messages"]] == [6] * 66 + [100] * 16
    assert view["total_tokens"] == 66 * 6 + 16 * 100 + 3 == 1999
    assert view["dropped"] == {"reason": "window", "messages": 234, "before_seq": 235}


def test_window_stops_at_the_first_misfit_when_older_messages_are_much_larger(alice: Caller, database_url: str) -> None:
    # 50 messages of 150 tokens, then 40 of 6: sized from the small newest ones, a page reads
    # more than fits; the 1,757 tokens they leave hold 11 of the large ones.
    chat = alice.chat(context={"max_context_tokens": BUDGET})
    store(
        database_url,
        alice,
        chat["id"],
        [_message(s, 150) for s in range(1, 51)] + [_message(s, 6) for s in range(51, 91)],
    )
    view = preview(alice, chat["id"])
    assert [m["message_id"] for m in view["messages"]] == ids(40, 90)
    assert view["total_tokens"] == 11 * 150 + 40 * 6 + 3 == 1893
    assert view["dropped"] == {"reason": "window", "messages": 39, "before_seq": 40}


def _tool_chat(result_tokens: int) -> list[dict[str, Any]]:
    """50 messages of 10 tokens, a tool call (30) with three results, then 13 messages of 100 tokens:
    the first page (16 messages) ends inside the tool call's unit."""
    older = [_message(s, 10) for s in range(1, 51)]
    call = [_message(51, 30, "assistant", content="", tool_calls=[CALL])]
    results = [_message(s, result_tokens, "tool", tool_call_id="call_1") for s in range(52, 55)]
    newest = [_message(s, 100, "assistant" if s % 2 else "user") for s in range(55, 68)]
    return older + call + results + newest


def test_a_tool_call_split_by_a_page_is_kept_whole(alice: Caller, database_url: str) -> None:
    chat = alice.chat(context={"max_context_tokens": BUDGET})
    store(database_url, alice, chat["id"], _tool_chat(result_tokens=20))
    view = preview(alice, chat["id"])
    assert [m["message_id"] for m in view["messages"]] == ids(1, 67)
    assert [m["role"] for m in view["messages"][50:54]] == ["assistant", "tool", "tool", "tool"]
    assert view["total_tokens"] == 50 * 10 + 30 + 3 * 20 + 13 * 100 + 3 == 1893
    assert view["dropped"] is None


def test_a_tool_call_split_by_a_page_is_dropped_whole(alice: Caller, database_url: str) -> None:
    # The call and its results need 930 tokens; 697 are left after the 13 newest messages.
    chat = alice.chat(context={"max_context_tokens": BUDGET})
    store(database_url, alice, chat["id"], _tool_chat(result_tokens=300))
    view = preview(alice, chat["id"])
    assert [m["message_id"] for m in view["messages"]] == ids(55, 67)
    assert view["total_tokens"] == 13 * 100 + 3 == 1303
    assert view["dropped"] == {"reason": "window", "messages": 54, "before_seq": 55}


def test_messages_without_a_count_for_the_chats_encoding_are_counted_afresh(alice: Caller, database_url: str) -> None:
    # Counts stored for o200k_base (or none at all) are not gpt-4's: each message is counted again.
    tokenizer = Tokenizer()
    chat = alice.chat(model="gpt-4", context={"max_context_tokens": BUDGET})
    stored = [_message(s, 500 if s % 3 else None) for s in range(1, 41)]
    store(database_url, alice, chat["id"], stored)
    view = preview(alice, chat["id"])
    expected = [tokenizer.count_message({"role": "user", "content": f"message {s}"}, "gpt-4") for s in range(1, 41)]
    assert [m["tokens"] for m in view["messages"]] == expected
    assert view["total_tokens"] == sum(expected) + 3
    assert view["dropped"] is None


def test_none_strategy_counts_afresh_what_lies_below_the_window(alice: Caller, database_url: str) -> None:
    # 2,000 messages with o200k_base counts in a gpt-4 chat: the refusal names gpt-4's total.
    tokenizer = Tokenizer()
    chat = alice.chat(model="gpt-4", context={"strategy": "none", "max_context_tokens": BUDGET})
    store(database_url, alice, chat["id"], [_message(s, 1) for s in range(1, 2001)])
    needed = 3 + sum(
        tokenizer.count_message({"role": "user", "content": f"message {s}"}, "gpt-4") for s in range(1, 2001)
    )
    needed += tokenizer.count_message({"role": "user", "content": "one more"}, "gpt-4")
    response = send(alice, chat["id"], "one more")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        f"This chat needs about {needed} tokens of context but gpt-4 allows {BUDGET} here; use the 'window' or "
        "'summary' strategy, or clear older messages."
    )
