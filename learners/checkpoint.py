"""Signed learner checkpoints: ``NAME.pt`` (torch state), ``NAME.json`` (seed 002's metadata) and
``NAME.sig.json`` (SHA-256 of both files and an Ed25519 signature over them).

The signing key is the project's Ed25519 key file (``eventlog.checkpoint.Signer``'s PEM, mode 0600),
so an auditor checks checkpoints and event-log checkpoints with the same public key. Loading
recomputes both digests, compares them with the signed ones and checks the signature before
``torch.load`` ever sees the file.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from eventlog.checkpoint import Signer, key_id

TAG = b"marlgrc.learner-checkpoint.v1\n"


class CheckpointError(RuntimeError):
    """A learner checkpoint is missing a part, was modified, or is signed by another key."""


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The private key of the project's key file (mode 0600 is enforced by Signer.load)."""
    Signer.load(path)
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def _paths(base: Path) -> tuple[Path, Path, Path]:
    base = Path(base)
    stem = base.with_suffix("") if base.suffix in (".pt", ".json") else base
    return stem.with_suffix(".pt"), stem.with_suffix(".json"), Path(str(stem) + ".sig.json")


def _signed_bytes(pt_sha: str, meta_sha: str) -> bytes:
    return TAG + pt_sha.encode() + b"\n" + meta_sha.encode() + b"\n"


def metadata_for(learner) -> dict:
    """Seed 002's fields (version, date, episodes, reward, loss, hyperparameters, dimensions) and ours."""
    c = learner.config
    spec = learner.spec
    losses = learner.last_losses or {}
    hidden = list(getattr(c, "hidden_layers", ())) or [getattr(c, "hidden", 0)] * 2
    return {
        "model_version": learner.version,
        "training_date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "training_episodes": learner.episodes,
        "final_average_reward": learner.last_return,
        "final_loss": float(next(iter(losses.values()), float("nan"))),
        "losses": losses,
        "learning_rate": c.learning_rate,
        "gamma": c.gamma,
        "input_dim": spec.obs_dim + len(spec.agents),
        "output_dim": spec.n_actions or spec.action_dim,
        "hidden_layers": hidden,
        "algorithm": learner.algorithm,
        "hyperparameters": learner.state_dict()["config"],
        "config_hash": learner.config_hash,
        "seed": c.seed,
        "optimizer_steps": learner.optimizer_steps,
        "env_steps": learner.env_steps,
        "weights_sha256": learner.weights_sha256().hex(),
        "run": spec.to_dict(),
    }


def save_checkpoint(base: Path, learner, key: Ed25519PrivateKey) -> dict:
    """Write the three files next to ``base`` (``run/ckpt`` -> ``run/ckpt.pt`` ...); returns the metadata."""
    pt, meta_path, sig = _paths(base)
    pt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(learner.state_dict(), pt)
    meta = metadata_for(learner)
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    pt_sha = hashlib.sha256(pt.read_bytes()).hexdigest()
    meta_sha = hashlib.sha256(meta_path.read_bytes()).hexdigest()
    sig.write_text(json.dumps({
        "format": "marlgrc-learner-checkpoint/1", "pt_sha256": pt_sha, "metadata_sha256": meta_sha,
        "key_id": key_id(key.public_key()).hex(),
        "signature": key.sign(_signed_bytes(pt_sha, meta_sha)).hex()}, indent=2) + "\n")
    return meta


def _read_json(path: Path, base: Path, what: str) -> dict:
    """A JSON object from ``path``; a CheckpointError naming the file otherwise."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"checkpoint {base}: cannot read {path.name} ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested past the reader's limit
        raise CheckpointError(f"checkpoint {base}: {path.name} is not JSON ({type(exc).__name__}); {what}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {base}: {path.name} holds a JSON {type(data).__name__}, not an object; {what}")
    return data


_DAMAGED_SIG = ("the signature file was damaged or replaced; restore the checkpoint from a trusted copy or retrain "
                "from the run's topics")


def _safe_globals() -> list:
    """What a learner's state needs beyond tensors and plain containers: numpy arrays (the RNG states of
    numpy bit generators) and bytes. Nothing that runs code: ``torch.load(weights_only=True)``."""
    import numpy as np

    reconstruct = np.zeros(0).__reduce__()[0]
    dtypes = {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGSUV"}
    return [reconstruct, np.ndarray, np.dtype, bytes, *dtypes]


def load_torch_state(data: bytes, where: str) -> dict:
    """A learner's torch state from the bytes of its ``.pt`` file, unpickled with
    ``weights_only=True`` (tensors, containers, numbers, strings, numpy arrays only: a file that
    asks for anything else is refused, never run). Raises CheckpointError naming ``where``."""
    import io

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises assorted errors on damaged bytes (UnpicklingError,
        # RuntimeError, struct.error, zipfile.BadZipFile, EOFError, ...); the restricted unpickler ran no code
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{where} is not a learner state torch can load safely ({type(exc).__name__}: "
                              f"{first}); restore it from a trusted copy or retrain from the run's topics") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} holds a {type(state).__name__}, not a learner state (a dict); restore it "
                              f"from a trusted copy or retrain from the run's topics")
    return state


def load_checkpoint(base: Path, public_key: Ed25519PublicKey) -> tuple[dict, dict]:
    """Verify, then load: (torch state, metadata). Raises CheckpointError naming what does not match.
    The bytes that were hashed are the ones loaded (read once), with ``weights_only=True``."""
    pt, meta_path, sig = _paths(base)
    for p in (pt, meta_path, sig):
        if not p.exists():
            raise CheckpointError(f"checkpoint {base}: {p.name} is missing; a checkpoint is the three files "
                                  f"{pt.name}, {meta_path.name}, {sig.name} written together by `marlgrc train`")
    signed = _read_json(sig, base, _DAMAGED_SIG)
    fields = ("key_id", "pt_sha256", "metadata_sha256", "signature")
    bad = [f for f in fields if not isinstance(signed.get(f), str)]
    if bad:
        raise CheckpointError(f"checkpoint {base}: {sig.name} lacks {', '.join(bad)} (strings); {_DAMAGED_SIG}")
    if signed["key_id"] != key_id(public_key).hex():
        raise CheckpointError(f"checkpoint {base}: signed by key {signed['key_id'][:16]}…, not the trusted "
                              f"key {key_id(public_key).hex()[:16]}…; load it with the signer's public key")
    contents = {}
    for p, field in ((pt, "pt_sha256"), (meta_path, "metadata_sha256")):
        try:
            contents[p] = p.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"checkpoint {base}: cannot read {p.name} ({exc.strerror or exc})") from None
        actual = hashlib.sha256(contents[p]).hexdigest()
        if actual != signed[field]:
            raise CheckpointError(f"checkpoint {base}: {p.name} has SHA-256 {actual[:16]}…, the signed record says "
                                  f"{signed[field][:16]}…: the file was modified after it was signed. Do not use it; "
                                  f"restore it from a trusted copy or retrain from the run's topics")
    try:
        public_key.verify(bytes.fromhex(signed["signature"]), _signed_bytes(signed["pt_sha256"], signed["metadata_sha256"]))
    except (InvalidSignature, ValueError):
        raise CheckpointError(f"checkpoint {base}: the Ed25519 signature in {sig.name} does not verify; the "
                              f"signature file was altered or made with another key") from None
    # only after the digest and signature checks above, and even then nothing that runs code
    state = load_torch_state(contents[pt], f"checkpoint {base}: {pt.name}")
    try:
        meta = json.loads(contents[meta_path])
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint {base}: {meta_path.name} is signed but is not JSON "
                              f"({type(exc).__name__}); restore it from a trusted copy") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {base}: {meta_path.name} is signed but holds a JSON {type(meta).__name__}, "
                              f"not the metadata object; restore it from a trusted copy")
    return state, meta


def learner_from_checkpoint(base: Path, public_key: Ed25519PublicKey):
    """Rebuild the learner (its algorithm, config and run spec) and restore its full training state."""
    from . import algorithm
    from .replay import RunSpec

    state, meta = load_checkpoint(base, public_key)
    try:
        algo = algorithm(state["algorithm"])
        cfg = dict(state["config"])
        if "hidden_layers" in cfg:
            cfg["hidden_layers"] = tuple(cfg["hidden_layers"])
        learner = algo.learner_cls(RunSpec.from_dict(state["spec"]), algo.config_cls(**cfg))
        learner.load_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {base}: its signature checks out, but its state does not rebuild a "
                              f"learner ({type(exc).__name__}: {str(exc)[:200]}); it was written by another version "
                              f"of marlgrc or is damaged: retrain from the run's topics") from None
    if learner.weights_sha256().hex() != meta.get("weights_sha256"):
        raise CheckpointError(f"checkpoint {base}: restored weights hash to {learner.weights_sha256().hex()[:16]}…, "
                              f"the metadata says {str(meta.get('weights_sha256'))[:16]}…")
    return learner
