"""Erasure in the ledger, as rules: which erasures a batch's transaction applies after its rows.

Pure functions of a checked batch's rows and the erasures the ledger has applied so far; the SQL
is in ``ledger/store.py`` and ``ledger/postgres.py``, the loop in ``ledger/materialize.py``.

The sync applies every ``compliance.deletion`` event it stores: after the batch's rows are
inserted, in the same transaction, every row carrying the event's ``subject_ref`` is deleted with
evidence, and a tombstone is written unless this ledger holds one for that request and subject
already (``LedgerStore.erase_subject`` is idempotent per request). Topics are read interleaved and
their order is not guaranteed, so a subject's rows can also arrive after its erasure (a rebuild
reading ``marl.env.state`` after ``marl.compliance.deletions``, a ledger synced after ``forget``):
every batch's rows are matched against every erasure the ledger holds, and the late rows are deleted
in the batch's own transaction under the erasure's request, with evidence and no second tombstone.
No erased subject's row survives a committed batch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .tables import EVENT_TABLES, TABLES

__all__ = ["Erasure", "deletion_erasures", "plan_erasures"]

_SUBJECT_COLUMN = {t.name: t.column_names.index("subject_refs") for t in EVENT_TABLES if t.subject_refs}
_DELETIONS = TABLES["compliance_deletions"]
_D = {c: i for i, c in enumerate(_DELETIONS.column_names)}


@dataclass(frozen=True)
class Erasure:
    """One erasure request for one subject (its 32-byte pseudonym). ``event_ids``: only those rows
    (a batch's late rows of a subject erased before); ``None``: every row of the subject."""

    subject_ref: bytes
    request_id: str
    requester: str
    legal_basis: str
    event_ids: tuple[str, ...] | None = None


def deletion_erasures(rows: dict[str, list[tuple]]) -> list[Erasure]:
    """The erasures named by a batch's ``compliance_deletions`` rows, in their order. A field the
    event leaves empty is named after the event (an erasure needs a request id, a requester and a
    legal basis; the event is honoured all the same)."""
    out = []
    for r in rows.get(_DELETIONS.name, ()):
        event_id = r[_D["event_id"]]
        out.append(Erasure(bytes(r[_D["subject_ref"]]),
                           r[_D["request_id"]] or f"compliance.deletion {event_id}",
                           r[_D["requester"]] or f"(none named in compliance.deletion {event_id})",
                           r[_D["legal_basis"]] or f"(none named in compliance.deletion {event_id})"))
    return out


def plan_erasures(rows: dict[str, list[tuple]], known: dict[bytes, Erasure]
                  ) -> tuple[list[Erasure], dict[bytes, Erasure]]:
    """What a batch's transaction erases after inserting ``rows``, given the erasures the ledger holds
    (``known``: subject_ref -> the first request that erased it).

    First every deletion event of the batch, for all of its subject's rows (those stored before and
    those of this batch); then, for each subject of ``known`` without a deletion event in this batch,
    the batch's rows that carry it (late rows), under its request. Returns the erasures and ``known``
    after the batch (a new copy)."""
    new = deletion_erasures(rows)
    whole = {e.subject_ref for e in new}
    after = dict(known)
    for e in new:
        after.setdefault(e.subject_ref, e)
    late: dict[bytes, list[str]] = {}
    if known:
        wanted = {ref.hex(): ref for ref in known if ref not in whole}
        if wanted:
            for table, col in _SUBJECT_COLUMN.items():
                for r in rows.get(table, ()):
                    refs = r[col]
                    if refs:  # most rows carry no subject: the empty string
                        for h in refs.split():
                            ref = wanted.get(h)
                            if ref is not None:
                                late.setdefault(ref, []).append(r[0])
    return new + [replace(known[ref], event_ids=tuple(ids)) for ref, ids in late.items()], after
