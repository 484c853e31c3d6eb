"""Writes the test vectors: tests/vectors/hashing.json (events as hex, hashes, a checkpoint, an
inclusion proof) and tests/vectors/tamper/<corruption>/ (a bundle per corruption + expected.json).

    ./dev python tools/make_vectors.py    # or: python tools/make_vectors.py with PYTHONPATH=.
hashing.json is deterministic (fixed clock, fixed event-id prefixes, a signing key derived from a
fixed seed; Ed25519 signatures are deterministic), and a test checks the file still matches the code.
"""
from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import schemas  # noqa: E402
from tests import corruptions  # noqa: E402
from eventlog.bundle import write_bundle  # noqa: E402
from eventlog.checkpoint import Signer, public_key_pem, public_key_raw  # noqa: E402
from eventlog.codec import Codec, default_codec  # noqa: E402
from eventlog.kafka import Record  # noqa: E402
from eventlog.log import EventLog, MemorySink  # noqa: E402
from eventlog.merkle import inclusion_proof, leaf_hash, merkle_root  # noqa: E402
from tests.synthetic import synthetic_run  # noqa: E402

VECTORS = ROOT / "tests" / "vectors"
SIGNER = Signer.from_seed(b"marlgrc test vectors")
T0 = 1_795_000_000_000_000  # 2026-11-18T09:46:40Z in microseconds
# The vectors were published with joint_action as it was then (schemas/history/joint_action.v0.avsc,
# before decision_tier): they are written with that schema, so they stay the bytes auditors hold, and
# current readers read them through the history (docs/HASHING.md, "Schema evolution").
VECTOR_CODEC = Codec({**schemas.current(), "joint_action": schemas.history()["joint_action.v0"]}, schemas.history())


def deterministic_log(sink, run_id: str, checkpoint_every: int) -> EventLog:
    ticks = itertools.count(T0, 1000)
    ids = (f"00000000-0000-8000-8000-{i:04x}" for i in itertools.count())
    return EventLog(sink, run_id=run_id, producer_id="vectors", signer=SIGNER, checkpoint_every=checkpoint_every,
                    clock=lambda: next(ticks), id_prefixes=lambda: next(ids)[:24], codec=VECTOR_CODEC)


def stream(run_id="r1", steps=20, episodes=2, checkpoint_every=16) -> list[Record]:
    sink = MemorySink()
    log = deterministic_log(sink, run_id, checkpoint_every)
    synthetic_run(log, episodes=episodes, steps=steps, agents=2, seed=7)
    log.close()
    parts = {}
    recs = []
    for t, k, v in sink.sent:
        p = parts.setdefault(k, len(parts) % 3)
        recs.append(Record(t, p, 0, k, v, T0 // 1000))
    return corruptions.renumber(recs)


def hashing_vectors() -> dict:
    sink = MemorySink()
    log = deterministic_log(sink, "vec", checkpoint_every=4)
    for step in range(4):
        log.append("vec:actions", "joint.action", {
            "episode": 0, "step": step, "joint_vector": [float(step)],
            "actions": [{"agent_id": "agent_0", "discrete": step % 5, "continuous": [], "log_prob": -1.5,
                         "reward": 0.25 * step, "terminated": False, "truncated": step == 3}]})
    log.close()
    codec = default_codec()
    events, hashes = [], []
    for t, k, v in sink.sent:
        name, rec = codec.decode(v)
        if t == "marl.joint.action":
            hashes.append(v[-32:])
        events.append({"topic": t, "key": k, "schema": name, "value_hex": v.hex(), "fingerprint_hex": v[2:10].hex(),
                       "prev_event_hash": v[10:42].hex(), "event_hash": v[-32:].hex(), "seq": rec["seq"]})
    proof = inclusion_proof(hashes, 2)
    return {
        "description": "marlgrc hash-contract vectors; see docs/HASHING.md",
        "public_key_raw_hex": public_key_raw(SIGNER.public_key).hex(),
        "public_key_pem": public_key_pem(SIGNER.public_key).decode(),
        "events": events,
        "merkle": {"leaves": [leaf_hash(h).hex() for h in hashes], "root": merkle_root(hashes).hex()},
        "inclusion_proof": {"seq": 2, "leaf_index": 2, "tree_size": 4, "event_hash": hashes[2].hex(),
                            "path": [p.hex() for p in proof], "root": merkle_root(hashes).hex()},
    }


TAMPER = corruptions.standard_cases()


def main() -> None:
    VECTORS.mkdir(parents=True, exist_ok=True)
    (VECTORS / "hashing.json").write_text(json.dumps(hashing_vectors(), indent=2) + "\n")
    tamper = VECTORS / "tamper"
    shutil.rmtree(tamper, ignore_errors=True)
    clean = stream()
    pem = public_key_pem(SIGNER.public_key)
    write_bundle(tamper / "clean", clean, public_key_pem=pem, signer=SIGNER)
    (tamper / "clean" / "expected.json").write_text(json.dumps({"ok": True}) + "\n")
    for name, fn in TAMPER.items():
        records, kind, marker = fn(clean)
        write_bundle(tamper / name, records, public_key_pem=pem, signer=SIGNER)
        (tamper / name / "expected.json").write_text(json.dumps({
            "ok": False, "kind": kind.value, "topic": marker.topic, "chain_id": marker.key,
            "partition": marker.partition, "offset": marker.offset}, indent=2) + "\n")
    print(f"wrote {VECTORS / 'hashing.json'} and {len(TAMPER) + 1} bundles under {tamper}")


if __name__ == "__main__":
    main()
