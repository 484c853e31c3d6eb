"""The auditor's bundle: a folder holding events' exact bytes in an Avro Object Container File,
with where each was read from (topic, partition, offset), the checkpoints' public key and a manifest.

    events.avro     OCF of marlgrc.bundle.Entry, checkpoints first, then chain by chain in offset order
    public_key.pem  Ed25519 public key of the checkpoint signer (pin your own with --public-key)
    manifest.json   format, counts per topic, SHA-256 of events.avro
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterable, Iterator, Literal

import fastavro
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    """A bundle is missing a part, is damaged or does not match its manifest."""


class NotABundle(BundleError):
    """A folder that holds no bundle at all (no manifest.json)."""


MANIFEST_TAG = b"marlgrc.bundle.v1\n"


def manifest_message(manifest: dict) -> bytes:
    """What a manifest signature covers: the tag and the manifest's canonical JSON without the signature."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return MANIFEST_TAG + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def write_bundle(out_dir: Path, records: Iterable[Record], *, public_key_pem: bytes | None,
                 meta: dict | None = None, signer=None) -> dict:
    """Write ``records`` (any order; checkpoints are put first) and return the manifest. With a
    ``signer`` (eventlog.checkpoint.Signer) the manifest, which holds the SHA-256 of events.avro and
    the count per topic, is signed: then even dropping the newest checkpoint, which no chain can
    reveal, is caught."""
    out = Path(out_dir)
    recs = list(records)  # read everything first: a source that fails leaves no folder behind
    out.mkdir(parents=True, exist_ok=True)
    # checkpoints first, then one chain after another, each in offset order: a verifier reads the
    # signed statements before the events and hashes each chain in one pass
    recs.sort(key=lambda r: (r.topic != "marl.audit.checkpoints", r.topic, r.key, r.partition, r.offset))
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
    if signer is not None:
        manifest["signer_key_id"] = signer.key_id.hex()
        manifest["signature"] = signer.sign_bytes(manifest_message(manifest)).hex()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class Manifest(BaseModel):
    """What ``manifest.json`` must hold (docs/HASHING.md §6); other keys (run_id, source, prefix, ...)
    are kept as they are, and all of them are covered by the signature."""

    model_config = ConfigDict(extra="allow")

    format: Literal["marlgrc-bundle/1"]
    created_at: str
    events: int = Field(ge=0)
    topics: dict[str, int]
    events_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    signer_key_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")


def read_manifest(bundle_dir: Path) -> dict:
    """The bundle's manifest, checked against ``Manifest``; a BundleError says what is wrong with it."""
    path = Path(bundle_dir) / "manifest.json"
    if not path.exists():
        raise NotABundle(f"{bundle_dir} is not a marlgrc bundle: no manifest.json (create one with `marlgrc export`)")
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        raise BundleError(f"cannot read {path} ({exc.strerror or exc}); ask for a fresh export") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not JSON ({exc}); ask for a fresh export") from None
    except RecursionError:
        raise BundleError(f"{path} is not a bundle manifest: its JSON nests deeper than any manifest does; "
                          f"ask for a fresh export") from None
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors())
        raise BundleError(f"{path} is not a valid bundle manifest ({problems}); ask for a fresh export") from None
    return manifest


def bundle_entries(bundle_dir: Path) -> Iterator[dict]:
    """Every entry of the bundle as fastavro reads it (a dict of ``marlgrc.bundle.Entry``), in stored
    order. The manifest's digest is NOT trusted for integrity (the verifier checks the events
    themselves); it only catches a damaged copy early."""
    path = Path(bundle_dir) / "events.avro"
    if not path.exists():
        raise BundleError(f"{bundle_dir}: events.avro is missing; the bundle is incomplete, export it again")
    with path.open("rb") as fh:
        try:
            reader = fastavro.reader(fh)
            if _fields(reader.writer_schema) != _ENTRY_FIELDS:
                raise BundleError(f"{path} holds records of another schema than {FORMAT}'s marlgrc.bundle.Entry "
                                  f"(topic, partition, offset, timestamp, key, value); ask for a fresh export")
            yield from reader
        except BundleError:
            raise
        except Exception as exc:  # noqa: BLE001 - fastavro raises assorted errors (schema, codec, EOF) on a damaged file
            raise BundleError(f"{path} is damaged and cannot be read as an Avro container "
                              f"({type(exc).__name__}: {str(exc)[:200]}); ask for a fresh export") from None


def _fields(schema) -> list[tuple[str, object]] | None:
    """A record schema's (field name, type) pairs, in order; None for anything else."""
    if not isinstance(schema, dict) or schema.get("type") != "record" or not isinstance(schema.get("fields"), list):
        return None
    return [(f.get("name"), f.get("type")) if isinstance(f, dict) else (None, None) for f in schema["fields"]]


_ENTRY_FIELDS = _fields(ENTRY_SCHEMA)


def entry_record(e: dict) -> Record:
    return Record(e["topic"], e["partition"], e["offset"], e["key"], e["value"], e["timestamp"])


def read_bundle(bundle_dir: Path) -> Iterator[Record]:
    """Every entry of the bundle as a Record, in stored order (see ``bundle_entries``)."""
    return map(entry_record, bundle_entries(bundle_dir))


def check_manifest(bundle_dir: Path, public_key, *, pinned: bool = False) -> tuple[list[str], list[str]]:
    """(failures, notes) about the bundle as a whole. Failures: events.avro differs from the
    manifest's digest; the manifest's signature does not verify with ``public_key``; and, with a
    ``pinned`` key (one the auditor obtained out of band, not the bundle's own copy), a manifest
    that is not signed or is signed by another key. Without a pinned key a missing signature is a
    note: the bundle's completeness (e.g. its newest checkpoint) cannot be checked."""
    from cryptography.exceptions import InvalidSignature

    from .checkpoint import key_id

    manifest = read_manifest(bundle_dir)
    failures, notes = [], []
    events = Path(bundle_dir) / "events.avro"
    try:
        digest = hashlib.sha256(events.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: events.avro is missing; the bundle is incomplete, export it again") from None
    except OSError as exc:
        raise BundleError(f"cannot read {events} ({exc.strerror or exc}); ask for a fresh export") from None
    if digest != manifest.get("events_sha256"):
        failures.append("events.avro does not match the SHA-256 in manifest.json: the file was changed after export")
    if "signature" not in manifest:
        (failures if pinned else notes).append(
            "manifest.json is not signed: the bundle's completeness (e.g. its newest checkpoint) cannot be checked")
    elif public_key is not None:
        if manifest.get("signer_key_id") != key_id(public_key).hex():
            failures.append(f"manifest.json is signed by key {str(manifest.get('signer_key_id'))[:16]}…, not the "
                            f"trusted key {key_id(public_key).hex()[:16]}…")
        else:
            try:
                public_key.verify(bytes.fromhex(manifest["signature"]), manifest_message(manifest))
            except (InvalidSignature, ValueError, TypeError):
                failures.append("manifest.json's signature does not verify with the trusted public key: the "
                                "manifest (counts, digest of events.avro) was changed after export")
    return failures, notes


def bundle_public_key(bundle_dir: Path) -> bytes | None:
    path = Path(bundle_dir) / "public_key.pem"
    return path.read_bytes() if path.exists() else None
