"""Sending a message: store the turn, ask the model, store the reply.

A send is a few short transactions, never one held open across a model call:
1. under the chat's row lock, reserve two positions (the user message at n,
   its reply at n+1), store the user message with its token count, and plan the
   context it will be sent with (a message that cannot fit is refused here, and
   nothing is stored);
2. with the `summary` strategy, fold messages that no longer fit into the
   chat's rolling summary (an upstream call of its own, counted in the ledger);
3. call the upstream, with no transaction open;
4. store the reply, `complete`, `partial` (the client left or the upstream broke
   off mid-stream: what arrived is kept) or `error`, with its ledger rows.
Concurrent sends to one chat therefore never wait on each other's model call,
and every message gets exactly one defined position.
"""

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import orjson
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import AppError, InvalidRequestError, NotFoundError, ServiceUnavailableError
from app.core.logging import get_logger
from app.core.security import Principal
from app.core.streaming import started
from app.db.models import Chat, ChatSummary, Message, new_id, utcnow
from app.schemas.chat import ChatParams, MessageCreate, MessageRead, MessageUpdate, RegenerateRequest, SendResult, Usage
from app.services.chats import get_owned_chat
from app.services.context import (
    SUMMARY_MAX_TOKENS,
    ContextBuilder,
    Plan,
    summary_max_tokens,
    summary_request,
    upstream_message,
)
from app.services.openai import Attempt, ReplyStream, Upstream
from app.services.runtime import ChatRuntime
from app.services.usage import CallContext, ledger_values, record_usage

log = get_logger(__name__)

T = TypeVar("T")
MAX_SUMMARY_CALLS = 3  # per send; what still does not fit after them is dropped, as with `window`


def message_read(message: Message) -> MessageRead:
    return MessageRead(
        id=message.id,
        chat_id=message.chat_id,
        parent_id=message.parent_id,
        role=message.role,
        content=message.content,
        status=message.status,
        model=message.model,
        finish_reason=message.finish_reason,
        usage=Usage.model_validate(message.usage) if message.usage else None,
        error=message.error,
        pinned=message.pinned,
        active=message.active,
        name=message.name,
        tool_calls=message.tool_calls,
        tool_call_id=message.tool_call_id,
        tokens=message.token_count,
        context_messages=message.context_messages,
        context_tokens=message.context_tokens,
        created_at=message.created_at,
    )


@dataclass(slots=True)
class Turn:
    """A stored user message, waiting for its reply."""

    user_message: Message
    reply_id: str
    reply_seq: int
    model: str
    plan: Plan
    params: dict[str, Any]
    call: CallContext
    failed: list[Attempt] = field(default_factory=list)

    @property
    def context(self) -> list[dict[str, Any]]:
        return self.plan.messages()


def _require(upstream: Upstream | None) -> Upstream:
    if upstream is None:
        raise ServiceUnavailableError(
            "No model provider is configured. Set OPENAI_API_KEY (and OPENAI_BASE_URL for an "
            "OpenAI-compatible API other than OpenAI's) and restart the service; or, to chat offline "
            "with the embedded local model, run `make local-model` and restart without a key.",
            code="upstream_not_configured",
        )
    return upstream


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """What a turn answers: new content to send (or None: answer `answer` again), and where it forks."""

    content: str | None
    model: str | None = None
    params: ChatParams | None = None
    fork: Message | None = None  # taken off the branch, with its descendants
    answer: Message | None = None  # the user message a regenerated reply answers


async def _take_off_branch(session: AsyncSession, chat: Chat, fork: Message) -> None:
    # The current branch is one path, so `fork` and its descendants on it are the
    # active messages from its position on.
    await session.execute(
        update(Message)
        .where(Message.chat_id == chat.id, Message.active.is_(True), Message.seq >= fork.seq)
        .values(active=False)
    )


async def _current_leaf(session: AsyncSession, chat: Chat, below: int) -> str | None:
    return await session.scalar(
        select(Message.id)
        .where(Message.chat_id == chat.id, Message.active.is_(True), Message.seq < below)
        .order_by(Message.seq.desc())
        .limit(1)
    )


async def _reserve(session: AsyncSession, chat: Chat, count: int) -> int:
    """The first of `count` new positions; the UPDATE holds the chat's row lock (SQLite: the write
    lock) until commit, so positions are handed out one writer at a time."""
    next_seq = await session.scalar(
        update(Chat)
        .where(Chat.id == chat.id)
        .values(next_seq=Chat.next_seq + count, updated_at=utcnow())
        .returning(Chat.next_seq)
    )
    assert next_seq is not None
    return int(next_seq) - count


async def _store_user_message(
    session: AsyncSession,
    runtime: ChatRuntime,
    chat: Chat,
    principal: Principal,
    content: str,
    seq: int,
    parent_id: str | None,
    model: str,
) -> Message:
    message = Message(
        id=new_id("msg"),
        chat_id=chat.id,
        user_id=principal.user_id,
        seq=seq,
        parent_id=parent_id,
        role="user",
        content=content,
        status="complete",
        created_at=utcnow(),
    )
    message.token_count = runtime.context.count(upstream_message(message), model)
    message.token_encoding = runtime.context.encoding(model)
    session.add(message)
    await session.execute(update(Chat).where(Chat.id == chat.id).values(message_count=Chat.message_count + 1))
    await session.flush()
    return message


async def _start_turn(
    session: AsyncSession, runtime: ChatRuntime, principal: Principal, chat: Chat, request: TurnRequest
) -> Turn:
    model = request.model or chat.model or runtime.default_model
    principal.check_model(model)
    overrides = request.params.model_dump(exclude_none=True) if request.params else {}
    params = ChatParams.model_validate({**chat.params, **overrides}).upstream()

    if request.fork is not None:
        await _take_off_branch(session, chat, request.fork)
    if request.content is not None:
        seq = await _reserve(session, chat, 2)
        parent_id = request.fork.parent_id if request.fork else await _current_leaf(session, chat, seq)
        user_message = await _store_user_message(
            session, runtime, chat, principal, request.content, seq, parent_id, model
        )
        reply_seq = seq + 1
    else:
        assert request.answer is not None
        user_message, reply_seq = request.answer, await _reserve(session, chat, 1)
    # Refused here (context_length_exceeded) means rolled back: nothing of the turn is kept.
    plan = await runtime.context.plan(session, chat, model, params, reply_seq)
    # Last, so that a request refused for other reasons uses none of the key's limits;
    # refused here means rolled back, too.
    await runtime.limiter.admit(principal, session)
    await session.commit()
    call = CallContext(principal.user_id, principal.key_id, chat.id, "chat.message")
    turn = Turn(user_message, new_id("msg"), reply_seq, model, plan, params, call)
    if plan.to_summarise:
        turn.plan = await _summarise(session, runtime, chat, turn)
    return turn


async def _summarise(session: AsyncSession, runtime: ChatRuntime, chat: Chat, turn: Turn) -> Plan:
    """Fold what no longer fits into the chat's rolling summary, then plan again.

    A failed summary call does not fail the send: that turn falls back to the
    `window` strategy (older messages dropped), and the next send tries again.
    """
    upstream = _require(runtime.upstream)
    plan = turn.plan
    for _ in range(MAX_SUMMARY_CALLS):
        if not plan.to_summarise:
            return plan
        chunk = _summary_chunk(plan, runtime.context, turn.model)
        call = CallContext(turn.call.user_id, turn.call.api_key_id, chat.id, "chat.summary")
        failed: list[Attempt] = []
        max_tokens = summary_max_tokens(plan.budget)
        request = summary_request(plan.summary, chunk)
        try:
            completion = await upstream.complete(turn.model, request, {"max_completion_tokens": max_tokens}, failed)
        except AppError as exc:
            failed_rows = runtime.accounting.rows(call, model_requested=turn.model, failed=failed, stream=False)
            await record_usage(session, [ledger_values(r) for r in failed_rows])
            await session.commit()
            log.warning("summary_failed", extra={"chat_id": chat.id, "code": exc.code})
            break
        content = completion.content.strip()
        summary_message = {"role": "system", "content": f"Summary of the earlier conversation:\n{content}"}
        usage = completion.usage or runtime.accounting.estimate(turn.model, request, content)
        final = (completion.attempt, completion.model, usage)
        session.add(
            ChatSummary(
                id=new_id("sum"),
                chat_id=chat.id,
                up_to_seq=chunk[-1].seq,
                content=content,
                token_count=runtime.context.count(summary_message, turn.model),
                model=completion.model,
                created_at=utcnow(),
            )
        )
        rows = runtime.accounting.rows(call, model_requested=turn.model, failed=failed, stream=False, final=final)
        await record_usage(session, [ledger_values(r) for r in rows])
        await session.commit()
        plan = await runtime.context.plan(session, chat, turn.model, turn.params, turn.reply_seq)
        await session.commit()
    if plan.to_summarise:
        plan = await runtime.context.plan(session, chat, turn.model, turn.params, turn.reply_seq, fold=False)
        await session.commit()
    return plan


def _summary_chunk(plan: Plan, context: ContextBuilder, model: str) -> list[Message]:
    """The oldest messages waiting to be summarised that one summary call can take."""
    limit = max(
        plan.budget.max_context_tokens - SUMMARY_MAX_TOKENS - (plan.summary.token_count if plan.summary else 0) - 512,
        256,
    )
    chunk: list[Message] = []
    used = 0
    for message in plan.to_summarise:
        tokens = context.count(upstream_message(message), model)
        if chunk and used + tokens > limit:
            break
        chunk.append(message)
        used += tokens
    # Never end a chunk between a tool call and its results.
    while len(chunk) < len(plan.to_summarise) and plan.to_summarise[len(chunk)].role == "tool":
        chunk.append(plan.to_summarise[len(chunk)])
    return chunk


async def _store_reply(
    session: AsyncSession,
    runtime: ChatRuntime,
    turn: Turn,
    *,
    content: str,
    status: str,
    model: str,
    attempt: Attempt | None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    stream: bool = False,
) -> Message | None:
    """Store the reply and its ledger rows in one transaction.

    Returns None when the chat was deleted while the model answered; the ledger
    rows are stored all the same, since the tokens were spent.
    """
    accounting = runtime.accounting
    final = None
    if attempt is not None:
        usage = {"source": "reported", **usage} if usage else accounting.estimate(model, turn.context, content)
        final = (attempt, model, usage)
    records = accounting.rows(
        turn.call,
        model_requested=turn.model,
        failed=turn.failed,
        stream=stream,
        final=final,
        message_id=turn.reply_id,
    )
    reply = Message(
        id=turn.reply_id,
        chat_id=turn.user_message.chat_id,
        user_id=turn.user_message.user_id,
        seq=turn.reply_seq,
        parent_id=turn.user_message.id,
        role="assistant",
        content=content,
        status=status,
        model=model,
        finish_reason=finish_reason,
        usage=usage,
        error=error,
        upstream_request_id=attempt.request_id if attempt else None,
        context_messages=len(turn.plan.parts),
        context_tokens=turn.plan.total_tokens,
        created_at=utcnow(),
    )
    reply.token_count = runtime.context.count(upstream_message(reply), turn.model)
    reply.token_encoding = runtime.context.encoding(turn.model)
    ledger_rows = [ledger_values(r) for r in records]
    try:
        session.add(reply)
        await session.execute(update(Chat).where(Chat.id == reply.chat_id).values(message_count=Chat.message_count + 1))
        # Last: the rollup rows it locks are shared by every call of this key and model.
        await record_usage(session, ledger_rows)
        await session.commit()
    except IntegrityError:
        await session.rollback()
        log.info("reply_dropped_chat_deleted", extra={"chat_id": reply.chat_id})
        await record_usage(session, ledger_rows)
        await session.commit()
        return None
    return reply


def _chat_gone(chat_id: str) -> NotFoundError:
    return NotFoundError(f"Chat '{chat_id}' was deleted while the model was replying.", param="chat_id")


async def _open_turn(
    session: AsyncSession,
    runtime: ChatRuntime,
    principal: Principal,
    chat: Chat,
    request: TurnRequest,
    call: Callable[[Upstream, Turn], Awaitable[T]],
) -> tuple[Turn, T]:
    """Store the user's message and make the upstream call; a failed call is stored as an error reply."""
    client = _require(runtime.upstream)
    turn = await _start_turn(session, runtime, principal, chat, request)
    try:
        return turn, await call(client, turn)
    except AppError as exc:
        await _store_reply(
            session,
            runtime,
            turn,
            content="",
            status="error",
            model=turn.model,
            attempt=None,
            error=exc.body()["error"],
        )
        raise


async def send_message(
    session: AsyncSession, runtime: ChatRuntime, principal: Principal, chat_id: str, data: MessageCreate
) -> SendResult:
    """Store the user's message, get the whole reply, store it and return both."""
    chat = await get_owned_chat(session, principal, chat_id)
    return await complete_turn(session, runtime, principal, chat, TurnRequest(data.content, data.model, data.params))


async def complete_turn(
    session: AsyncSession, runtime: ChatRuntime, principal: Principal, chat: Chat, request: TurnRequest
) -> SendResult:
    """Run a turn with a whole reply."""
    chat_id = chat.id
    turn, completion = await _open_turn(
        session, runtime, principal, chat, request, lambda c, t: c.complete(t.model, t.context, t.params, t.failed)
    )
    reply = await _store_reply(
        session,
        runtime,
        turn,
        content=completion.content,
        status="complete",
        model=completion.model,
        attempt=completion.attempt,
        finish_reason=completion.finish_reason,
        usage=completion.usage,
    )
    if reply is None:
        raise _chat_gone(chat_id)
    result = message_read(reply)
    return SendResult(user_message=message_read(turn.user_message), assistant_message=result, usage=result.usage)


def sse(event: str, payload: dict[str, Any]) -> bytes:
    """One server-sent event whose JSON repeats its type."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps({"type": event, **payload}) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
# nginx's code for "client closed the request": the ledger's status for a stream the client left.
CLIENT_CLOSED_REQUEST = 499
CLIENT_DISCONNECTED = {
    "message": "The client disconnected before the reply was complete.",
    "type": "client_error",
    "param": None,
    "code": "client_disconnected",
}


async def start_stream(
    session: AsyncSession, runtime: ChatRuntime, principal: Principal, chat_id: str, data: MessageCreate
) -> AsyncIterator[bytes]:
    """Store the user's message and open the upstream stream; failures so far are plain HTTP errors."""
    chat = await get_owned_chat(session, principal, chat_id)
    return await stream_turn(session, runtime, principal, chat, TurnRequest(data.content, data.model, data.params))


async def stream_turn(
    session: AsyncSession, runtime: ChatRuntime, principal: Principal, chat: Chat, request: TurnRequest
) -> AsyncIterator[bytes]:
    """Run a turn with a streamed reply."""
    turn, stream = await _open_turn(
        session, runtime, principal, chat, request, lambda c, t: c.stream(t.model, t.context, t.params, t.failed)
    )
    return await started(_relay(runtime, turn, stream))


async def _branch_point(
    session: AsyncSession, principal: Principal, chat_id: str, message_id: str
) -> tuple[Chat, Message]:
    chat = await get_owned_chat(session, principal, chat_id)
    message = await session.scalar(select(Message).where(Message.id == message_id, Message.chat_id == chat.id))
    if message is None:
        raise NotFoundError(f"No message found with id '{message_id}' in this chat.", param="message_id")
    if not message.active:
        raise InvalidRequestError(
            "This message is not on the chat's current branch.", param="message_id", code="not_on_current_branch"
        )
    return chat, message


async def regenerate(
    session: AsyncSession,
    runtime: ChatRuntime,
    principal: Principal,
    chat_id: str,
    message_id: str,
    data: RegenerateRequest,
) -> SendResult | AsyncIterator[bytes]:
    """A new reply to the same turn, as a sibling of `message_id` (which leaves the current branch)."""
    chat, old = await _branch_point(session, principal, chat_id, message_id)
    if old.role != "assistant" or old.parent_id is None:
        raise InvalidRequestError("Only an assistant reply can be regenerated.", param="message_id")
    answer = await session.scalar(select(Message).where(Message.id == old.parent_id, Message.chat_id == chat.id))
    if answer is None:
        raise InvalidRequestError("The message this reply answered is gone.", param="message_id")
    request = TurnRequest(None, data.model, data.params, fork=old, answer=answer)
    if data.stream:
        return await stream_turn(session, runtime, principal, chat, request)
    return await complete_turn(session, runtime, principal, chat, request)


async def edit_message(
    session: AsyncSession,
    runtime: ChatRuntime,
    principal: Principal,
    chat_id: str,
    message_id: str,
    data: MessageUpdate,
) -> Message | SendResult | AsyncIterator[bytes]:
    """Pin or unpin a message; new content makes a sibling branch (answered at once with `reply`)."""
    if data.content is None:
        chat = await get_owned_chat(session, principal, chat_id)
        message = await session.scalar(select(Message).where(Message.id == message_id, Message.chat_id == chat.id))
        if message is None:
            raise NotFoundError(f"No message found with id '{message_id}' in this chat.", param="message_id")
        if data.pinned is not None:
            message.pinned = data.pinned
        await session.commit()
        return message
    chat, old = await _branch_point(session, principal, chat_id, message_id)
    if old.role != "user":
        raise InvalidRequestError("Only a user message's content can be edited.", param="message_id")
    if data.reply:
        request = TurnRequest(data.content, fork=old)
        if data.stream:
            return await stream_turn(session, runtime, principal, chat, request)
        return await complete_turn(session, runtime, principal, chat, request)
    await _take_off_branch(session, chat, old)
    seq = await _reserve(session, chat, 1)
    model = chat.model or runtime.default_model
    message = await _store_user_message(session, runtime, chat, principal, data.content, seq, old.parent_id, model)
    message.pinned = bool(data.pinned)
    await session.commit()
    return message


async def _relay(runtime: ChatRuntime, turn: Turn, stream: ReplyStream) -> AsyncGenerator[bytes]:
    """Relay the reply as SSE events, and store it (and its usage) however the stream ends."""
    failure: AppError | None = None
    try:
        yield b""  # started (app/core/streaming.py): from here on, the cleanup below always runs
        yield sse("message.created", {"message": message_read(turn.user_message).model_dump(mode="json")})
        try:
            async for delta in stream.deltas():
                yield sse("message.delta", {"message_id": turn.reply_id, "delta": delta})
        except AppError as exc:
            failure = exc
    except BaseException:
        # The client went away (we are being cancelled): keep what it was shown, and count it.
        with anyio.CancelScope(shield=True):
            await stream.aclose()
            attempt = stream.finish()
            attempt.status_code, attempt.error_code = CLIENT_CLOSED_REQUEST, "client_disconnected"
            async with runtime.factory() as session:
                await _store_reply(
                    session,
                    runtime,
                    turn,
                    content="".join(stream.content),
                    status="partial",
                    model=stream.model,
                    attempt=attempt,
                    usage=stream.usage,
                    error=CLIENT_DISCONNECTED,
                    stream=True,
                )
        raise

    content = "".join(stream.content)
    with anyio.CancelScope(shield=True):
        await stream.aclose()
        attempt = stream.finish()
        if failure is not None:
            attempt.status_code, attempt.error_code = failure.status_code, failure.code
        async with runtime.factory() as session:
            reply = await _store_reply(
                session,
                runtime,
                turn,
                content=content,
                status="complete" if failure is None else ("partial" if content else "error"),
                model=stream.model,
                attempt=attempt,
                finish_reason=stream.finish_reason,
                usage=stream.usage,
                error=failure.body()["error"] if failure else None,
                stream=True,
            )
    if reply is None:
        failure = _chat_gone(turn.user_message.chat_id)
    if failure is not None:
        yield sse("error", failure.body())
    else:
        assert reply is not None
        yield sse("message.completed", {"message": message_read(reply).model_dump(mode="json")})
    yield SSE_DONE
