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

The window is read newest first, contents and stored counts together, as plain rows of
just the columns a request needs (not ORM objects: per-row Python work is what a long
window costs). The first page assumes large messages; each next one is sized from the
previous page's average count, so the pages read little more than the window they fill.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sqlalchemy import ColumnElement, Select, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.config import Settings
from app.core.errors import InvalidRequestError
from app.db.models import Chat, ChatSummary, Message, UserContext
from app.services.catalog import ModelCatalog
from app.services.tokens import REPLY_PRIMING_TOKENS, Tokenizer

Strategy = Literal["window", "summary", "none"]
Kind = Literal["system", "user_context", "instructions", "summary", "message"]
PAGE = 1024  # message sizes read per query below the window (strategies `summary` and `none`)
FIRST_PAGE_TOKENS = 512  # the first page of the window assumes messages this large, so it seldom over-reads
MIN_PAGE = 16
MAX_PAGE = 4096
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
    return _upstream(message.role, message.content, message.name, message.tool_calls, message.tool_call_id)


def _upstream(
    role: str, content: str, name: str | None, tool_calls: list[Any] | None, tool_call_id: str | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"role": role, "content": content}
    if name:
        out["name"] = name
    if tool_calls:
        out["tool_calls"] = tool_calls
        if not content:
            out["content"] = None
    if tool_call_id:
        out["tool_call_id"] = tool_call_id
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

    async def _pinned(self, session: AsyncSession, chat: Chat, model: str, floor: int, before_seq: int) -> list[Part]:
        encoding = self.encoding(model)
        rows = await session.execute(
            select(*_ROW).where(
                _m.chat_id == chat.id,
                _m.pinned.is_(True),
                _m.active.is_(True),
                _m.seq > floor,
                _m.seq < before_seq,
                _m.status != "error",
            )
        )
        return [self._part(row, model, encoding, pinned=True) for row in rows]

    def _part(self, row: Sequence[Any], model: str, encoding: str, *, pinned: bool = False) -> Part:
        """A message read as `_ROW`, with its stored token count, or a fresh one if it has none for `encoding`."""
        seq, role, count, counted_as, message_id, content, name, tool_calls, tool_call_id = row
        message = _upstream(role, content, name, tool_calls, tool_call_id)
        tokens = count if count is not None and counted_as == encoding else self.count(message, model)
        return Part("message", message, tokens, message_id, seq, pinned)

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

        Newest first, in pages. Until the window is full each page reads the messages themselves,
        as many as the room left holds at the previous page's average size (see `_page_size`);
        below the window only positions and stored sizes are read, for the units that did not fit.
        """
        encoding = self.encoding(model)
        kept: list[_Sized] = []
        overflow: list[_Unit] = []
        unit = _Unit()
        boundary: int | None = None
        newest = True
        upper = before_seq
        page: list[_Sized] = []
        while True:
            filling = boundary is None
            limit = _page_size(room - unit.tokens, page) if filling else PAGE
            read_page = self._page if filling else self._sizes
            page = await read_page(session, chat, model, encoding, floor, upper, limit)
            for message in page:
                upper = message.seq
                unit.add(message)
                if message.role == "tool":
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
                            return _parts(kept), boundary, []
                    overflow.append(unit)
                newest = False
                unit = _Unit()
            if len(page) < limit:
                break
        if unit.messages:  # tool messages whose call is gone: they cannot be sent alone
            boundary = boundary or unit.messages[0].seq + 1
        overflow.reverse()
        for u in overflow:
            u.messages.reverse()
        return _parts(kept), boundary, overflow

    async def _page(
        self, session: AsyncSession, chat: Chat, model: str, encoding: str, floor: int, upper: int, limit: int
    ) -> list["_Sized"]:
        """The next `limit` messages the window may take below `upper`, newest first, read whole."""
        rows = (await session.execute(_window_page(_ROW, chat.id, floor, upper, limit))).all()
        page = []
        for row in rows:
            part = self._part(row, model, encoding)
            page.append(_Sized(row[0], row[1], part.tokens, part))
        return page

    async def _sizes(
        self, session: AsyncSession, chat: Chat, model: str, encoding: str, floor: int, upper: int, limit: int
    ) -> list["_Sized"]:
        """The same as `_page`, but only positions and sizes (counted afresh where none is stored for `encoding`)."""
        rows = (await session.execute(_window_page(_SIZES, chat.id, floor, upper, limit))).all()
        recount = {r.seq for r in rows if r.token_count is None or r.token_encoding != encoding}
        counted = await self._recount(session, chat, model, recount) if recount else {}
        return [_Sized(r.seq, r.role, counted.get(r.seq, r.token_count or 0)) for r in rows]

    async def _recount(self, session: AsyncSession, chat: Chat, model: str, seqs: set[int]) -> dict[int, int]:
        """Token counts for messages stored without one for this model's encoding."""
        rows = await session.execute(
            select(_m.seq, _m.role, _m.content, _m.name, _m.tool_calls, _m.tool_call_id).where(
                _m.chat_id == chat.id, _m.seq.in_(seqs)
            )
        )
        return {row[0]: self.count(_upstream(*row[1:]), model) for row in rows}

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


# Core columns, not ORM attributes: rows come back as plain tuples, without the ORM's per-row work.
_m = Message.__table__.c
_SIZES = (_m.seq, _m.role, _m.token_count, _m.token_encoding)
_ROW = (*_SIZES, _m.id, _m.content, _m.name, _m.tool_calls, _m.tool_call_id)  # what `_part` reads


@dataclass(frozen=True, slots=True)
class _Sized:
    """A message's position, role and tokens: all the window needs to decide (and its part, once read)."""

    seq: int
    role: str
    tokens: int
    part: Part | None = None


def _parts(kept: list[_Sized]) -> list[Part]:
    """The kept messages' parts, oldest first."""
    return [k.part for k in reversed(kept) if k.part is not None]


def _page_size(room: int, previous: list[_Sized]) -> int:
    """Messages the window's next page reads: as many as `room` holds at the average size of the
    `previous` page (the nearest guide to the next one), plus a sixteenth and MIN_PAGE to spare;
    before any page, as many as it holds at FIRST_PAGE_TOKENS a message."""
    tokens = sum(m.tokens for m in previous)
    if not tokens:
        return min(max(room // FIRST_PAGE_TOKENS, MIN_PAGE), MAX_PAGE)
    rows = max(room, 0) * len(previous) // tokens
    return min(rows + rows // 16 + MIN_PAGE, MAX_PAGE)


def _window_page(columns: Sequence[Any], chat_id: str, floor: int, upper: int, limit: int) -> Select[Any]:
    """The next `limit` messages the window may take below position `upper`, newest first."""
    return select(*columns).where(*_window_filter(chat_id, floor, upper)).order_by(_m.seq.desc()).limit(limit)


def _window_filter(chat_id: str, floor: int, upper: int) -> list[ColumnElement[bool]]:
    """Messages the window may take: on the branch, not failed, not pinned (those come anyway), not empty."""
    return [
        _m.chat_id == chat_id,
        _m.active.is_(True),
        _m.seq > floor,
        _m.seq < upper,
        _m.status != "error",
        _m.pinned.is_(False),
        or_(_m.content != "", _m.tool_calls.is_not(None)),
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
