"""What of a chat goes to the model, counted exactly in tokens.

Every request is laid out the same way:

    system prompt | the user's saved context | the chat's instructions    (never dropped)
    rolling summary of older messages                                     (strategy "summary")
    pinned messages and the newest messages, oldest first                 (the window)

and must fit `max_context_tokens`: the model's context window minus the tokens
reserved for the reply, minus a safety margin (a larger one when the model's
tokenizer is unknown and counts are estimates). Strategies differ only in what
happens to older messages that do not fit:

- `window` drops them, whole and oldest first;
- `summary` folds them into a rolling summary written by the model itself,
  stored with the last position it covers and reused until it must be extended;
- `none` drops nothing: a chat that does not fit is a 400 `context_length_exceeded`
  before any upstream call.

An assistant message that calls tools and the tool messages answering it form
one unit: kept or dropped together. Token counts are stored with each message
when it is written, so building a context reads only the window, newest first,
and never re-tokenises the history.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.config import Settings
from app.core.errors import InvalidRequestError
from app.db.models import Chat, ChatSummary, Message, UserContext
from app.services.catalog import ModelCatalog
from app.services.tokens import REPLY_PRIMING_TOKENS, Tokenizer

Strategy = Literal["window", "summary", "none"]
Kind = Literal["system", "user_context", "instructions", "summary", "message"]
PAGE = 1024  # message sizes read per query while filling the window, newest first
SUMMARY_MAX_TOKENS = 1024
SUMMARY_OVERHEAD = 12  # the summary message's role and its heading
UNKNOWN_TOKENIZER_MARGIN = 0.25  # extra headroom when counts are estimates (other tokenizers can need 20% more)


@dataclass(frozen=True, slots=True)
class Budget:
    """How many tokens the request may use."""

    context_window: int
    reserve_tokens: int
    safety_margin: int
    max_context_tokens: int


@dataclass(slots=True)
class Part:
    """One message of the upstream request and where it came from."""

    kind: Kind
    message: dict[str, Any]
    tokens: int
    message_id: str | None = None
    seq: int | None = None
    pinned: bool = False


@dataclass(slots=True)
class Plan:
    """Exactly what a send would put upstream, and what it left out and why."""

    model: str
    strategy: Strategy
    budget: Budget
    exact: bool
    parts: list[Part]
    dropped_before_seq: int | None = None  # messages below this position are not in the window
    summary: ChatSummary | None = None
    to_summarise: list[Message] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(p.tokens for p in self.parts) + REPLY_PRIMING_TOKENS

    def messages(self) -> list[dict[str, Any]]:
        return [p.message for p in self.parts]


class _MessageFields(Protocol):
    role: str
    content: str
    name: str | None
    tool_calls: list[Any] | None
    tool_call_id: str | None


def upstream_message(message: _MessageFields) -> dict[str, Any]:
    """A stored message as OpenAI's `messages` entry."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
        if not message.content:
            out["content"] = None
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


class ContextBuilder:
    """Builds context plans with the shipped tokenizer and model catalog."""

    def __init__(self, tokenizer: Tokenizer, catalog: ModelCatalog, settings: Settings) -> None:
        self.tokenizer = tokenizer
        self.catalog = catalog
        self.settings = settings

    def encoding(self, model: str) -> str:
        """The name a stored token count is tagged with (`estimate` when the tokenizer is unknown)."""
        return self.tokenizer.encoding_for_model(model) or "estimate"

    def count(self, message: dict[str, Any], model: str) -> int:
        return self.tokenizer.count_message(message, model)

    def strategy(self, chat: Chat) -> Strategy:
        chosen: Strategy | None = (chat.context or {}).get("strategy")
        return chosen or self.settings.context_strategy

    def budget(self, chat: Chat, model: str, params: dict[str, Any]) -> Budget:
        """The model's window minus the reply's reserve and a safety margin, or the chat's own cap."""
        info = self.catalog.get(model)
        settings = chat.context or {}
        reserve = settings.get("reserve_tokens") or params.get("max_completion_tokens")
        if reserve is None:
            reserve = min(info.max_output_tokens, self.settings.context_reserve_tokens)
        margin = self.settings.context_safety_margin
        if self.tokenizer.encoding_for_model(model) is None:
            margin += int(info.context_window * UNKNOWN_TOKENIZER_MARGIN)
        limit = info.context_window - reserve - margin
        if cap := settings.get("max_context_tokens"):
            limit = min(limit, cap)
        if limit <= 0:
            raise InvalidRequestError(
                f"The reply's reserve ({reserve} tokens) leaves no room for context in {model}'s window "
                f"of {info.context_window} tokens.",
                param="context.reserve_tokens",
                code="context_length_exceeded",
            )
        return Budget(info.context_window, reserve, margin, limit)

    async def plan(
        self,
        session: AsyncSession,
        chat: Chat,
        model: str,
        params: dict[str, Any],
        before_seq: int,
        strategy: Strategy | None = None,
        *,
        fold: bool = True,
    ) -> Plan:
        """What goes upstream for a reply at position `before_seq` (its prompt is every message below it).

        With `fold=False` the `summary` strategy keeps its summary but drops, like
        `window`, what does not fit beside it (when summarising has failed).
        """
        budget = self.budget(chat, model, params)
        strategy = strategy or self.strategy(chat)
        plan = Plan(model, strategy, budget, self.tokenizer.encoding_for_model(model) is not None, [])
        fixed = await self._fixed_parts(session, chat, model)
        summary = await self._summary(session, chat, before_seq) if strategy == "summary" else None
        floor = summary.up_to_seq if summary else 0
        pinned = await self._pinned(session, chat, model, floor, before_seq)
        room = budget.max_context_tokens - REPLY_PRIMING_TOKENS - sum(p.tokens for p in fixed)
        room -= sum(p.tokens for p in pinned)
        if summary is not None:
            room -= summary.token_count

        scan = "window" if strategy == "summary" and not fold else strategy
        window, boundary, overflow = await self._window(session, chat, model, floor, before_seq, room, scan)
        if scan == "summary" and overflow:
            # Leave room for the rewritten summary beside the window, so that one summary call settles it.
            allowance = summary_max_tokens(budget) + SUMMARY_OVERHEAD - (summary.token_count if summary else 0)
            if allowance > 0:
                window, boundary, overflow = await self._window(
                    session, chat, model, floor, before_seq, room - allowance, scan
                )
        if strategy == "none" and overflow:
            needed = budget.max_context_tokens - room + sum(u.tokens for u in overflow) + sum(p.tokens for p in window)
            raise InvalidRequestError(
                f"This chat needs about {needed} tokens of context but {model} allows "
                f"{budget.max_context_tokens} here; use the 'window' or 'summary' strategy, or clear older messages.",
                param="messages",
                code="context_length_exceeded",
            )
        plan.dropped_before_seq = boundary
        plan.summary = summary
        if strategy == "summary" and overflow:
            seqs = [m.seq for unit in overflow for m in unit.messages]
            rows = await session.scalars(
                select(Message).where(Message.chat_id == chat.id, Message.seq.in_(seqs)).order_by(Message.seq)
            )
            plan.to_summarise = list(rows)
        body = sorted([*pinned, *window], key=lambda p: p.seq or 0)
        summary_parts = [] if summary is None else [self._summary_part(summary)]
        plan.parts = [*fixed, *summary_parts, *body]
        return plan

    def _summary_part(self, summary: ChatSummary) -> Part:
        message = {"role": "system", "content": f"Summary of the earlier conversation:\n{summary.content}"}
        return Part("summary", message, summary.token_count)

    async def _fixed_parts(self, session: AsyncSession, chat: Chat, model: str) -> list[Part]:
        parts: list[Part] = []
        texts: list[tuple[Kind, str | None]] = [
            ("system", chat.system_prompt),
            (
                "user_context",
                await session.scalar(select(UserContext.content).where(UserContext.user_id == chat.user_id)),
            ),
            ("instructions", chat.instructions),
        ]
        for kind, text in texts:
            if text:
                message = {"role": "system", "content": text}
                parts.append(Part(kind, message, self.count(message, model)))
        return parts

    async def _summary(self, session: AsyncSession, chat: Chat, before_seq: int) -> ChatSummary | None:
        return await session.scalar(
            select(ChatSummary)
            .where(ChatSummary.chat_id == chat.id, ChatSummary.up_to_seq < before_seq)
            .order_by(ChatSummary.up_to_seq.desc())
            .limit(1)
        )

    def _tokens(self, message: Message, model: str) -> int:
        if message.token_count is not None and message.token_encoding == self.encoding(model):
            return message.token_count
        return self.count(upstream_message(message), model)

    async def _pinned(self, session: AsyncSession, chat: Chat, model: str, floor: int, before_seq: int) -> list[Part]:
        rows = await session.scalars(
            select(Message).where(
                Message.chat_id == chat.id,
                Message.pinned.is_(True),
                Message.active.is_(True),
                Message.seq > floor,
                Message.seq < before_seq,
                Message.status != "error",
            )
        )
        return [self._part(m, model) for m in rows]

    def _part(self, message: Message, model: str) -> Part:
        return Part(
            "message", upstream_message(message), self._tokens(message, model), message.id, message.seq, message.pinned
        )

    async def _window(
        self,
        session: AsyncSession,
        chat: Chat,
        model: str,
        floor: int,
        before_seq: int,
        room: int,
        strategy: Strategy,
    ) -> tuple[list[Part], int | None, list["_Unit"]]:
        """The newest unpinned messages that fit in `room`, the position below which none were kept,
        and (for `summary` and `none`) the units that did not fit, oldest first.

        Two reads: the sizes of the newest messages (small rows, stored token counts) until the
        room is full, then the contents of just the messages kept.
        """
        encoding = self.encoding(model)
        kept: list[_Sized] = []
        overflow: list[_Unit] = []
        unit = _Unit()
        boundary: int | None = None
        newest = True
        upper = before_seq
        while True:
            rows = (
                await session.execute(
                    select(Message.seq, Message.role, Message.token_count, Message.token_encoding)
                    .where(*_window_filter(chat.id, floor, upper))
                    .order_by(Message.seq.desc())
                    .limit(PAGE)
                )
            ).all()
            recount = {r.seq for r in rows if r.token_count is None or r.token_encoding != encoding}
            counted = await self._recount(session, chat, model, recount) if recount else {}
            for row in rows:
                upper = row.seq
                tokens = counted.get(row.seq, row.token_count or 0)
                unit.add(_Sized(row.seq, row.role, tokens))
                if row.role == "tool":
                    continue  # a tool result stays with the call that asked for it
                if boundary is None and unit.tokens <= room:
                    room -= unit.tokens
                    kept.extend(unit.messages)
                else:
                    if newest:
                        raise _too_large(unit, room, model)
                    if boundary is None:
                        boundary = unit.messages[0].seq + 1
                        if strategy == "window":
                            return await self._contents(session, chat, model, kept, before_seq), boundary, []
                    overflow.append(unit)
                newest = False
                unit = _Unit()
            if len(rows) < PAGE:
                break
        if unit.messages:  # tool messages whose call is gone: they cannot be sent alone
            boundary = boundary or unit.messages[0].seq + 1
        overflow.reverse()
        for u in overflow:
            u.messages.reverse()
        return await self._contents(session, chat, model, kept, before_seq), boundary, overflow

    async def _recount(self, session: AsyncSession, chat: Chat, model: str, seqs: set[int]) -> dict[int, int]:
        """Token counts for messages stored without one for this model's encoding."""
        rows = await session.scalars(select(Message).where(Message.chat_id == chat.id, Message.seq.in_(seqs)))
        return {m.seq: self.count(upstream_message(m), model) for m in rows}

    async def _contents(
        self, session: AsyncSession, chat: Chat, model: str, kept: list["_Sized"], before_seq: int
    ) -> list[Part]:
        """The kept messages, read in one range query (only the positions counted are used)."""
        if not kept:
            return []
        tokens = {k.seq: k.tokens for k in kept}
        rows = await session.execute(
            select(
                Message.id,
                Message.seq,
                Message.role,
                Message.content,
                Message.name,
                Message.tool_calls,
                Message.tool_call_id,
            )
            .where(Message.chat_id == chat.id, Message.seq >= min(tokens), Message.seq < before_seq)
            .order_by(Message.seq)
        )
        return [
            Part("message", upstream_message(row), tokens[row.seq], row.id, row.seq, False)
            for row in rows
            if row.seq in tokens
        ]

    async def dropped_count(self, session: AsyncSession, chat: Chat, plan: Plan) -> int:
        """How many messages fall below the plan's window (for the dry run; the send path skips this)."""
        if plan.dropped_before_seq is None:
            return 0
        floor = plan.summary.up_to_seq if plan.summary else 0
        count = await session.scalar(
            select(func.count()).where(
                Message.chat_id == chat.id,
                Message.seq > floor,
                Message.seq < plan.dropped_before_seq,
                Message.active.is_(True),
                Message.status != "error",
                Message.pinned.is_(False),
            )
        )
        return int(count or 0)


@dataclass(frozen=True, slots=True)
class _Sized:
    """A message's position, role and tokens: all the window needs to decide."""

    seq: int
    role: str
    tokens: int


def _window_filter(chat_id: str, floor: int, upper: int) -> list[ColumnElement[bool]]:
    """Messages the window may take: on the branch, not failed, not pinned (those come anyway), not empty."""
    return [
        Message.chat_id == chat_id,
        Message.active.is_(True),
        Message.seq > floor,
        Message.seq < upper,
        Message.status != "error",
        Message.pinned.is_(False),
        or_(Message.content != "", Message.tool_calls.is_not(None)),
    ]


class _Unit:
    """Messages kept or dropped together (an assistant's tool calls and their results), newest first."""

    def __init__(self) -> None:
        self.messages: list[_Sized] = []
        self.tokens = 0

    def add(self, message: _Sized) -> None:
        self.messages.append(message)
        self.tokens += message.tokens


def _too_large(unit: _Unit, room: int, model: str) -> InvalidRequestError:
    what = "The newest message" if len(unit.messages) == 1 else "The newest tool call with its results"
    return InvalidRequestError(
        f"{what} is {unit.tokens} tokens, more than the {max(room, 0)} tokens of context left for it "
        f"with {model}; shorten it or raise the chat's context budget.",
        param="content",
        code="context_length_exceeded",
    )


def summary_max_tokens(budget: Budget) -> int:
    """The longest summary asked for: a quarter of the budget, at most SUMMARY_MAX_TOKENS."""
    return max(min(SUMMARY_MAX_TOKENS, budget.max_context_tokens // 4), 1)


def summary_request(previous: ChatSummary | None, messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The upstream messages asking the model to fold `messages` into the running summary."""
    lines = []
    if previous is not None:
        lines.append(f"Summary so far:\n{previous.content}\n")
    lines.append("New messages:")
    for m in messages:
        lines.append(f"[{m.role}] {m.content or ''}")
    return [
        {
            "role": "system",
            "content": "You maintain a running summary of a conversation for an assistant that can no longer see "
            "its older messages. Rewrite the summary to include the new messages: keep facts, names, numbers, "
            "decisions, open questions and the user's preferences; drop pleasantries. Answer with the summary only.",
        },
        {"role": "user", "content": "\n".join(lines)},
    ]
