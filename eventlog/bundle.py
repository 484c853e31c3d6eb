"""The auditor's bundle: a folder holding events' exact bytes in an Avro Object Container File,
with where each was read from (topic, partition, offset), the checkpoints' public key and a manifest.

    events.avro     OCF of marlgrc.bundle.Entry, checkpoints first, then data in offset order
    public_key.pem  Ed25519 public key of the checkpoint signer (pin your own with --public-key)
    manifest.json   format, counts per topic, SHA-256 of events.avro
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterable, Iterator

import fastavro

from .kafka import Record

FORMAT = "marlgrc-bundle/1"
ENTRY_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "Entry", "namespace": "marlgrc.bundle",
    "doc": "One Kafka message as read: the event's exact bytes and where they were",
    "fields": [
        {"name": "topic", "type": "string", "doc": "logical topic (no deployment prefix)"},
        {"name": "partition", "type": "int"},
        {"name": "offset", "type": "long"},
        {"name": "timestamp", "type": "long", "doc": "Kafka timestamp, ms"},
        {"name": "key", "type": "string", "doc": "chain id"},
        {"name": "value", "type": "bytes", "doc": "the event, byte for byte"},
    ],
})


class BundleError(RuntimeError):
    """A bundle is missing a part or does not match its manifest."""


def write_bundle(out_dir: Path, records: Iterable[Record], *, public_key_pem: bytes | None,
                 meta: dict | None = None) -> dict:
    """Write ``records`` (any order; checkpoints are put first) and return the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = list(records)
    recs.sort(key=lambda r: (r.topic != "marl.audit.checkpoints", r.topic, r.partition, r.offset))
    counts: dict[str, int] = {}
    for r in recs:
        counts[r.topic] = counts.get(r.topic, 0) + 1
    events = out / "events.avro"
    with events.open("wb") as fh:
        fastavro.writer(fh, ENTRY_SCHEMA, ({"topic": r.topic, "partition": r.partition, "offset": r.offset,
                                            "timestamp": r.timestamp, "key": r.key, "value": r.value}
                                           for r in recs), codec="null", sync_interval=1 << 20)
    if public_key_pem is not None:
        (out / "public_key.pem").write_bytes(public_key_pem)
    manifest = {
        "format": FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "events": len(recs),
        "topics": counts,
        "events_sha256": hashlib.sha256(events.read_bytes()).hexdigest(),
        **(meta or {}),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(bundle_dir: Path) -> dict:
    path = Path(bundle_dir) / "manifest.json"
    if not path.exists():
        raise BundleError(f"{bundle_dir} is not a marlgrc bundle: no manifest.json (create one with `marlgrc export`)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_bundle(bundle_dir: Path) -> Iterator[Record]:
    """Every entry of the bundle, in stored order. The manifest's digest is NOT trusted for integrity
    (the verifier checks the events themselves); it only catches a damaged copy early."""
    path = Path(bundle_dir) / "events.avro"
    if not path.exists():
        raise BundleError(f"{bundle_dir}: events.avro is missing; the bundle is incomplete, export it again")
    with path.open("rb") as fh:
        for e in fastavro.reader(fh):
            yield Record(e["topic"], e["partition"], e["offset"], e["key"], e["value"], e["timestamp"])


def bundle_public_key(bundle_dir: Path) -> bytes | None:
    path = Path(bundle_dir) / "public_key.pem"
    return path.read_bytes() if path.exists() else None
