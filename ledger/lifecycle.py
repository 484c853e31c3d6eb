"""The ledger's procedures: retention purge, subject erasure and rebuild from the topics."""
from __future__ import annotations

from typing import Callable

from .materialize import IngestStats, sync
from .store import DeletionSummary, LedgerStore


def purge_expired(ledger: LedgerStore, now_micros: int | None = None) -> DeletionSummary:
    """Delete every row past its ``retention_expiry``, in one transaction, with evidence."""
    return ledger.purge(now_micros)


def erase_subject(ledger: LedgerStore, subject_ref: bytes, request_id: str, requester: str,
                  legal_basis: str) -> DeletionSummary:
    """Delete every row carrying the subject's pseudonym ``subject_ref`` (from the events'
    ``protected_fields[].subject_ref``) in one transaction, with a tombstone in ``deletion_events``.

    The caller (``marlgrc forget``) shreds the subject's key and publishes the
    ``marl.compliance.deletions`` event; this is the ledger's part.
    """
    return ledger.erase_subject(subject_ref, request_id, requester, legal_basis)


def rebuild(open_empty: Callable[[], LedgerStore], bootstrap: str, *, prefix: str = "",
            commit_every: int = 5000, reapply_erasures: bool = True) -> tuple[LedgerStore, IngestStats]:
    """Materialize a fresh ledger (``open_empty`` drops and recreates it) from the topics, then apply
    again every erasure recorded on ``marl.compliance.deletions``, so an erased subject does not come
    back from the topics."""
    ledger = open_empty()
    stats = sync(ledger, bootstrap, prefix=prefix, commit_every=commit_every)
    if reapply_erasures:
        for request_id, requester, basis, ref in ledger.query(
                "SELECT request_id, requester, legal_basis, subject_ref FROM compliance_deletions ORDER BY produced_at"):
            erase_subject(ledger, bytes(ref), request_id, requester, basis)
    return ledger, stats
