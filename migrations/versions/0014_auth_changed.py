"""NOTIFY auth_changed when a transaction changes api_keys or tenants: results processes
forget the keys they remembered (shared/api/keycache.py)

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("api_keys", "tenants")


def upgrade() -> None:
    # Statement-level: one notice per statement however many rows it changed, and Postgres
    # folds identical notices of one transaction into one, sent when it commits.
    op.execute("""
        CREATE FUNCTION auth_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('auth_changed', TG_TABLE_NAME);
            RETURN NULL;
        END $$
    """)
    for table in TABLES:
        op.execute(
            f"CREATE TRIGGER auth_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
            f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION auth_changed()"
        )


def downgrade() -> None:
    for table in TABLES:
        op.execute(f"DROP TRIGGER auth_changed ON {table}")
    op.execute("DROP FUNCTION auth_changed()")
