"""Privacy primitives: pseudonyms, blind index, AES-GCM fields, the SQLCipher key store, erasure."""
import os
import stat

import pytest

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import Record
from eventlog.log import EventLog, MemorySink
from eventlog.privacy import (FieldProtector, KeyShredded, LocalKeyStore, PrivacyError, ProtectedValue,
                              decrypt_field, encrypt_field, pseudonym)
from eventlog.verify import verify_records
from producers.envs import mailbox_v0
from producers.harness import HarnessError, run_episodes
from producers.policies import HeuristicPolicy


@pytest.fixture
def store(tmp_path):
    with LocalKeyStore(tmp_path / "keys.db") as s:
        yield s


def test_key_store_files_are_0600_and_encrypted(tmp_path, store):
    store.subject_key("user", "alice@example.org")
    for p in (tmp_path / "keys.db", tmp_path / "keys.db.key"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    data = (tmp_path / "keys.db").read_bytes()
    assert not data.startswith(b"SQLite format 3") and b"blind_index" not in data


def test_wrong_key_fails_loudly(tmp_path):
    LocalKeyStore(tmp_path / "k.db", key=b"\x01" * 32).close()
    with pytest.raises(PrivacyError, match="does not open with the given key"):
        LocalKeyStore(tmp_path / "k.db", key=b"\x02" * 32)


def test_open_permissions_refused(tmp_path):
    LocalKeyStore(tmp_path / "k.db").close()
    os.chmod(tmp_path / "k.db", 0o644)
    with pytest.raises(PrivacyError, match="chmod 600"):
        LocalKeyStore(tmp_path / "k.db")


def test_pseudonym_is_keyed_per_subject(store):
    k1 = store.subject_key("user", "u1")
    assert store.subject_key("user", "u1") == k1          # found again through the blind index
    assert store.subject_key("user", "u2") != k1
    assert store.subject_key("sender", "u1") != k1        # namespaces are separate subjects
    import hashlib
    assert pseudonym(k1, "user", "u1") != hashlib.sha256(b"u1").digest()
    assert store.key_for_ref("user", pseudonym(k1, "user", "u1")) == k1
    assert store.key_for_ref("sender", pseudonym(k1, "user", "u1")) is None


def test_field_bound_to_event_and_field():
    key = os.urandom(32)
    blob = encrypt_field(key, "r:env", 3, "item_id", b"msg-1")
    assert decrypt_field(key, "r:env", 3, "item_id", blob) == b"msg-1"
    for chain, seq, field in (("r:env", 4, "item_id"), ("r:obs:get", 3, "item_id"), ("r:env", 3, "user_id")):
        with pytest.raises(PrivacyError, match="does not decrypt"):
            decrypt_field(key, chain, seq, field, blob)
    with pytest.raises(PrivacyError):
        decrypt_field(os.urandom(32), "r:env", 3, "item_id", blob)


def test_forget_shreds_key_and_index(store):
    prot = FieldProtector(store)
    rec = prot.protect("r:env", 0, [ProtectedValue("user", "user_id", "usr-1", b"usr-1")])[0]
    ref = rec["subject_ref"]
    assert prot.reveal("r:env", 0, rec) == b"usr-1"
    shredded = prot.forget("user", "usr-1")
    assert shredded.subject_ref == ref and shredded.keys_deleted == 1 and shredded.index_rows_deleted == 1
    with pytest.raises(KeyShredded) as err:
        prot.reveal("r:env", 0, rec)
    assert "usr-1" not in str(err.value)
    assert store.subject_key("user", "usr-1", create=False) is None
    # a new key for the same raw id gives a different pseudonym: the old one cannot be recomputed
    assert pseudonym(store.subject_key("user", "usr-1"), "user", "usr-1") != ref
    assert prot.forget("user", "nobody") is None


def test_shredded_key_not_left_on_disk(tmp_path):
    store = LocalKeyStore(tmp_path / "k.db", key=b"\x07" * 32)
    key = store.subject_key("user", "u9")
    store.shred("user", "u9")
    store.close()
    # the file is encrypted anyway; also decrypt-free check that no plaintext key bytes remain anywhere
    for p in tmp_path.iterdir():
        assert key not in p.read_bytes()


def test_mailbox_run_carries_no_raw_identifier(store):
    env = mailbox_v0.parallel_env(inbox_size=8)
    sink = MemorySink()
    signer = Signer.from_seed(b"privacy")
    log = EventLog(sink, run_id="m1", producer_id="p", signer=signer)
    prot = FieldProtector(store)
    with pytest.raises(HarnessError, match="needs a FieldProtector"):
        run_episodes(env, HeuristicPolicy(env), log, episodes=1, seed=1, env_id="mailbox_v0", env_version="0",
                     config={})
    sink.sent.clear()
    log = EventLog(sink, run_id="m1", producer_id="p", signer=signer)
    raw = set()
    run_episodes(env, HeuristicPolicy(env), log, episodes=1, seed=1, env_id="mailbox_v0", env_version="0",
                 config={}, protector=prot)
    raw |= env.raw_identifiers()
    log.close()
    blob = b"".join(k.encode() + v for _, k, v in sink.sent)
    assert raw and not [r for r in raw if r.encode() in blob]
    codec = default_codec()
    states = [(k, codec.decode(v)[1]) for t, k, v in sink.sent if t == "marl.env.state"]
    assert len(states) == 8
    k, first = states[0]
    fields = {f["field"]: f for f in first["protected_fields"]}
    assert set(fields) == {"user_id", "item_id", "sender_address"}
    user = prot.reveal(k, first["seq"], fields["user_id"]).decode()
    assert user in raw and user.startswith("usr-")
    obs = [codec.decode(v)[1] for t, k, v in sink.sent if t == "marl.agent.observation"]
    assert {f["field"] for o in obs if o["agent_id"] == "open" for f in o["protected_fields"]} == {"item_id"}
    # erase the user: its fields no longer decrypt, every chain still verifies
    prot.forget("user", user)
    with pytest.raises(KeyShredded):
        prot.reveal(k, first["seq"], fields["user_id"])
    assert prot.reveal(k, first["seq"], fields["sender_address"]).decode() in raw
    records = [Record(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(sink.sent)]
    assert verify_records(records, signer.public_key).ok
