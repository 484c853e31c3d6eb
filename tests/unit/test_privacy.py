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


@pytest.mark.parametrize("content", [b"zz" * 32, b"\xff\xfe not text", b"", b"ab" * 16])
def test_a_damaged_key_store_key_file_is_a_privacy_error(tmp_path, content):
    LocalKeyStore(tmp_path / "k.db").close()
    (tmp_path / "k.db.key").write_bytes(content)
    with pytest.raises(PrivacyError, match="is not 64 hex digits"):
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


def _steps(store, calls, crash_at=None):
    """An erasure's steps as the CLI orders them (ledger, shred, publish), each recording its call;
    ``crash_at`` names the step that dies after its effect and before its result is recorded."""
    from eventlog.privacy import shred_step

    def step(name, effect):
        def run(request, results):
            out = effect(request, results)
            calls.append(name)
            if name == crash_at:
                raise KeyboardInterrupt(f"crash in {name}")
            return out
        return name, run
    shred_name, shred = shred_step(store)
    return [step("ledger:sqlcipher", lambda r, res: {"ledger.rows": 3}),
            step(shred_name, shred),
            step("kafka.compliance_deletion", lambda r, res: {"event_hash": "ab" * 32, "seen": list(res)})]


def test_an_erasure_is_recorded_before_anything_is_deleted_and_refuses_missing_inputs(store):
    from eventlog.privacy import PrivacyError

    store.subject_key("user", "alice")
    for missing in ({"requester": ""}, {"legal_basis": " "}):
        args = {"requester": "dpo", "legal_basis": "GDPR 17", **missing}
        with pytest.raises(PrivacyError, match="nothing was changed"):
            store.open_erasure("req-1", "user", "alice", **args)
    assert store.erasure_request("req-1") is None and store.subject_key("user", "alice", create=False) is not None
    assert store.open_erasure("req-1", "user", "bob", requester="dpo", legal_basis="b") is None  # no key, no request


@pytest.mark.parametrize("crash_at", [None, "ledger:sqlcipher", "keystore.shred", "kafka.compliance_deletion"])
def test_an_interrupted_erasure_is_completed_by_a_rerun_of_its_request(store, crash_at):
    from eventlog.privacy import deletion_payload, run_erasure

    key = store.subject_key("user", "alice")
    request = store.open_erasure("req-7", "user", "alice", requester="dpo", legal_basis="GDPR 17(1)(b)")
    calls: list[str] = []
    order = ["ledger:sqlcipher", "keystore.shred", "kafka.compliance_deletion"]
    if crash_at is not None:
        with pytest.raises(KeyboardInterrupt):
            run_erasure(store, request, _steps(store, calls, crash_at))
        assert calls[-1] == crash_at
        # the re-run finds the request by its id, even when the key is gone already
        request = store.open_erasure("req-7", "user", "alice", requester="dpo", legal_basis="GDPR 17(1)(b)")
        # the shred is recorded with its effect, in one key store transaction; other steps are not
        recorded = order[:order.index(crash_at) + (crash_at == "keystore.shred")]
        assert request is not None and list(request.steps) == recorded
    done_before, results = run_erasure(store, request, _steps(store, calls))
    assert done_before == (recorded if crash_at else [])
    # every step ran once; one that crashed before its record ran again (steps are idempotent per request)
    assert calls == (order[:order.index(crash_at) + 1] + order[len(recorded):] if crash_at else order)
    assert list(results) == order and results["kafka.compliance_deletion"]["seen"] == order[:2]
    assert store.subject_key("user", "alice", create=False) is None and store.subjects() == 0
    payload = deletion_payload(request, results)
    assert payload["subject_ref"] == pseudonym(key, "user", "alice")
    assert {a["target"]: a["count"] for a in payload["actions"]} == {
        "ledger.rows": 3, "keystore.subject_keys": 1, "keystore.blind_index": 1}
    # a third run has nothing left to do
    request = store.open_erasure("req-7", "user", "alice", requester="dpo", legal_basis="GDPR 17(1)(b)")
    again: list[str] = []
    assert run_erasure(store, request, _steps(store, again))[0] == order and again == []


def test_a_request_id_cannot_be_reused_for_another_subject(store):
    store.subject_key("user", "alice")
    store.subject_key("user", "bob")
    store.open_erasure("req-9", "user", "alice", requester="dpo", legal_basis="b")
    with pytest.raises(PrivacyError, match="another subject"):
        store.open_erasure("req-9", "user", "bob", requester="dpo", legal_basis="b")
