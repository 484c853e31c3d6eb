"""The ledger: marl.* topics materialized into auditable tables (SQLCipher by default, PostgreSQL
for shared access), with retention purge, subject erasure, rebuild and re-verification.

Imports only ``eventlog`` and ``schemas`` (DESIGN.md); ``marlgrc`` wires it to the CLI.
"""
from .erasure import Erasure
from .ingest import Finding, IngestKind
from .keys import EnvKey, KeyFile, KeyProvider, LedgerKeyError, StaticKey
from .lifecycle import erase_subject, purge_expired, rebuild
from .materialize import IngestStats, Materializer, sync
from .store import (AppendOnlyError, DeletionSummary, Evidence, LedgerAccessError, LedgerError, LedgerStore,
                    SqliteLedger, drop_sqlite)
from .verify import LedgerReport, verify_ledger

__all__ = [
    "AppendOnlyError", "DeletionSummary", "EnvKey", "Erasure", "Evidence", "Finding", "IngestKind", "IngestStats",
    "KeyFile", "KeyProvider", "LedgerAccessError", "LedgerError", "LedgerKeyError", "LedgerReport", "LedgerStore",
    "Materializer", "SqliteLedger", "StaticKey", "drop_sqlite", "erase_subject", "purge_expired", "rebuild", "sync",
    "verify_ledger",
]
