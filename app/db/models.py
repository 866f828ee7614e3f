"""SQLAlchemy models. Times are timezone-aware UTC; ids are prefixed strings."""

import secrets
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """An opaque, unguessable id such as `chat_3f9a...`."""
    return f"{prefix}_{secrets.token_hex(12)}"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite returns naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[str]: JSON(), list[Any]: JSON()}


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16), default="user")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(256))
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Limits (app/services/limits.py); None: none.
    rpm_limit: Mapped[int | None]
    tpm_limit: Mapped[int | None]
    budget_usd: Mapped[Decimal | None] = mapped_column(Numeric(20, 10))

    user: Mapped[User] = relationship(lazy="raise")


class Chat(Base):
    __tablename__ = "chats"
    __table_args__ = (Index("ix_chats_user_created", "user_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str | None] = mapped_column(String(512))
    model: Mapped[str | None] = mapped_column(String(128))
    system_prompt: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    context: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    tags: Mapped[list[str]] = mapped_column(default=list)
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    # Standing instructions for this chat only, sent after the system prompt.
    instructions: Mapped[str | None] = mapped_column(Text)
    # The next message's position; bumped under a row lock so concurrent sends never collide.
    next_seq: Mapped[int] = mapped_column(Integer, default=1)
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("chat_id", "seq"),
        Index("ix_messages_chat_pinned", "chat_id", "pinned"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    chat_id: Mapped[str] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[str | None] = mapped_column(String(40))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text, default="")
    # complete | partial (cut off: client gone or upstream broke mid-stream) | error
    status: Mapped[str] = mapped_column(String(16), default="complete")
    model: Mapped[str | None] = mapped_column(String(128))
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    upstream_request_id: Mapped[str | None] = mapped_column(String(128))
    # OpenAI's tool calling: an assistant's calls, and the call a tool message answers.
    name: Mapped[str | None] = mapped_column(String(64))
    tool_calls: Mapped[list[Any] | None] = mapped_column(JSON)
    tool_call_id: Mapped[str | None] = mapped_column(String(128))
    # Kept in every context, whatever the strategy drops.
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    # On the chat's current branch. Editing a message or regenerating a reply starts a
    # sibling at the end of the chat and takes the old one and its descendants off the branch.
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    # Tokens of this message in chat format, counted once when stored, and the encoding used.
    token_count: Mapped[int | None] = mapped_column(Integer)
    token_encoding: Mapped[str | None] = mapped_column(String(32))
    # On replies: the size of the context the model was given.
    context_messages: Mapped[int | None] = mapped_column(Integer)
    context_tokens: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ChatSummary(Base):
    """A rolling summary that stands in for a chat's messages up to `up_to_seq` (inclusive)."""

    __tablename__ = "chat_summaries"
    __table_args__ = (Index("ix_chat_summaries_chat_seq", "chat_id", "up_to_seq"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    chat_id: Mapped[str] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"))
    up_to_seq: Mapped[int] = mapped_column(Integer)
    content: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UserContext(Base):
    """A user's standing instructions and facts, placed in every one of their chats' contexts."""

    __tablename__ = "user_contexts"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    content: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UsageRecord(Base):
    """One row per upstream call attempt: the ledger that stats and budgets read."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_user_created", "user_id", "created_at"),
        Index("ix_usage_records_created", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    user_id: Mapped[str] = mapped_column(String(40))
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    chat_id: Mapped[str | None] = mapped_column(String(40))
    message_id: Mapped[str | None] = mapped_column(String(40))
    # chat.message | chat.summary | v1.chat.completions
    endpoint: Mapped[str] = mapped_column(String(32))
    model_requested: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(128))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(20, 10))
    catalog_version: Mapped[str | None] = mapped_column(String(64))
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    status_code: Mapped[int] = mapped_column(Integer)
    error_type: Mapped[str | None] = mapped_column(String(64))
    upstream_request_id: Mapped[str | None] = mapped_column(String(128))
    # reported (the upstream's usage) | estimated (counted here) | none (no tokens consumed)
    source: Mapped[str] = mapped_column(String(16))


# Latency and time-to-first-token histograms of the usage rollups, in ms: bin 0 counts [0, 1),
# bin i counts [BOUNDS[i - 1], BOUNDS[i]) (each bound 1.2 times the last), and the last bin
# everything from BOUNDS[-1] (about 10 minutes) up. Changing them means rebuilding the rollups.
HISTOGRAM_BOUNDS_MS: tuple[float, ...] = tuple(round(1.2**i, 3) for i in range(74))
HISTOGRAM_BINS = len(HISTOGRAM_BOUNDS_MS) + 1
LATENCY_BINS = tuple(f"latency_b{i:02d}" for i in range(HISTOGRAM_BINS))
TTFT_BINS = tuple(f"ttft_b{i:02d}" for i in range(HISTOGRAM_BINS))
# The rollups' periods in seconds: every ledger row is counted in its hour and in its day (UTC).
ROLLUP_PERIODS = (3600, 86400)
# The counters summed from ledger rows, in the order stats reads them.
ROLLUP_COUNTERS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "estimated",
    "cost_usd",
    "unpriced",
    "unpriced_input_tokens",
    "unpriced_output_tokens",
)

# The usage ledger summed per hour and per day, per user, key and model served: what
# `/stats` reads instead of the ledger's rows wherever a query covers whole periods.
# Written in the same transaction as the ledger rows it sums (app.services.usage.record_usage),
# by upserts that add increments. A Core table: it is only ever summed, never loaded as objects.
usage_rollups = Table(
    "usage_rollups",
    Base.metadata,
    Column("period", Integer, primary_key=True),  # 3600 or 86400
    # Unix seconds, a multiple of `period`: the key must compare equal on every backend.
    Column("period_start", BigInteger, primary_key=True),
    Column("user_id", String(40), primary_key=True),
    # "" for calls made without a key: a primary key column cannot be NULL.
    Column("api_key_id", String(40), primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),  # status_code >= 400
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("reasoning_tokens", BigInteger, nullable=False),
    Column("estimated", BigInteger, nullable=False),  # source = 'estimated'
    Column("cost_usd", Numeric(20, 10), nullable=False),  # the sum of the priced rows' costs
    Column("unpriced", BigInteger, nullable=False),  # rows with cost_usd NULL, and their tokens
    Column("unpriced_input_tokens", BigInteger, nullable=False),
    Column("unpriced_output_tokens", BigInteger, nullable=False),
    *(Column(name, Integer, nullable=False) for name in LATENCY_BINS),
    *(Column(name, Integer, nullable=False) for name in TTFT_BINS),  # streams only (ttft_ms set)
    Index("ix_usage_rollups_user_period", "user_id", "period", "period_start"),
)


class StoredCompletion(Base):
    """A `/v1/chat/completions` call made with `"store": true`, kept like OpenAI's stored completions."""

    __tablename__ = "stored_completions"
    __table_args__ = (Index("ix_stored_completions_user_created", "user_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(128))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# Retention purges messages by age, in batches.
Index("ix_messages_created_at", Message.created_at)

# Full-text search is dialect-specific and lives only in migrations (revision
# 0a588a7ab69b: a generated tsvector column and GIN indexes on
# PostgreSQL; on SQLite an FTS5 table kept in sync by triggers). Every such object
# has this marker in its name, and autogenerate leaves those names alone.
# On SQLite, a batch migration that recreates `messages` or `chats` drops their
# triggers: it must recreate them (that migration's SQLITE_TRIGGERS).
SEARCH_SCHEMA_MARKER = "history_search"


class HistoryImportRecord(Base):
    """An import made with an `Idempotency-Key`: a retry with the same key returns the same chat."""

    __tablename__ = "history_imports"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # SHA-256 of the canonical request: the same key with another body is a conflict.
    request_hash: Mapped[str] = mapped_column(String(64))
    # Deleting the chat forgets the key, so a later retry imports afresh.
    chat_id: Mapped[str] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
