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
    Idempotent per request: the same request id again for the same subject writes no second
    tombstone and returns the first one's counts (``DeletionSummary.repeated``), deleting only rows of
    the subject stored since, under the same request id.

    The caller (``marlgrc forget``) shreds the subject's key and publishes the
    ``marl.compliance.deletions`` event; this is the ledger's part. A ledger that ``forget`` did not
    reach applies that event when it syncs (``ledger.erasure``).
    """
    return ledger.erase_subject(subject_ref, request_id, requester, legal_basis)


def rebuild(open_empty: Callable[[], LedgerStore], bootstrap: str, *, prefix: str = "",
            commit_every: int = 5000) -> tuple[LedgerStore, IngestStats]:
    """Materialize a fresh ledger (``open_empty`` drops and recreates it) from the topics. The sync
    applies every erasure recorded on ``marl.compliance.deletions`` as it reads it, and deletes rows of
    an erased subject that the topics deliver after it, so an erased subject does not come back."""
    ledger = open_empty()
    stats = sync(ledger, bootstrap, prefix=prefix, commit_every=commit_every)
    return ledger, stats
