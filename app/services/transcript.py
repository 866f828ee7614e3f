"""Transcripts in OpenAI's `messages` format: the order rules of tool calls, and Markdown for people.

A `tool` message answers one call of the assistant message it follows: only
other tool messages may stand between them, each call is answered at most
once, and every call is answered before the next non-tool message. Calls left
unanswered at the end of a transcript are fine (their answers may be saved later).
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, ClassVar

from app.core.errors import InvalidRequestError
from app.db.models import Chat
from app.schemas.history import MAX_TOOL_CALLS, HistoryMessage


@dataclass(slots=True)
class ToolCallState:
    """The calls of the latest assistant message, and those already answered."""

    # How many of a chat's last messages can bear on the next one.
    LOOKBACK: ClassVar[int] = MAX_TOOL_CALLS + 1

    calls: set[str] | None = None  # None: no tool message may come next
    answered: set[str] = field(default_factory=set)

    @classmethod
    def from_tail(cls, tail: Sequence[tuple[str, list[Any] | None, str | None]]) -> "ToolCallState":
        """The state a chat's stored messages leave, from (role, tool_calls, tool_call_id), newest first."""
        answered: set[str] = set()
        for role, calls, call_id in tail:
            if role == "tool":
                if call_id is not None:
                    answered.add(call_id)
                continue
            if role == "assistant" and calls:
                return cls({str(call.get("id")) for call in calls if isinstance(call, dict)}, answered)
            break
        return cls()

    def unanswered(self) -> list[str]:
        return sorted((self.calls or set()) - self.answered)


def check_order(messages: Sequence[HistoryMessage], state: ToolCallState) -> None:
    """Refuse a tool message that answers no open call, and a turn that leaves calls unanswered."""
    for i, message in enumerate(messages):
        if message.role == "tool":
            call_id = message.tool_call_id
            if state.calls is None or call_id not in state.calls:
                raise InvalidRequestError(
                    f"Invalid value for 'messages.{i}.tool_call_id': a tool message must follow the assistant "
                    f"message whose `tool_calls` include '{call_id}' (only other tool messages between them).",
                    param=f"messages.{i}.tool_call_id",
                    code="invalid_message_order",
                )
            if call_id in state.answered:
                raise InvalidRequestError(
                    f"Invalid value for 'messages.{i}.tool_call_id': tool call '{call_id}' is already answered.",
                    param=f"messages.{i}.tool_call_id",
                    code="invalid_message_order",
                )
            state.answered.add(call_id)
            continue
        missing = state.unanswered()
        if missing:
            raise InvalidRequestError(
                f"Invalid value for 'messages.{i}': tool call '{missing[0]}' of an earlier assistant message "
                "has no tool message before this one.",
                param=f"messages.{i}",
                code="invalid_message_order",
            )
        calls = message.tool_calls if message.role == "assistant" else None
        state = ToolCallState({call.id for call in calls}) if calls else ToolCallState()


# --------------------------------------------------------------------------- Markdown

_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
_BACKTICKS = re.compile(r"`+")


def _inline(text: str) -> str:
    """User text on one line, every ASCII punctuation mark escaped, so nothing in it is markup."""
    return _PUNCTUATION.sub(r"\\\1", " ".join(text.splitlines()))


def _longest_backticks(text: str) -> int:
    return max((len(run) for run in _BACKTICKS.findall(text)), default=0)


def _code(value: object) -> str:
    """A code span showing `value` verbatim, on one line."""
    text = " ".join(str(value).splitlines())
    fence = "`" * (_longest_backticks(text) + 1)
    return f"{fence} {text} {fence}" if len(fence) > 1 else f"`{text}`"


def _fenced(text: str, info: str = "text") -> list[str]:
    """A code block that shows `text` verbatim: its fence is longer than any run of backticks in it."""
    fence = "`" * max(3, _longest_backticks(text) + 1)
    return [f"{fence}{info}", text.removesuffix("\n"), fence, ""]


def render_markdown(chat: Chat, body: dict[str, Any]) -> str:
    """A chat and its messages for reading; every piece of user or model text is shown, never interpreted."""
    lines = [f"# {_inline(chat.title) if chat.title else 'Untitled chat'}", ""]
    lines.append(f"- Chat: {_code(chat.id)}")
    if chat.model:
        lines.append(f"- Model: {_code(chat.model)}")
    lines.append(f"- Created: {chat.created_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC")
    lines.append(f"- Messages: {len(body['messages'])}")
    if chat.tags:
        lines.append("- Tags: " + ", ".join(_inline(tag) for tag in chat.tags))
    lines.append("")
    for heading, text in (("System prompt", chat.system_prompt), ("Instructions", chat.instructions)):
        if text:
            lines += [f"## {heading}", "", *_fenced(text)]
    for number, message in enumerate(body["messages"], 1):
        heading = f"## {number}. {message['role'].capitalize()}"
        if "name" in message:
            heading += f" ({_inline(message['name'])})"
        if "tool_call_id" in message:
            heading += f", answering {_code(message['tool_call_id'])}"
        lines += [heading, ""]
        if message["content"]:
            lines += _fenced(message["content"])
        elif not message.get("tool_calls"):
            lines += ["*(no text)*", ""]
        for call in message.get("tool_calls") or []:
            function = call.get("function", {})
            lines += [f"Tool call {_code(call.get('id'))}: {_code(function.get('name'))}", ""]
            lines += _fenced(str(function.get("arguments", "")), "json")
    return "\n".join(lines)
