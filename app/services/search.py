"""Full-text search over the caller's messages and chat titles.

The query is words, taken literally: each whitespace-separated word must match,
and nothing the user types is query syntax (`OR`, `*`, quotes, `NEAR(...)`, `%`
and `_` are plain text). Words are matched whole, case- and accent-insensitively.
- PostgreSQL: `plainto_tsquery` (which has no operators) over the
  `history_search` configuration, ranked with `ts_rank`, snippets by `ts_headline`.
- SQLite: FTS5, each word quoted as a phrase (so its own syntax never applies),
  ranked with bm25, snippets by `snippet()`.
The index itself is keyed by owner, so a search reads only the caller's entries,
and every hit is joined back to a message or chat the caller owns.
The structures are made by migration 0a588a7ab69b.
"""

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import InvalidRequestError
from app.core.security import Principal
from app.db.models import UTCDateTime
from app.schemas.history import SearchHit, SearchParams, SearchResults

SNIPPET_WORDS = 24
_MARK = "**"
_HEADLINE_OPTIONS = (
    f"StartSel={_MARK}, StopSel={_MARK}, MaxWords={SNIPPET_WORDS}, MinWords={SNIPPET_WORDS // 2}, "
    "ShortWord=0, MaxFragments=1"
)

_POSTGRESQL = text(
    """
    WITH query AS (SELECT plainto_tsquery('history_search', :q) AS tsq),
    message_hits AS (
        SELECT m.chat_id, m.id AS message_id, m.role, m.created_at,
               ts_rank(m.history_search_vector, query.tsq) AS score
        FROM messages m, query
        WHERE m.user_id = :user_id AND m.history_search_vector @@ query.tsq
        ORDER BY score DESC, m.created_at DESC, m.id DESC
        LIMIT :n
    ),
    title_hits AS (
        SELECT c.id AS chat_id, NULL::varchar AS message_id, NULL::varchar AS role, c.created_at,
               ts_rank(to_tsvector('history_search'::regconfig, coalesce(c.title, '')), query.tsq) AS score
        FROM chats c, query
        WHERE c.user_id = :user_id
          AND to_tsvector('history_search'::regconfig, coalesce(c.title, '')) @@ query.tsq
        ORDER BY score DESC, c.created_at DESC, c.id DESC
        LIMIT :n
    ),
    best AS (
        SELECT * FROM message_hits UNION ALL SELECT * FROM title_hits
        ORDER BY score DESC, created_at DESC, chat_id DESC, message_id DESC NULLS LAST
        LIMIT :n
    )
    SELECT best.chat_id, best.message_id, best.role, best.created_at, best.score,
           ts_headline(
               'history_search',
               CASE WHEN best.message_id IS NULL THEN c.title ELSE left(m.content, 100000) END,
               query.tsq,
               :headline_options
           ) AS snippet
    FROM best
    CROSS JOIN query
    JOIN chats c ON c.id = best.chat_id AND c.user_id = :user_id
    LEFT JOIN messages m ON m.id = best.message_id AND m.user_id = :user_id
    ORDER BY best.score DESC, best.created_at DESC, best.chat_id DESC, best.message_id DESC NULLS LAST
    """
).columns(created_at=UTCDateTime())

_SQLITE = text(
    """
    SELECT d.chat_id, d.message_id, m.role, coalesce(m.created_at, c.created_at) AS created_at,
           -bm25(history_search_fts, 0.0, 1.0) AS score,
           snippet(history_search_fts, 1, :mark, :mark, '…', :snippet_words) AS snippet
    FROM history_search_fts
    JOIN history_search_docs d ON d.id = history_search_fts.rowid
    JOIN chats c ON c.id = d.chat_id AND c.user_id = :user_id
    LEFT JOIN messages m ON m.id = d.message_id AND m.user_id = :user_id
    WHERE history_search_fts MATCH :expr AND (d.message_id IS NULL OR m.id IS NOT NULL)
    ORDER BY bm25(history_search_fts, 0.0, 1.0), created_at DESC, d.chat_id DESC, d.message_id DESC
    LIMIT :n
    """
).columns(created_at=UTCDateTime())


def _phrase(word: str) -> str:
    """An FTS5 string: inside double quotes, only a doubled quote means anything."""
    return '"' + word.replace('"', '""') + '"'


def fts5_query(user_id: str, words: list[str]) -> str:
    """The caller's entries (the owner column) that contain every word."""
    return f"owner : {_phrase(user_id)} AND body : ({' '.join(_phrase(w) for w in words)})"


async def search_history(session: AsyncSession, principal: Principal, params: SearchParams) -> SearchResults:
    """The caller's messages and chat titles that contain every word of `q`, best first."""
    words = list(dict.fromkeys(params.q.split()))  # a repeated word asks for nothing more
    if not words:
        raise InvalidRequestError(
            "Invalid value for 'q': give at least one word to search for.", param="q", code="invalid_value"
        )
    n = params.limit + 1
    bind: dict[str, Any] = {"user_id": principal.user_id, "n": n}
    if session.get_bind().dialect.name == "postgresql":
        rows = (
            await session.execute(_POSTGRESQL, bind | {"q": " ".join(words), "headline_options": _HEADLINE_OPTIONS})
        ).all()
    else:
        rows = (
            await session.execute(
                _SQLITE,
                bind | {"expr": fts5_query(principal.user_id, words), "mark": _MARK, "snippet_words": SNIPPET_WORDS},
            )
        ).all()
    hits = [
        SearchHit(
            chat_id=row.chat_id,
            message_id=row.message_id,
            role=row.role,
            snippet=row.snippet or "",
            score=float(row.score),
            created_at=row.created_at,
        )
        for row in rows[: params.limit]
    ]
    return SearchResults(data=hits, has_more=len(rows) > params.limit)
