"""A2A shapes, answer classification and slot arithmetic: no sockets."""

from __future__ import annotations

import base64

import pytest

from a2ad import a2a, results
from a2ad.clock import ManualClock
from a2ad.errors import InvalidParams, InvalidRequest, ParseError, VersionNotSupported
from a2ad.settings import LivenessSettings, WorkspaceSettings
from a2ad.upstream import parse_retry_after
from a2ad.workspaces import State, Workspace


def test_task_shapes_per_protocol() -> None:
    v1 = a2a.task("q-1", "c-1", "submitted", "1.0", at=0, metadata={"a2ad": {"queued": True}})
    assert v1 == {
        "id": "q-1",
        "contextId": "c-1",
        "status": {"state": "TASK_STATE_SUBMITTED", "timestamp": "1970-01-01T00:00:00.000Z"},
        "metadata": {"a2ad": {"queued": True}},
    }
    assert a2a.send_result(v1, "1.0") == {"task": v1}
    v03 = a2a.task("q-1", "c-1", "canceled", "0.3", at=0)
    assert v03["kind"] == "task" and v03["status"]["state"] == "canceled"
    assert a2a.send_result(v03, "0.3") is v03


@pytest.mark.parametrize(
    ("header", "protocol"), [("1.0", "1.0"), ("1.1", "1.0"), ("0.3", "0.3"), ("", "0.3")]
)
def test_protocol_from_header(header: str, protocol: str) -> None:
    headers = {"A2A-Version": header} if header else {}
    assert a2a.protocol_of(headers) == protocol


def test_parse_request() -> None:
    body = a2a.parse_json(
        b'{"jsonrpc": "2.0", "id": 1, "method": "SendMessage",'
        b' "params": {"message": {"messageId": "m", "contextId": "c"}}}'
    )
    rpc = a2a.parse_request(body, "1.0")
    assert rpc.is_message and not rpc.is_stream
    assert (rpc.message_id, rpc.context_id) == ("m", "c")
    with pytest.raises(ParseError):
        a2a.parse_json(b"[" * 100_000)
    with pytest.raises(InvalidRequest):
        a2a.parse_request({"jsonrpc": "2.0", "id": True, "method": "x"}, "1.0")


@pytest.mark.parametrize(
    ("method", "protocol"), [("SendMessage", "0.3"), ("GetTask", "0.3"), ("message/send", "1.0")]
)
def test_a_method_of_the_other_version_is_refused_before_its_params(
    method: str, protocol: a2a.Protocol
) -> None:
    # Params that are wrong too: the version is what the agent refuses first.
    with pytest.raises(VersionNotSupported) as refused:
        a2a.parse_request({"jsonrpc": "2.0", "id": 1, "method": method, "params": []}, protocol)
    assert refused.value.rpc_code == -32009
    assert a2a.parse_request({"jsonrpc": "2.0", "id": 1, "method": "x"}, protocol).method == "x"


def test_read_answer_both_protocols() -> None:
    assert a2a.read_answer({"result": {"task": {"id": "t"}}}).kind == "task"
    assert a2a.read_answer({"result": {"message": {"parts": []}}}).kind == "message"
    assert a2a.read_answer({"result": {"kind": "task", "id": "t"}}).kind == "task"
    assert a2a.read_answer({"result": {"kind": "message"}}).kind == "message"
    assert a2a.read_answer({"error": {"code": 1}}).kind == "error"
    assert a2a.read_answer({"result": 3}).kind == "other"
    assert a2a.read_answer("nope").kind == "other"


def test_convert_task_between_versions() -> None:
    v03 = {
        "kind": "task",
        "id": "t",
        "contextId": "c",
        "status": {
            "state": "completed",
            "message": {
                "kind": "message",
                "role": "agent",
                "parts": [{"kind": "text", "text": "hi"}],
            },
        },
        "artifacts": [{"artifactId": "a", "parts": [{"kind": "data", "data": {"x": 1}}]}],
    }
    v1 = a2a.convert_task(v03, "1.0")
    assert "kind" not in v1 and v1["status"]["state"] == "TASK_STATE_COMPLETED"
    assert v1["status"]["message"] == {"role": "ROLE_AGENT", "parts": [{"text": "hi"}]}
    assert v1["artifacts"][0]["parts"] == [{"data": {"x": 1}}]
    back = a2a.convert_task(v1, "0.3")
    assert back["status"]["state"] == "completed"
    assert back["status"]["message"]["parts"] == [{"kind": "text", "text": "hi"}]
    assert back["artifacts"][0]["parts"] == [{"kind": "data", "data": {"x": 1}}]


def test_retry_after() -> None:
    assert parse_retry_after("7", 0) == 7
    assert parse_retry_after("-3", 0) == 0
    assert parse_retry_after("soon", 0) is None
    assert parse_retry_after(None, 0) is None
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:30 GMT", 10) == 20
    assert parse_retry_after("99999999", 0) == 3600
    # Floats Python parses but HTTP does not mean: ignored, not an hour's pause.
    for nonsense in ("inf", "-inf", "nan", "1e999"):
        assert parse_retry_after(nonsense, 0) is None, nonsense


def make_workspace(**config: object) -> Workspace:
    settings = WorkspaceSettings(
        id="w", url="http://127.0.0.1:1/", heartbeat=True, token="t", **config
    )  # type: ignore[arg-type]
    return Workspace(settings, LivenessSettings(heartbeat_timeout_seconds=90), ManualClock())


def test_slot_formula_keeps_only_external_load() -> None:
    ws = make_workspace(max_concurrent=2)
    assert ws.free_slots(0) == 2
    slot = ws.admission.try_direct(0)
    assert slot is not None
    # The agent reports 2 active: one is a2ad's own, one is someone else's.
    ws.record_heartbeat(2, 3, now=0)
    assert ws.capacity(0) == 3 and ws.external_load(0) == 1 and ws.free_slots(0) == 1
    slot.release()  # a2ad's request ended: its slot is free at once
    assert ws.free_slots(0) == 2
    slot.release()  # returned once, however often it is released
    assert ws.in_flight == 0
    # A stale heartbeat no longer counts.
    assert ws.capacity(91) == 2 and ws.external_load(91) == 0


def test_busy_pause_doubles_and_resets() -> None:
    ws = make_workspace()
    assert [ws.note_busy(None, 0, answered=True) for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    ws.note_answer(0)
    assert ws.note_busy(None, 100, answered=True) == 0.5
    assert ws.note_busy(5, 100, answered=True) == 5
    assert ws.paused(104) and not ws.paused(105)


def test_heartbeat_timeout_and_recovery() -> None:
    ws = make_workspace()
    assert ws.state is State.UNKNOWN
    ws.record_heartbeat(0, None, now=0)
    assert ws.state is State.ONLINE
    assert not ws.check_heartbeat_timeout(90)
    assert ws.check_heartbeat_timeout(91) and ws.state is State.OFFLINE
    assert ws.admission.try_direct(91) is None
    ws.record_heartbeat(0, None, now=92)
    assert ws.state is State.ONLINE and ws.wakeup.is_set()


def test_slots_reserved_for_a_claim_are_not_taken_for_the_agents_own_load() -> None:
    ws = make_workspace(max_concurrent=4)
    ws.depth.queued[50] = ws.depth.queued_total = 2  # as a commit would set them
    assert ws.admission.reserve(0) == 2  # as many as are due, within the free slots
    # A heartbeat while the claim runs: the agent has 1 task of its own.
    ws.record_heartbeat(1, None, now=0)
    assert ws.external_load(0) == 1  # not 0: the reservations are not at the agent
    assert ws.free_slots(0) == 1
    (slot,) = ws.admission.claimed(2, 1)  # the claim found one item
    assert ws.in_flight == 1 and ws.free_slots(0) == 2
    slot.release()


def test_a_direct_send_never_takes_a_slot_that_is_not_free() -> None:
    ws = make_workspace(max_concurrent=1)
    first = ws.admission.try_direct(0)
    assert first is not None
    assert all(ws.admission.try_direct(0) is None for _ in range(10))
    # A heartbeat that lowers the capacity leaves the running request; adds none.
    ws.record_heartbeat(1, 1, now=0)
    assert ws.admission.free_slots(0) == 0 and ws.admission.try_direct(0) is None
    first.release()
    assert ws.admission.try_direct(0) is not None


@pytest.mark.parametrize(
    "decoded", ["1.0 99999999999999999999", "1.0 -99999999999999999999", "nan 1", "1e999 1", "x 1"]
)
def test_a_tampered_page_token_is_invalid_params(decoded: str) -> None:
    """Never a database error (an integer past 64 bits) or an empty page."""
    token = base64.urlsafe_b64encode(decoded.encode()).decode()
    with pytest.raises(InvalidParams):
        results.read_page_token(token)
    good = base64.urlsafe_b64encode(b"1800000000.5 42").decode()
    assert results.read_page_token(good) == (1800000000.5, 42)
