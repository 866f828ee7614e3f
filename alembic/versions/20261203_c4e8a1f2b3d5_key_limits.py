"""key limits: requests and tokens per minute, and a monthly budget, per API key

Nullable columns (no limit) added with plain add_column: on SQLite a batch operation
would drop the search triggers of revision 0a588a7ab69b.

Revision ID: c4e8a1f2b3d5
Revises: b7e1c2d3a4f5
Create Date: 2026-12-03 17:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c4e8a1f2b3d5"
down_revision: str | None = "b7e1c2d3a4f5"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("rpm_limit", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("tpm_limit", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("budget_usd", sa.Numeric(20, 10), nullable=True))


def downgrade() -> None:
    op.drop_column("api_keys", "budget_usd")
    op.drop_column("api_keys", "tpm_limit")
    op.drop_column("api_keys", "rpm_limit")
