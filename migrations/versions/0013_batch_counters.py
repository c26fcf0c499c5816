"""batch counters kept by triggers (images by status, rejected files, predictions by model
version and warning, a change version) with NOTIFY batch_changed; studies by (batch_id, id)

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = ("queued", "running", "done", "failed", "stored")
SHARDS = 16  # shared.db.models.COUNTER_SHARDS when this revision was written
SHARD = f"(pg_backend_pid() % {SHARDS})::smallint"


def _add_to_image_counts(changes: str) -> str:
    """Add `changes` (rows of batch_id, status, rejected, delta) to the writer's shard, one
    upsert per batch in batch order (two statements never wait on each other's rows in
    opposite orders), and NOTIFY each batch once it commits."""
    sums = ", ".join(f"coalesce(sum(delta) FILTER (WHERE status = '{s}'), 0)" for s in STATUSES)
    columns = ", ".join(STATUSES)
    added = ", ".join(f"{s} = c.{s} + excluded.{s}" for s in STATUSES)
    return f"""
        WITH changed AS (
            INSERT INTO batch_image_counts AS c (batch_id, shard, {columns}, rejected, version)
            SELECT batch_id, {SHARD}, {sums}, coalesce(sum(delta) FILTER (WHERE rejected), 0), 1
            FROM ({changes}) AS changes
            GROUP BY batch_id
            ORDER BY batch_id
            ON CONFLICT (batch_id, shard) DO UPDATE
            SET {added}, rejected = c.rejected + excluded.rejected, version = c.version + 1
            RETURNING batch_id
        )
        SELECT count(pg_notify('batch_changed', batch_id::text)) INTO notified FROM changed;
    """


def _add_to_prediction_counts(rows: str, sign: int) -> str:
    """Count the predictions in transition table `rows` (+1 or -1) per batch, model version and
    warning ('' for every scored image), then bump their batches' versions."""
    changes = f"""
        SELECT i.batch_id, p.model_version_id, w.code, {sign} AS delta
        FROM {rows} AS p
        JOIN images AS i ON i.id = p.image_id
        CROSS JOIN LATERAL unnest(array_prepend('', p.warnings::text[])) AS w(code)
    """
    return f"""
        INSERT INTO batch_prediction_counts AS c (batch_id, model_version_id, warning, shard, images)
        SELECT batch_id, model_version_id, code, {SHARD}, sum(delta)
        FROM ({changes}) AS changes
        GROUP BY batch_id, model_version_id, code
        ORDER BY batch_id, model_version_id, code
        ON CONFLICT (batch_id, model_version_id, warning, shard) DO UPDATE
        SET images = c.images + excluded.images;
    """ + _add_to_image_counts(
        f"SELECT DISTINCT i.batch_id, NULL::text AS status, false AS rejected, 0 AS delta "
        f"FROM {rows} AS p JOIN images AS i ON i.id = p.image_id"
    )


def _function(name: str, branches: dict[str, str]) -> str:
    body = "\n".join(
        f"{'IF' if index == 0 else 'ELSIF'} TG_OP = '{op_name}' THEN {sql}"
        for index, (op_name, sql) in enumerate(branches.items())
    )
    return f"""
        CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE notified bigint;
        BEGIN
            {body}
            END IF;
            RETURN NULL;
        END $$
    """


def _image_change(rows: str, sign: int) -> str:
    return f"SELECT batch_id, status::text, false AS rejected, {sign} AS delta FROM {rows}"


IMAGE_COUNTS = _function(
    "batch_counts_images",
    {
        "INSERT": _add_to_image_counts(_image_change("new_rows", 1)),
        "UPDATE": _add_to_image_counts(f"""
        SELECT n.batch_id, n.status::text, false AS rejected, 1 AS delta
        FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id WHERE o.status <> n.status
        UNION ALL
        SELECT o.batch_id, o.status::text, false, -1
        FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id WHERE o.status <> n.status
    """),
        "DELETE": _add_to_image_counts(_image_change("old_rows", -1)),
    },
)
PREDICTION_COUNTS = _function(
    "batch_counts_predictions",
    {
        "INSERT": _add_to_prediction_counts("new_rows", 1),
        "DELETE": _add_to_prediction_counts("old_rows", -1),
    },
)
REJECTED_COUNTS = _function(
    "batch_counts_rejected",
    {
        "INSERT": _add_to_image_counts(
            "SELECT batch_id, NULL::text AS status, true AS rejected, 1 AS delta FROM new_rows"
        ),
        "DELETE": _add_to_image_counts(
            "SELECT batch_id, NULL::text AS status, true AS rejected, -1 AS delta FROM old_rows"
        ),
    },
)


def _triggers(table: str, function: str, events: Sequence[str]) -> list[str]:
    tables = {
        "INSERT": "NEW TABLE AS new_rows",
        "DELETE": "OLD TABLE AS old_rows",
        "UPDATE": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
    }
    return [
        f"""CREATE TRIGGER {function}_{event.lower()} AFTER {event} ON {table}
            REFERENCING {tables[event]} FOR EACH STATEMENT EXECUTE FUNCTION {function}()"""
        for event in events
    ]


def upgrade() -> None:
    op.create_table(
        "batch_image_counts",
        sa.Column("batch_id", sa.Uuid(), nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        *(
            sa.Column(name, sa.BigInteger(), nullable=False)
            for name in (*STATUSES, "rejected", "version")
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
            name=op.f("fk_batch_image_counts_batch_id_batches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("batch_id", "shard", name=op.f("pk_batch_image_counts")),
    )
    op.create_table(
        "batch_prediction_counts",
        sa.Column("batch_id", sa.Uuid(), nullable=False),
        sa.Column("model_version_id", sa.Uuid(), nullable=False),
        sa.Column("warning", sa.String(length=64), nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.Column("images", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
            name=op.f("fk_batch_prediction_counts_batch_id_batches"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_batch_prediction_counts_model_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint(
            "batch_id",
            "model_version_id",
            "warning",
            "shard",
            name=op.f("pk_batch_prediction_counts"),
        ),
    )
    op.create_index("ix_studies_batch_id_id", "studies", ["batch_id", "id"], unique=False)
    # What is there already, in shard 0.
    sums = ", ".join(f"count(*) FILTER (WHERE i.status = '{s}')" for s in STATUSES)
    op.execute(f"""
        INSERT INTO batch_image_counts (batch_id, shard, {", ".join(STATUSES)}, rejected, version)
        SELECT b.id, 0, {sums},
               (SELECT count(*) FROM rejected_files AS r WHERE r.batch_id = b.id), 1
        FROM batches AS b LEFT JOIN images AS i ON i.batch_id = b.id
        GROUP BY b.id
    """)
    op.execute("""
        INSERT INTO batch_prediction_counts (batch_id, model_version_id, warning, shard, images)
        SELECT i.batch_id, p.model_version_id, w.code, 0, count(*)
        FROM predictions AS p JOIN images AS i ON i.id = p.image_id
        CROSS JOIN LATERAL unnest(array_prepend('', p.warnings::text[])) AS w(code)
        GROUP BY i.batch_id, p.model_version_id, w.code
    """)
    for function in (IMAGE_COUNTS, PREDICTION_COUNTS, REJECTED_COUNTS):
        op.execute(function)
    for trigger in (
        *_triggers("images", "batch_counts_images", ("INSERT", "UPDATE", "DELETE")),
        *_triggers("predictions", "batch_counts_predictions", ("INSERT", "DELETE")),
        *_triggers("rejected_files", "batch_counts_rejected", ("INSERT", "DELETE")),
    ):
        op.execute(trigger)
    # A batch's own status (open, processing, completed) wakes its long polls too.
    op.execute("""
        CREATE FUNCTION batch_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('batch_changed', NEW.id::text);
            RETURN NULL;
        END $$
    """)
    op.execute("""
        CREATE TRIGGER batch_changed AFTER UPDATE ON batches FOR EACH ROW
        WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION batch_changed()
    """)


def downgrade() -> None:
    op.execute("DROP TRIGGER batch_changed ON batches")
    op.execute("DROP FUNCTION batch_changed()")
    for table, function, events in (
        ("images", "batch_counts_images", ("insert", "update", "delete")),
        ("predictions", "batch_counts_predictions", ("insert", "delete")),
        ("rejected_files", "batch_counts_rejected", ("insert", "delete")),
    ):
        for event in events:
            op.execute(f"DROP TRIGGER {function}_{event} ON {table}")
        op.execute(f"DROP FUNCTION {function}()")
    op.drop_index("ix_studies_batch_id_id", table_name="studies")
    op.drop_table("batch_prediction_counts")
    op.drop_table("batch_image_counts")
