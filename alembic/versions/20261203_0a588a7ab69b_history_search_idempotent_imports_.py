"""history: search, idempotent imports, retention

Full-text search over messages and chat titles, per dialect:
- PostgreSQL: a `history_search` text search configuration (`simple`, accents
  removed: no stemming, no stop words, so every word the user types counts), a
  stored generated tsvector column on messages, and GIN indexes on
  (user_id, tsvector) (btree_gin), so a search reads only the caller's entries.
- SQLite: an FTS5 table (`history_search_fts`, the owner's id an indexed column)
  and a map from message or chat to FTS row (`history_search_docs`), both kept in
  step with `messages` and `chats` by the triggers below.
Only the first 100,000 characters of a message are indexed (PostgreSQL caps a
tsvector at 1 MB). A batch migration that recreates `messages` or `chats` on
SQLite drops these triggers: copy SQLITE_TRIGGERS into it.

Revision ID: 0a588a7ab69b
Revises: 147ee0235f7b
Create Date: 2026-12-03 14:26:15.073144
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.db.models


revision: str = '0a588a7ab69b'
down_revision: str | None = '147ee0235f7b'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXED_CHARS = 100_000

POSTGRESQL_UP = [
    "CREATE EXTENSION IF NOT EXISTS btree_gin",
    "CREATE EXTENSION IF NOT EXISTS unaccent",
    "CREATE TEXT SEARCH CONFIGURATION history_search (COPY = pg_catalog.simple)",
    "ALTER TEXT SEARCH CONFIGURATION history_search ALTER MAPPING FOR hword, hword_part, word WITH unaccent, simple",
    "ALTER TABLE messages ADD COLUMN history_search_vector tsvector GENERATED ALWAYS AS "
    f"(to_tsvector('history_search'::regconfig, left(content, {INDEXED_CHARS}))) STORED",
    "CREATE INDEX ix_messages_history_search ON messages USING gin (user_id, history_search_vector)",
    "CREATE INDEX ix_chats_history_search ON chats USING gin "
    "(user_id, to_tsvector('history_search'::regconfig, coalesce(title, '')))",
]

POSTGRESQL_DOWN = [
    "DROP INDEX IF EXISTS ix_chats_history_search",
    "DROP INDEX IF EXISTS ix_messages_history_search",
    "ALTER TABLE messages DROP COLUMN IF EXISTS history_search_vector",
    "DROP TEXT SEARCH CONFIGURATION IF EXISTS history_search",
]

SQLITE_TABLES = [
    # One row per indexed message or chat title (message_id NULL); its id is the FTS rowid.
    "CREATE TABLE history_search_docs ("
    " id INTEGER PRIMARY KEY, chat_id VARCHAR(40) NOT NULL, message_id VARCHAR(40))",
    "CREATE UNIQUE INDEX ux_history_search_docs_message_id ON history_search_docs (message_id)",
    "CREATE INDEX ix_history_search_docs_chat_id ON history_search_docs (chat_id)",
    "CREATE VIRTUAL TABLE history_search_fts USING fts5(owner, body, tokenize = 'unicode61 remove_diacritics 2')",
]

SQLITE_TRIGGERS = [
    """CREATE TRIGGER history_search_docs_ad AFTER DELETE ON history_search_docs BEGIN
        DELETE FROM history_search_fts WHERE rowid = old.id;
    END""",
    f"""CREATE TRIGGER history_search_messages_ai AFTER INSERT ON messages BEGIN
        INSERT INTO history_search_docs (chat_id, message_id) VALUES (new.chat_id, new.id);
        INSERT INTO history_search_fts (rowid, owner, body)
            VALUES (last_insert_rowid(), new.user_id, substr(new.content, 1, {INDEXED_CHARS}));
    END""",
    f"""CREATE TRIGGER history_search_messages_au AFTER UPDATE OF content, user_id ON messages BEGIN
        UPDATE history_search_fts SET owner = new.user_id, body = substr(new.content, 1, {INDEXED_CHARS})
            WHERE rowid = (SELECT id FROM history_search_docs WHERE message_id = new.id);
    END""",
    """CREATE TRIGGER history_search_messages_ad AFTER DELETE ON messages BEGIN
        DELETE FROM history_search_docs WHERE message_id = old.id;
    END""",
    """CREATE TRIGGER history_search_chats_ai AFTER INSERT ON chats WHEN new.title IS NOT NULL BEGIN
        INSERT INTO history_search_docs (chat_id, message_id) VALUES (new.id, NULL);
        INSERT INTO history_search_fts (rowid, owner, body) VALUES (last_insert_rowid(), new.user_id, new.title);
    END""",
    """CREATE TRIGGER history_search_chats_au AFTER UPDATE OF title, user_id ON chats BEGIN
        DELETE FROM history_search_docs WHERE chat_id = old.id AND message_id IS NULL;
        INSERT INTO history_search_docs (chat_id, message_id) SELECT new.id, NULL WHERE new.title IS NOT NULL;
        INSERT INTO history_search_fts (rowid, owner, body)
            SELECT last_insert_rowid(), new.user_id, new.title WHERE new.title IS NOT NULL;
    END""",
    """CREATE TRIGGER history_search_chats_ad AFTER DELETE ON chats BEGIN
        DELETE FROM history_search_docs WHERE chat_id = old.id;
    END""",
]

SQLITE_BACKFILL = [
    "INSERT INTO history_search_docs (chat_id, message_id) SELECT chat_id, id FROM messages",
    "INSERT INTO history_search_fts (rowid, owner, body)"
    f" SELECT d.id, m.user_id, substr(m.content, 1, {INDEXED_CHARS})"
    " FROM history_search_docs d JOIN messages m ON m.id = d.message_id",
    "INSERT INTO history_search_docs (chat_id, message_id) SELECT id, NULL FROM chats WHERE title IS NOT NULL",
    "INSERT INTO history_search_fts (rowid, owner, body) SELECT d.id, c.user_id, c.title"
    " FROM history_search_docs d JOIN chats c ON c.id = d.chat_id WHERE d.message_id IS NULL",
]

SQLITE_DOWN = [
    "DROP TRIGGER IF EXISTS history_search_chats_ad",
    "DROP TRIGGER IF EXISTS history_search_chats_au",
    "DROP TRIGGER IF EXISTS history_search_chats_ai",
    "DROP TRIGGER IF EXISTS history_search_messages_ad",
    "DROP TRIGGER IF EXISTS history_search_messages_au",
    "DROP TRIGGER IF EXISTS history_search_messages_ai",
    "DROP TRIGGER IF EXISTS history_search_docs_ad",
    "DROP TABLE IF EXISTS history_search_fts",
    "DROP TABLE IF EXISTS history_search_docs",
]


def upgrade() -> None:
    op.create_table('history_imports',
    sa.Column('user_id', sa.String(length=40), nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('chat_id', sa.String(length=40), nullable=False),
    sa.Column('created_at', app.db.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['chat_id'], ['chats.id'], name=op.f('fk_history_imports_chat_id_chats'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_history_imports_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', 'idempotency_key', name=op.f('pk_history_imports'))
    )
    with op.batch_alter_table('history_imports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_history_imports_chat_id'), ['chat_id'], unique=False)

    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index('ix_messages_created_at', ['created_at'], unique=False)

    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        statements = POSTGRESQL_UP
    elif dialect == "sqlite":
        statements = SQLITE_TABLES + SQLITE_TRIGGERS + SQLITE_BACKFILL
    else:
        raise NotImplementedError(f"history search has no implementation for {dialect}")
    for statement in statements:
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for statement in POSTGRESQL_DOWN if dialect == "postgresql" else SQLITE_DOWN:
        op.execute(statement)

    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_created_at')

    with op.batch_alter_table('history_imports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_history_imports_chat_id'))

    op.drop_table('history_imports')
