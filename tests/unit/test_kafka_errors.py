"""What the Kafka adapter says when the broker is not there: errors that name what failed and what
to do (a closed local port stands for the missing broker; no service is mocked)."""
import socket

import pytest

from eventlog.kafka import DeliveryError, EventProducer
from eventlog.log import EventLog


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once it is closed


def test_a_delivery_error_names_every_chain_that_now_has_a_gap():
    boot = closed_port()
    producer = EventProducer(boot, prefix="t.", client_id="test-delivery")
    log = EventLog(producer, run_id="r7", producer_id="p")
    for step in range(3):
        log.append("r7:actions", "joint.action", {"episode": 0, "step": step, "actions": [], "joint_vector": []})
        log.append("r7:env", "env.state", {"episode": 0, "step": step, "state": [], "collapsed_state": []})
    with pytest.raises(DeliveryError) as info:
        producer.flush(timeout=1.0)
    text = str(info.value)
    assert "6 events not acknowledged by Kafka at " + boot in text
    assert "marl.joint.action r7:actions (3)" in text and "marl.env.state r7:env (3)" in text
    assert "marlgrc verify" in text and "marlgrc status" in text
