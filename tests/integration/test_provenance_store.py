"""Provenance columns through jobs.store on SQLite and PostgreSQL (PostgreSQL stores via COPY)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from jobs import store
from jobs.models import Batch

SOURCES = {"image_url": {"source": "images/a.png", "sha256": "ab" * 32}}
PRICES = {"unit": "video", "factors": [], "usd_per_unit": "0.4", "source": "test"}


def new_job(i: int, item: int, variant: int, sources: dict[str, Any] | None) -> store.NewJob:
    return store.NewJob(
        key=f"{i:064x}",
        item_index=item,
        endpoint="fal-ai/wan-i2v",
        input={"prompt": f"job {i}"},
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.40"),
        variant=variant,
        source_files=sources,
        registry_sha256="cd" * 32,
        price_table=PRICES,
    )


def test_variant_and_provenance_are_stored_and_jobs_come_in_item_then_variant_order(
    session: Session,
) -> None:
    batch, _ = store.get_or_create_batch(
        session,
        name="p",
        manifest_path="/m.yaml",
        manifest_sha256="0" * 64,
        budget_max_usd=None,
        manifest_text="name: p\n",
    )
    # Stored out of order: the export order comes from item and variant, not insertion.
    jobs = [
        new_job(0, 1, 1, SOURCES),
        new_job(1, 0, 1, None),
        new_job(2, 1, 0, SOURCES),
        new_job(3, 0, 0, None),
    ]
    assert store.add_jobs(session, batch.id, jobs) == (4, 0)
    session.commit()
    stored = list(store.jobs_of_batch(session, batch.id))
    assert [(j.item_index, j.variant) for j in stored] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [j.source_files for j in stored] == [None, None, SOURCES, SOURCES]
    assert {j.registry_sha256 for j in stored} == {"cd" * 32}
    assert all(j.price_table == PRICES for j in stored)
    assert session.get(Batch, batch.id).manifest_text == "name: p\n"  # type: ignore[union-attr]

    store.set_batch_manifest(session, batch.id, "name: p\n# edited\n", "1" * 64)
    session.commit()
    session.expire_all()
    again = session.get(Batch, batch.id)
    assert again is not None
    assert (again.manifest_text, again.manifest_sha256) == ("name: p\n# edited\n", "1" * 64)
