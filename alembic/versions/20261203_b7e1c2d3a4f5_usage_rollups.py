"""usage rollups: the ledger summed per hour and per day, backfilled

`usage_rollups` holds, per period (3600 or 86400 s), period start (Unix seconds), user,
API key ("" for none) and model served, the sums that /stats reads, and latency and
time-to-first-token histograms. From here on the app writes them in the same transaction as
the ledger rows (app.services.usage.record_usage); this migration sums the rows already in
the ledger, with the same rules. A process of the previous version that writes ledger rows
after this migration would leave them out of the rollups: stop those before upgrading.

Plain create_table / create_index only: on SQLite a batch operation would drop the search
triggers of revision 0a588a7ab69b.

Revision ID: b7e1c2d3a4f5
Revises: 005f83ad33e7
Create Date: 2026-12-03 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'b7e1c2d3a4f5'
down_revision: str | None = '005f83ad33e7'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of app.db.models' definitions as of this revision.
BOUNDS_MS = tuple(round(1.2**i, 3) for i in range(74))
BINS = len(BOUNDS_MS) + 1
PERIODS = (3600, 86400)
COUNTERS = (
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


def _bins(prefix: str) -> list[str]:
    return [f"{prefix}_b{i:02d}" for i in range(BINS)]


def upgrade() -> None:
    op.create_table(
        "usage_rollups",
        sa.Column("period", sa.Integer(), nullable=False),
        sa.Column("period_start", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        *(
            sa.Column(name, sa.Numeric(20, 10) if name == "cost_usd" else sa.BigInteger(), nullable=False)
            for name in COUNTERS
        ),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in (*_bins("latency"), *_bins("ttft"))),
        sa.PrimaryKeyConstraint(
            "period", "period_start", "user_id", "api_key_id", "model", name=op.f("pk_usage_rollups")
        ),
    )
    op.create_index("ix_usage_rollups_user_period", "usage_rollups", ["user_id", "period", "period_start"])
    for period in PERIODS:
        op.execute(_backfill(op.get_bind().dialect.name, period))


def _backfill(dialect: str, period: int) -> str:
    """INSERT ... SELECT the ledger's sums for one period: the rules of app.services.usage.rollup_increments."""
    if dialect == "postgresql":
        epoch = "floor(extract(epoch FROM created_at))::bigint"
        thresholds = f"ARRAY[{', '.join(map(repr, BOUNDS_MS))}]::float8[]"

        def bin_of(column: str) -> str:
            # width_bucket() counts the thresholds <= the value: bisect_right, as the app does.
            return f"width_bucket({column}, {thresholds})"
    else:
        epoch = "CAST(strftime('%s', created_at) AS INTEGER)"

        def bin_of(column: str) -> str:
            ladder = " ".join(f"WHEN {column} < {bound!r} THEN {i}" for i, bound in enumerate(BOUNDS_MS))
            return f"CASE {ladder} ELSE {len(BOUNDS_MS)} END"

    sums = {
        "requests": "count(*)",
        "errors": "count(*) FILTER (WHERE status_code >= 400)",
        "input_tokens": "sum(input_tokens)",
        "output_tokens": "sum(output_tokens)",
        "cached_tokens": "sum(cached_tokens)",
        "reasoning_tokens": "sum(reasoning_tokens)",
        "estimated": "count(*) FILTER (WHERE source = 'estimated')",
        "cost_usd": "coalesce(sum(cost_usd), 0)",
        "unpriced": "count(*) FILTER (WHERE cost_usd IS NULL)",
        "unpriced_input_tokens": "coalesce(sum(input_tokens) FILTER (WHERE cost_usd IS NULL), 0)",
        "unpriced_output_tokens": "coalesce(sum(output_tokens) FILTER (WHERE cost_usd IS NULL), 0)",
    }
    histograms = [f"count(*) FILTER (WHERE latency_bin = {i})" for i in range(BINS)]
    histograms += [f"count(*) FILTER (WHERE ttft_bin = {i})" for i in range(BINS)]
    columns = ["period", "period_start", "user_id", "api_key_id", "model", *COUNTERS]
    columns += [*_bins("latency"), *_bins("ttft")]
    return f"""
        INSERT INTO usage_rollups ({", ".join(columns)})
        SELECT {period}, period_start, user_id, api_key_id, model,
               {", ".join(sums[name] for name in COUNTERS)},
               {", ".join(histograms)}
        FROM (
            SELECT {epoch} / {period} * {period} AS period_start, user_id, coalesce(api_key_id, '') AS api_key_id,
                   model, status_code, source, input_tokens, output_tokens, cached_tokens, reasoning_tokens,
                   cost_usd, {bin_of("latency_ms")} AS latency_bin,
                   CASE WHEN ttft_ms IS NULL THEN -1 ELSE {bin_of("ttft_ms")} END AS ttft_bin
            FROM usage_records
        ) AS ledger
        GROUP BY period_start, user_id, api_key_id, model
        ORDER BY period_start  -- stored in time order, as the app's own writes will be
    """


def downgrade() -> None:
    op.drop_index("ix_usage_rollups_user_period", table_name="usage_rollups")
    op.drop_table("usage_rollups")
