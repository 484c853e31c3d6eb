"""The ledger's tables (DESIGN.md "Ledger tables") and the pure mapping from one event to its rows.

Every event table opens with the same header columns: the event's governance header, where it was
read (topic, partition, offset), its hashes and its raw bytes, so the ledger can be re-verified
on its own. Payload columns follow; arrays and records are kept as JSON text.

Nothing here touches storage: ``rows_for_event`` is a pure function from an event's bytes and
its decoded record to ``(table, row)`` pairs, shared by every backend.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

# column kinds: text, int, real, bool, bytes, json
HEADER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("event_id", "text"), ("topic", "text"), ("kafka_partition", "int"), ("kafka_offset", "int"),
    ("chain_id", "text"), ("seq", "int"), ("run_id", "text"), ("event_type", "text"),
    ("produced_at", "int"), ("producer_id", "text"), ("data_classification", "text"),
    ("retention_expiry", "int"), ("feature_schema_version", "text"), ("policy_version", "text"),
    ("rule_version", "text"), ("source_event_hashes", "bytes"), ("prev_event_hash", "bytes"),
    ("event_hash", "bytes"), ("raw", "bytes"),
)


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]
    restricted: frozenset[str] = frozenset()   # never shown to analysts
    event_table: bool = True                   # carries the header and is append-only
    subject_refs: bool = False                 # rows may carry a data subject's pseudonym

    @property
    def column_names(self) -> list[str]:
        return [c for c, _ in self.columns]


def _event_table(name: str, payload: tuple[tuple[str, str], ...], restricted: tuple[str, ...] = (),
                 subject_refs: bool = False) -> Table:
    return Table(name, HEADER_COLUMNS + payload, frozenset(("raw",) + restricted), True, subject_refs)


_PROTECTED = (("protected_fields", "json"), ("subject_refs", "text"))

EVENT_TABLES: tuple[Table, ...] = (
    _event_table("runs", (
        ("env_id", "text"), ("env_version", "text"), ("seed", "int"), ("config_hash", "text"),
        ("config_json", "text"), ("agents", "json"), ("state_space", "json"), ("episodes_planned", "int"),
        ("status", "text"), ("reason", "text"), ("episodes", "int"), ("steps", "int"),
        ("mean_return", "real"), ("chain_heads", "json"))),
    _event_table("environment_states", (
        ("episode", "int"), ("step", "int"), ("state", "json"), ("collapsed_state", "json"),
        ("flags", "json")) + _PROTECTED, ("protected_fields", "subject_refs"), subject_refs=True),
    _event_table("agent_observations", (
        ("episode", "int"), ("step", "int"), ("agent_id", "text"), ("observation", "json"),
        ("action_mask", "json")) + _PROTECTED, ("protected_fields", "subject_refs"), subject_refs=True),
    _event_table("joint_actions", (
        ("episode", "int"), ("step", "int"), ("actions", "json"), ("joint_vector", "json"),
        ("team_reward", "real"))),
    _event_table("di_credit_assignment", (
        ("episode", "int"), ("step", "int"), ("joint_action_hash", "bytes"), ("raw_reward", "real"),
        ("global_reward", "real"), ("penalties", "json"), ("shares", "json"))),
    _event_table("fairness_metrics", (
        ("episode", "int"), ("window_kind", "text"), ("window_start", "int"), ("window_end", "int"),
        ("metrics", "json"), ("agent_metrics", "json"))),
    _event_table("policy_updates", (
        ("algorithm", "text"), ("config_hash", "text"), ("seed", "int"), ("parent_policy_version", "text"),
        ("policy_updated", "bool"), ("optimizer_steps", "int"), ("env_steps", "int"), ("losses", "json"),
        ("weights_sha256", "bytes"), ("verified", "bool"))),
    _event_table("audit_checkpoints", (
        ("checked_topic", "text"), ("checked_chain_id", "text"), ("first_seq", "int"), ("last_seq", "int"),
        ("prev_head_hash", "bytes"), ("head_event_hash", "bytes"), ("merkle_root", "bytes"),
        ("signer_key_id", "bytes"), ("signature", "bytes"))),
    # Not named in DESIGN.md's list, but every marl.* topic is materialized, so these two hold
    # marl.compliance.deletions and marl.dlq.
    _event_table("compliance_deletions", (
        ("request_id", "text"), ("requester", "text"), ("legal_basis", "text"), ("namespace", "text"),
        ("subject_ref", "bytes"), ("actions", "json")), ("subject_ref",)),
    _event_table("dead_letters", (
        ("source_topic", "text"), ("source_partition", "int"), ("source_offset", "int"),
        ("source_key", "bytes"), ("error_kind", "text"), ("reason", "text"), ("consumer", "text"),
        ("payload", "bytes"), ("payload_sha256", "bytes")), ("source_key", "payload")),
)

LINEAGE = Table("policy_update_lineage", (
    ("policy_update_event_id", "text"), ("idx", "int"), ("lineage_topic", "text"),
    ("lineage_partition", "int"), ("first_offset", "int"), ("last_offset", "int"), ("chain_id", "text"),
    ("first_seq", "int"), ("last_seq", "int"), ("head_event_hash", "bytes")), event_table=False)

DELETION_EVENTS = Table("deletion_events", (
    ("deletion_id", "int"), ("kind", "text"), ("request_id", "text"), ("requester", "text"),
    ("legal_basis", "text"), ("subject_ref", "bytes"), ("deleted_at", "int"), ("cutoff", "int"),
    ("counts", "json"), ("source_table", "text"), ("topic", "text"), ("chain_id", "text"),
    ("first_seq", "int"), ("last_seq", "int"), ("row_count", "int"), ("merkle_root", "bytes"),
    ("prev_hash", "bytes"), ("head_hash", "bytes")), frozenset({"subject_ref"}), event_table=False)

INTEGRITY_FINDINGS = Table("integrity_findings", (
    ("finding_id", "int"), ("found_at", "int"), ("kind", "text"), ("topic", "text"),
    ("kafka_partition", "int"), ("kafka_offset", "int"), ("chain_id", "text"), ("seq", "int"),
    ("event_id", "text"), ("detail", "text")), event_table=False)

INGEST_OFFSETS = Table("ingest_offsets", (
    ("topic", "text"), ("kafka_partition", "int"), ("next_offset", "int")), event_table=False)

ALL_TABLES: tuple[Table, ...] = EVENT_TABLES + (LINEAGE, DELETION_EVENTS, INTEGRITY_FINDINGS, INGEST_OFFSETS)
TABLES = {t.name: t for t in ALL_TABLES}

# schema name (eventlog codec) -> ledger table
SCHEMA_TABLE = {
    "run_started": "runs", "run_finished": "runs", "env_state": "environment_states",
    "agent_observation": "agent_observations", "joint_action": "joint_actions",
    "credit_assignment": "di_credit_assignment", "fairness_metrics": "fairness_metrics",
    "policy_update": "policy_updates", "audit_checkpoint": "audit_checkpoints",
    "compliance_deletion": "compliance_deletions", "dead_letter": "dead_letters",
}


def _hex(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


_json = json.JSONEncoder(separators=(",", ":"), default=_hex).encode  # one encoder: the hot path


def _protected(rec: dict) -> tuple[str, str]:
    fields = rec.get("protected_fields") or []
    refs = sorted({f["subject_ref"].hex() for f in fields})
    return _json(fields), " ".join(refs)


def _payload(name: str, r: dict) -> dict:
    if name == "run_started":
        return {"env_id": r["env_id"], "env_version": r["env_version"], "seed": r["seed"],
                "config_hash": r["config_hash"], "config_json": r["config_json"], "agents": _json(r["agents"]),
                "state_space": _json(r["state_space"]), "episodes_planned": r["episodes_planned"]}
    if name == "run_finished":
        return {"status": r["status"], "reason": r["reason"], "episodes": r["episodes"], "steps": r["steps"],
                "mean_return": r["mean_return"], "chain_heads": _json(r["chain_heads"])}
    if name in ("env_state", "agent_observation"):
        pf, refs = _protected(r)
        out = {"episode": r["episode"], "step": r["step"], "protected_fields": pf, "subject_refs": refs}
        if name == "env_state":
            out.update(state=_json(r["state"]), collapsed_state=_json(r["collapsed_state"]), flags=_json(r["flags"]))
        else:
            out.update(agent_id=r["agent_id"], observation=_json(r["observation"]),
                       action_mask=_json(r["action_mask"]))
        return out
    if name == "joint_action":
        return {"episode": r["episode"], "step": r["step"], "actions": _json(r["actions"]),
                "joint_vector": _json(r["joint_vector"]), "team_reward": sum(a["reward"] for a in r["actions"])}
    if name == "credit_assignment":
        return {"episode": r["episode"], "step": r["step"], "joint_action_hash": r["joint_action_hash"],
                "raw_reward": r["raw_reward"], "global_reward": r["global_reward"],
                "penalties": _json(r["penalties"]), "shares": _json(r["shares"])}
    if name == "fairness_metrics":
        return {"episode": r["episode"], "window_kind": r["window"], "window_start": r["window_start"],
                "window_end": r["window_end"], "metrics": _json(r["metrics"]),
                "agent_metrics": _json(r["agent_metrics"])}
    if name == "policy_update":
        return {k: r[k] for k in ("algorithm", "config_hash", "seed", "parent_policy_version", "policy_updated",
                                  "optimizer_steps", "env_steps", "weights_sha256", "verified")} | {
            "losses": _json(r["losses"])}
    if name == "audit_checkpoint":
        return {k: r[k] for k in ("checked_topic", "checked_chain_id", "first_seq", "last_seq", "prev_head_hash",
                                  "head_event_hash", "merkle_root", "signer_key_id", "signature")}
    if name == "compliance_deletion":
        return {k: r[k] for k in ("request_id", "requester", "legal_basis", "namespace", "subject_ref")} | {
            "actions": _json(r["actions"])}
    if name == "dead_letter":
        return {k: r[k] for k in ("source_topic", "source_partition", "source_offset", "source_key", "error_kind",
                                  "reason", "consumer", "payload", "payload_sha256")}
    raise KeyError(f"no ledger table for schema {name!r}")


def rows_for_event(schema_name: str, record: dict, topic: str, partition: int, offset: int,
                   value: bytes) -> list[tuple[str, dict]]:
    """The ledger rows of one decoded event: its table's row, and lineage rows of a policy update."""
    table = SCHEMA_TABLE.get(schema_name)
    if table is None:
        raise KeyError(f"no ledger table for schema {schema_name!r}")
    r = record
    row = {
        "event_id": r["event_id"], "topic": topic, "kafka_partition": partition, "kafka_offset": offset,
        "chain_id": r["chain_id"], "seq": r["seq"], "run_id": r["run_id"], "event_type": r["event_type"],
        "produced_at": r["produced_at"], "producer_id": r["producer_id"],
        "data_classification": r["data_classification"], "retention_expiry": r["retention_expiry"],
        "feature_schema_version": r["feature_schema_version"], "policy_version": r["policy_version"],
        "rule_version": r["rule_version"], "source_event_hashes": b"".join(r["source_event_hashes"]),
        "prev_event_hash": r["prev_event_hash"], "event_hash": bytes(value[-32:]), "raw": bytes(value),
    }
    row.update(_payload(schema_name, r))
    out = [(table, row)]
    if schema_name == "policy_update":
        for i, lin in enumerate(r["lineage"]):
            out.append(("policy_update_lineage", {
                "policy_update_event_id": r["event_id"], "idx": i, "lineage_topic": lin["topic"],
                "lineage_partition": lin["partition"], "first_offset": lin["first_offset"],
                "last_offset": lin["last_offset"], "chain_id": lin["chain_id"], "first_seq": lin["first_seq"],
                "last_seq": lin["last_seq"], "head_event_hash": lin["head_event_hash"]}))
    return out


def split_hashes(blob: bytes) -> list[bytes]:
    """``source_event_hashes`` as stored (concatenated 32-byte digests) back into a list."""
    return [bytes(blob[i:i + 32]) for i in range(0, len(blob), 32)]
