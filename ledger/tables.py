"""The ledger's tables (DESIGN.md "Ledger tables") and the pure mapping from one event to its rows.

Every event table opens with the same header columns: the event's governance header, where it was
read (topic, partition, offset), its hashes and its raw bytes, so the ledger can be re-verified
on its own. Payload columns follow; arrays and records are kept as JSON text.

Nothing here touches storage: ``rows_for_event`` is a pure function from an event's bytes and
its decoded record to ``(table, row)`` pairs, shared by every backend.
"""
from __future__ import annotations

import json
import math
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
    # episode.summary (marl.run.lifecycle): one row per finished episode, the env's domain metrics
    _event_table("episode_summaries", (
        ("episode", "int"), ("steps", "int"), ("episode_return", "real"), ("agent_returns", "json"),
        ("metrics", "json"), ("text_metrics", "json"))),
    # policy.rollback (marl.policy.update, the policy chain beside policy.update): the safety gate
    # refused an update and restored the checkpoint taken before it; lineage = the window's events
    _event_table("policy_rollbacks", (
        ("algorithm", "text"), ("rejected_policy_version", "text"), ("rejected_weights_sha256", "bytes"),
        ("rejected_update_event_hash", "bytes"), ("restored_policy_version", "text"),
        ("checkpoint_weights_sha256", "bytes"), ("baseline", "real"), ("candidate", "real"), ("threshold", "real"),
        ("gate_ratio", "real"), ("window_decisions", "int"), ("window_reset_seeds", "json"), ("reason", "text"),
        ("lineage", "json"))),
    # curriculum.stage (marl.policy.update, chain {run}:curriculum): the curriculum changed the env's
    # stage; the window it judged (episode numbers, metric values) and its trend
    _event_table("curriculum_stages", (
        ("from_stage", "text"), ("to_stage", "text"), ("from_stage_index", "int"), ("to_stage_index", "int"),
        ("reason", "text"), ("metric", "text"), ("threshold", "real"), ("window_n", "int"), ("window_mean", "real"),
        ("window_std", "real"), ("window_min", "real"), ("window_max", "real"), ("trend_slope", "real"),
        ("trend_t", "real"), ("trend", "text"), ("window_episodes", "json"), ("window_values", "json"),
        ("stage_episodes", "int"), ("config_window", "int"), ("config_min_episodes", "int"),
        ("config_trend_t", "real"))),
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
    "episode_summary": "episode_summaries", "policy_rollback": "policy_rollbacks",
    "curriculum_stage": "curriculum_stages",
}


def _hex(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


_json = json.JSONEncoder(separators=(",", ":"), default=_hex).encode  # one encoder: the hot path


_FLOAT_FORMATS: dict[int, str] = {}


def _floats(values) -> str:
    """JSON of an array of floats (Avro ``float`` arrays): the hot path of materialization.

    ``%#.17g`` round-trips every double exactly and always writes a decimal point, so the text
    parses back to the very values ``_json`` would have written (``content_hash`` compares parsed
    JSON); it costs about half of ``repr``'s shortest-digits search. NaN and infinities (no valid
    JSON number) and anything that is not a plain float go through ``_json``."""
    n = len(values)
    if n == 0:
        return "[]"
    fmt = _FLOAT_FORMATS.get(n)
    if fmt is None:
        fmt = _FLOAT_FORMATS[n] = "[" + ",".join(["%#.17g"] * n) + "]"
    try:
        s = fmt % tuple(values)
    except TypeError:
        return _json(values)
    if "n" in s or type(values[0]) is not float:  # nan / inf; ints would gain a decimal point
        return _json(values)
    return s


def _protected(rec: dict) -> tuple[str, str]:
    fields = rec.get("protected_fields") or []
    if not fields:
        return "[]", ""
    refs = sorted({f["subject_ref"].hex() for f in fields})
    return _json(fields), " ".join(refs)


# Payload columns per schema, as a tuple in the table's column order (after the header columns).
# Each function below must match its table's columns (tests/unit/test_ledger_storage.py checks the
# stored values against the decoded events through the views and content hash).
_NONE6 = (None,) * 6
_NONE8 = (None,) * 8


def _finite(v):
    """``v`` with every infinite or NaN float as the string JavaScript and PostgreSQL's ``float8`` read
    back ("Infinity", "-Infinity", "NaN"): a Box space's unbounded limits are valid JSON then, which
    PostgreSQL's ``jsonb`` requires (Python's ``json`` would write a bare ``-Infinity``)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _p_run_started(r: dict) -> tuple:
    return (r["env_id"], r["env_version"], r["seed"], r["config_hash"], r["config_json"],
            _json(_finite(r["agents"])), _json(_finite(r["state_space"])), r["episodes_planned"]) + _NONE6


def _p_run_finished(r: dict) -> tuple:
    return _NONE8 + (r["status"], r["reason"], r["episodes"], r["steps"], r["mean_return"],
                     _json(r["chain_heads"]))


def _p_env_state(r: dict) -> tuple:
    pf, refs = _protected(r)
    flags = r["flags"]
    return (r["episode"], r["step"], _floats(r["state"]), _floats(r["collapsed_state"]),
            _json(flags) if flags else "[]", pf, refs)


def _p_agent_observation(r: dict) -> tuple:
    pf, refs = _protected(r)
    mask = r["action_mask"]
    return (r["episode"], r["step"], r["agent_id"], _floats(r["observation"]), _json(mask) if mask else "[]",
            pf, refs)


def _p_joint_action(r: dict) -> tuple:
    actions = r["actions"]
    return (r["episode"], r["step"], _json(actions), _floats(r["joint_vector"]),
            sum(a["reward"] for a in actions))


def _p_credit_assignment(r: dict) -> tuple:
    return (r["episode"], r["step"], r["joint_action_hash"], r["raw_reward"], r["global_reward"],
            _json(r["penalties"]), _json(r["shares"]))


def _p_fairness_metrics(r: dict) -> tuple:
    return (r["episode"], r["window"], r["window_start"], r["window_end"], _json(r["metrics"]),
            _json(r["agent_metrics"]))


def _metric_values(metrics: list) -> str:
    """JSON of ``[{name, value}]`` with a non-finite value as the string ``"NaN"``, ``"Infinity"`` or
    ``"-Infinity"``: valid JSON for both backends (PostgreSQL's jsonb refuses bare NaN), and each
    string casts back to the double (``::double precision``, Python's ``float``)."""
    if all(math.isfinite(m["value"]) for m in metrics):
        return _json(metrics)
    return _json([m if math.isfinite(v := m["value"]) else
                  {"name": m["name"], "value": "NaN" if v != v else "Infinity" if v > 0 else "-Infinity"}
                  for m in metrics])


def _p_episode_summary(r: dict) -> tuple:
    return (r["episode"], r["steps"], r["episode_return"], _json(r["agent_returns"]), _metric_values(r["metrics"]),
            _json(r["text_metrics"]))


def _p_policy_update(r: dict) -> tuple:
    return (r["algorithm"], r["config_hash"], r["seed"], r["parent_policy_version"], r["policy_updated"],
            r["optimizer_steps"], r["env_steps"], _json(r["losses"]), r["weights_sha256"], r["verified"])


def _p_policy_rollback(r: dict) -> tuple:
    return (r["algorithm"], r["rejected_policy_version"], r["rejected_weights_sha256"], r["rejected_update_event_hash"],
            r["restored_policy_version"], r["checkpoint_weights_sha256"], r["baseline"], r["candidate"],
            r["threshold"], r["gate_ratio"], r["window_decisions"], _json(r["window_reset_seeds"]), r["reason"],
            _json(r["lineage"]))


def _p_curriculum_stage(r: dict) -> tuple:
    return (r["from_stage"], r["to_stage"], r["from_stage_index"], r["to_stage_index"], r["reason"], r["metric"],
            r["threshold"], r["window_n"], r["window_mean"], r["window_std"], r["window_min"], r["window_max"],
            r["trend_slope"], r["trend_t"], r["trend"], _json(r["window_episodes"]), _json(r["window_values"]),
            r["stage_episodes"], r["config_window"], r["config_min_episodes"], r["config_trend_t"])


def _p_audit_checkpoint(r: dict) -> tuple:
    return (r["checked_topic"], r["checked_chain_id"], r["first_seq"], r["last_seq"], r["prev_head_hash"],
            r["head_event_hash"], r["merkle_root"], r["signer_key_id"], r["signature"])


def _p_compliance_deletion(r: dict) -> tuple:
    return (r["request_id"], r["requester"], r["legal_basis"], r["namespace"], r["subject_ref"],
            _json(r["actions"]))


def _p_dead_letter(r: dict) -> tuple:
    return (r["source_topic"], r["source_partition"], r["source_offset"], r["source_key"], r["error_kind"],
            r["reason"], r["consumer"], r["payload"], r["payload_sha256"])


_PAYLOAD = {
    "run_started": _p_run_started, "run_finished": _p_run_finished, "env_state": _p_env_state,
    "agent_observation": _p_agent_observation, "joint_action": _p_joint_action,
    "credit_assignment": _p_credit_assignment, "fairness_metrics": _p_fairness_metrics,
    "policy_update": _p_policy_update, "audit_checkpoint": _p_audit_checkpoint,
    "compliance_deletion": _p_compliance_deletion, "dead_letter": _p_dead_letter,
    "episode_summary": _p_episode_summary, "policy_rollback": _p_policy_rollback,
    "curriculum_stage": _p_curriculum_stage,
}
# schema name -> (table, payload builder), resolved once
ROW_BUILDERS = {name: (SCHEMA_TABLE[name], fn) for name, fn in _PAYLOAD.items()}


def row_tuples_for_event(schema_name: str, r: dict, topic: str, partition: int, offset: int,
                         value: bytes) -> list[tuple[str, tuple]]:
    """The ledger rows of one decoded event as tuples in each table's column order (``Table.columns``):
    its table's row, and lineage rows of a policy update. The materializer's hot path."""
    try:
        table, payload = ROW_BUILDERS[schema_name]
    except KeyError:
        raise KeyError(f"no ledger table for schema {schema_name!r}") from None
    seh = r["source_event_hashes"]
    row = (r["event_id"], topic, partition, offset, r["chain_id"], r["seq"], r["run_id"], r["event_type"],
           r["produced_at"], r["producer_id"], r["data_classification"], r["retention_expiry"],
           r["feature_schema_version"], r["policy_version"], r["rule_version"],
           b"".join(seh) if seh else b"", r["prev_event_hash"], bytes(value[-32:]), bytes(value)) + payload(r)
    if schema_name != "policy_update":
        return [(table, row)]
    out = [(table, row)]
    for i, lin in enumerate(r["lineage"]):
        out.append(("policy_update_lineage", (
            r["event_id"], i, lin["topic"], lin["partition"], lin["first_offset"], lin["last_offset"],
            lin["chain_id"], lin["first_seq"], lin["last_seq"], lin["head_event_hash"])))
    return out


def rows_for_event(schema_name: str, record: dict, topic: str, partition: int, offset: int,
                   value: bytes) -> list[tuple[str, dict]]:
    """The ledger rows of one decoded event as dicts (column -> value): its table's row, and lineage
    rows of a policy update. Same values as ``row_tuples_for_event``."""
    return [(table, dict(zip(TABLES[table].column_names, row)))
            for table, row in row_tuples_for_event(schema_name, record, topic, partition, offset, value)]


def split_hashes(blob: bytes) -> list[bytes]:
    """``source_event_hashes`` as stored (concatenated 32-byte digests) back into a list."""
    return [bytes(blob[i:i + 32]) for i in range(0, len(blob), 32)]
