"""Keyset pagination in OpenAI's list shape (`limit`, `after`, `order`, `has_more`)."""

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, and_, or_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app.core.errors import InvalidRequestError
from app.schemas.common import ListParams, Page

Row = TypeVar("Row")
Item = TypeVar("Item")


def after_clause(
    keys: Sequence[InstrumentedAttribute[Any]], values: Sequence[Any], descending: bool
) -> ColumnElement[bool]:
    """Rows strictly after `values` in the order of `keys` (a row-value comparison, spelled portably)."""
    clauses = []
    for i, key in enumerate(keys):
        equal = [k == v for k, v in zip(keys[:i], values[:i], strict=True)]
        beyond = key < values[i] if descending else key > values[i]
        clauses.append(and_(*equal, beyond))
    return or_(*clauses)


async def cursor_values(
    session: AsyncSession, stmt: Select[*tuple[Any, ...]], after: str | None
) -> Sequence[Any] | None:
    """The sort-key values of the cursor row, found with the caller's own scoped query."""
    if after is None:
        return None
    row = (await session.execute(stmt)).first()
    if row is None:
        raise InvalidRequestError(
            f"No such object for cursor 'after': {after!r}.", param="after", code="invalid_cursor"
        )
    return tuple(row)


async def paginate(
    session: AsyncSession,
    stmt: Select[Row],
    keys: Sequence[InstrumentedAttribute[Any]],
    params: ListParams,
    cursor: Sequence[Any] | None,
    to_item: Callable[[Row], Item],
    item_id: Callable[[Item], str],
) -> Page[Item]:
    """One page of `stmt` (already scoped to the caller), ordered by `keys`."""
    descending = params.order == "desc"
    if cursor is not None:
        stmt = stmt.where(after_clause(keys, cursor, descending))
    stmt = stmt.order_by(*(k.desc() if descending else k.asc() for k in keys)).limit(params.limit + 1)
    rows = list((await session.scalars(stmt)).all())
    items = [to_item(r) for r in rows[: params.limit]]
    return Page[Item](
        data=items,
        first_id=item_id(items[0]) if items else None,
        last_id=item_id(items[-1]) if items else None,
        has_more=len(rows) > params.limit,
    )
