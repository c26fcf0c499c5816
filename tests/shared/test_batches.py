from __future__ import annotations

import csv
import io

from sqlalchemy.orm import Session

from shared.batches import (
    EXPORT_COLUMNS,
    export_csv,
    get_batch,
    image_counts,
    list_batches,
    results_page,
)
from tests.factories import make_batch, make_image, make_tenant


def test_queries_are_scoped_to_the_tenant(session: Session) -> None:
    owner, _ = make_tenant(session)
    other, _ = make_tenant(session)
    batch = make_batch(session, owner)
    make_image(session, batch)
    assert get_batch(session=session, tenant_id=other.id, batch_id=batch.id) is None
    assert list_batches(session=session, tenant_id=other.id, limit=10, before=None) == []
    assert (
        results_page(session=session, tenant_id=other.id, batch_id=batch.id, limit=10, after=None)
        == []
    )
    assert sum(image_counts(session=session, tenant_id=other.id, batch_id=batch.id).values()) == 0
    assert image_counts(session=session, tenant_id=owner.id, batch_id=batch.id)["queued"] == 1


def test_batches_list_newest_first_with_keyset_pages(session: Session) -> None:
    tenant, _ = make_tenant(session)
    made = [make_batch(session, tenant, name=f"b{i}") for i in range(5)]
    first = list_batches(session=session, tenant_id=tenant.id, limit=2, before=None)
    assert [b.name for b in first] == ["b4", "b3"]
    rest = list_batches(
        session=session, tenant_id=tenant.id, limit=10, before=(first[-1].created_at, first[-1].id)
    )
    assert [b.name for b in rest] == ["b2", "b1", "b0"]
    assert len({b.id for b in first + rest}) == len(made)


def test_the_csv_export_is_written_by_postgres_and_a_stopped_one_gives_up_its_connection(
    session: Session,
) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    images = [make_image(session, batch, study_key=f"s{i}") for i in range(3)]
    images[0].filename = 'comma, "quoted"\nname.dcm'  # CSV must quote it whole
    session.commit()

    whole = b"".join(export_csv(session=session, tenant_id=tenant.id, batch_id=batch.id))
    rows = list(csv.reader(io.StringIO(whole.decode())))
    assert tuple(rows[0]) == EXPORT_COLUMNS
    assert [row[0] for row in rows[1:]] == [str(image.id) for image in images]
    assert rows[1][1] == 'comma, "quoted"\nname.dcm'
    assert {row[5] for row in rows[1:]} == {"queued"}
    assert {row[6] for row in rows[1:]} == {""}  # not scored: NULL is an empty field
    session.rollback()

    stopped = export_csv(session=session, tenant_id=tenant.id, batch_id=batch.id)
    connection = session.connection()
    next(stopped)
    stopped.close()  # as when the client goes away mid-download
    assert connection.invalidated
    session.rollback()
    assert image_counts(session=session, tenant_id=tenant.id, batch_id=batch.id)["queued"] == 3
