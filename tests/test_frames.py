"""Frame-level behaviour of a device connection (RFC 6455 and DESIGN 3).

A raw socket (see ``wsraw``) sends frames no library would: invalid UTF-8,
oversize or fragmented control frames, bad close codes, unmasked frames,
messages at and over the size limit. Each test checks the node's answer:
the close code it fails the connection with, or the reply that shows the
connection is still fine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pushy import Node
from pushy.testing import scaled, wait_until
from wsraw import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWebSocket,
    encode_frame,
    parse_close,
)

#: The message size limit of the node under test.
MAX_MESSAGE = 1024

PING = b'{"t":"ping"}'

RawDevice = Callable[..., tuple[RawWebSocket, Any]]


@pytest.fixture
def node(pushy_node_factory: Callable[..., Node]) -> Node:
    """A node that accepts messages of up to MAX_MESSAGE bytes."""
    return pushy_node_factory(max_message_bytes=MAX_MESSAGE)


@pytest.fixture
def ws(node: Node, raw_device: RawDevice) -> RawWebSocket:
    """Device ``d1`` connected to ``node``, its hello already read."""
    sock, hello = raw_device(node, "d1")
    assert hello["t"] == "hello"
    return sock


def device_connected(node: Node, device: str) -> bool:
    response = httpx.get(
        f"{node.push_url}/v1/devices/{device}", timeout=scaled(5), trust_env=False
    )
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


def assert_failed_with(ws: RawWebSocket, node: Node, code: int) -> None:
    """The node's next frame is a close with ``code``; nothing follows it.

    Then the node ends TCP and unregisters d1.
    """
    frame = ws.recv_frame()
    assert frame.opcode == OP_CLOSE, f"expected close {code}, got {frame}"
    received, reason = parse_close(frame.payload)
    assert received == code, f"expected close {code}, got {received} {reason!r}"
    assert ws.wait_server_closed() in ("eof", "reset")
    assert ws.trailing == b"", f"data after the close frame: {ws.trailing!r}"
    wait_until(
        lambda: not device_connected(node, "d1"),
        message="the device to be unregistered",
    )


def assert_usable(ws: RawWebSocket) -> None:
    """A JSON ping on the connection still gets its JSON pong."""
    ws.send_text(PING)
    assert ws.recv_message() == {"t": "pong"}


# UTF-8 (RFC 6455 section 8.1: invalid text fails the connection with 1007).


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc0",
        b"\xe2\x82",
        b"\xc0\xaf",
        b"\xe0\x80\xaf",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xff",
        b'{"t":"ping","x":"\xc0\xaf"}',
    ],
    ids=[
        "lone-c0",
        "truncated-3-byte",
        "overlong-2-byte",
        "overlong-3-byte",
        "surrogate",
        "above-u10ffff",
        "byte-ff",
        "overlong-inside-json",
    ],
)
def test_text_frame_with_invalid_utf8_is_closed_1007(
    ws: RawWebSocket, node: Node, payload: bytes
) -> None:
    ws.send_text(payload)

    assert_failed_with(ws, node, 1007)


def test_message_after_an_invalid_one_is_not_answered(
    ws: RawWebSocket, node: Node
) -> None:
    ws.send_raw(encode_frame(OP_TEXT, b"\xc0") + encode_frame(OP_TEXT, PING))

    assert_failed_with(ws, node, 1007)


def test_fragmented_text_ending_mid_character_is_closed_1007(
    ws: RawWebSocket, node: Node
) -> None:
    ws.send_frame(OP_TEXT, b'{"t":"ping","x":"\xe2', fin=False)
    ws.send_frame(OP_CONTINUATION, b"\x82", fin=True)

    assert_failed_with(ws, node, 1007)


def test_character_split_across_fragments_is_accepted(ws: RawWebSocket) -> None:
    message = '{"t":"ping","x":"€"}'.encode()
    cut = message.index(b"\xe2") + 1  # after the first of e2 82 ac
    assert message[cut - 1 : cut + 2] == b"\xe2\x82\xac"

    ws.send_frame(OP_TEXT, message[:cut], fin=False)
    ws.send_frame(OP_CONTINUATION, message[cut:], fin=True)

    assert ws.recv_message() == {"t": "pong"}


# Control frames (RFC 6455 section 5.5).


def test_ping_with_125_byte_payload_is_answered_with_same_payload(
    ws: RawWebSocket,
) -> None:
    payload = bytes(range(125))

    ws.send_ping(payload)
    frame = ws.recv_frame()

    assert (frame.fin, frame.opcode, frame.payload) == (True, OP_PONG, payload)


def test_ping_with_126_byte_payload_is_closed_1002(
    ws: RawWebSocket, node: Node
) -> None:
    ws.send_ping(b"p" * 126)

    assert_failed_with(ws, node, 1002)


def test_fragmented_ping_is_closed_1002(ws: RawWebSocket, node: Node) -> None:
    ws.send_ping(b"first half", fin=False)
    ws.send_frame(OP_CONTINUATION, b"second half", fin=True)

    assert_failed_with(ws, node, 1002)


def test_ping_between_fragments_is_answered_and_message_reassembled(
    ws: RawWebSocket,
) -> None:
    ws.send_frame(OP_TEXT, b'{"t":"pi', fin=False)
    ws.send_ping(b"between fragments")

    pong = ws.recv_frame()
    assert (pong.fin, pong.opcode, pong.payload) == (
        True,
        OP_PONG,
        b"between fragments",
    )

    ws.send_frame(OP_CONTINUATION, b'ng"}', fin=True)

    assert ws.recv_message() == {"t": "pong"}


# Closing handshake (RFC 6455 sections 5.5.1, 7.1.5 and 7.4).


def test_empty_close_frame_is_answered_and_tcp_closed_cleanly(
    ws: RawWebSocket, node: Node
) -> None:
    ws.send_close()

    frame = ws.recv_frame()
    assert frame.opcode == OP_CLOSE
    assert frame.payload in (b"", b"\x03\xe8"), frame.payload  # none or 1000
    assert ws.wait_server_closed() == "eof"
    assert ws.trailing == b""
    wait_until(lambda: not device_connected(node, "d1"), message="d1 unregistered")


def test_normal_close_is_echoed_and_tcp_closed_cleanly(ws: RawWebSocket) -> None:
    ws.send_close(1000, "bye")

    code, _ = ws.recv_close()

    assert code == 1000
    assert ws.wait_server_closed() == "eof"


@pytest.mark.parametrize("code", [1005, 1006, 1015, 0, 999, 1004, 1016, 2999, 5000])
def test_close_frame_with_code_not_for_the_wire_is_answered_1002(
    ws: RawWebSocket, node: Node, code: int
) -> None:
    ws.send_close(code)

    assert_failed_with(ws, node, 1002)


def test_close_frame_with_one_byte_payload_is_answered_1002(
    ws: RawWebSocket, node: Node
) -> None:
    ws.send_frame(OP_CLOSE, b"\x03")

    assert_failed_with(ws, node, 1002)


def test_close_reason_with_invalid_utf8_is_answered_1007(
    ws: RawWebSocket, node: Node
) -> None:
    ws.send_close(1000, b"bad \xc0\xaf reason")

    assert_failed_with(ws, node, 1007)


# Message size (DESIGN 6: max_message_bytes, close 1009).


def padded_ping(size: int) -> bytes:
    """A JSON ping message of exactly ``size`` bytes."""
    base = b'{"t":"ping","pad":""}'
    message = base[:-2] + b"x" * (size - len(base)) + base[-2:]
    assert len(message) == size
    json.loads(message)
    return message


def test_message_at_max_message_bytes_is_accepted(ws: RawWebSocket) -> None:
    ws.send_text(padded_ping(MAX_MESSAGE))

    assert ws.recv_message() == {"t": "pong"}


def test_fragmented_message_at_max_message_bytes_is_accepted(ws: RawWebSocket) -> None:
    message = padded_ping(MAX_MESSAGE)

    ws.send_frame(OP_TEXT, message[:500], fin=False)
    ws.send_frame(OP_CONTINUATION, message[500:1000], fin=False)
    ws.send_frame(OP_CONTINUATION, message[1000:], fin=True)

    assert ws.recv_message() == {"t": "pong"}


def test_message_one_byte_over_max_message_bytes_is_closed_1009(
    ws: RawWebSocket, node: Node
) -> None:
    ws.send_text(padded_ping(MAX_MESSAGE + 1))

    assert_failed_with(ws, node, 1009)


def test_fragmented_message_one_byte_over_max_message_bytes_is_closed_1009(
    ws: RawWebSocket, node: Node
) -> None:
    message = padded_ping(MAX_MESSAGE + 1)

    ws.send_frame(OP_TEXT, message[:600], fin=False)
    ws.send_frame(OP_CONTINUATION, message[600:], fin=True)

    assert_failed_with(ws, node, 1009)


def test_frame_announcing_a_huge_length_is_closed_1009_before_its_payload(
    ws: RawWebSocket, node: Node
) -> None:
    # Only the header is sent: the node must refuse from the length alone.
    header = bytes([0x80 | OP_TEXT, 0x80 | 127]) + (2**40).to_bytes(8, "big")
    ws.send_raw(header + b"\x00\x00\x00\x00")

    assert_failed_with(ws, node, 1009)


def test_frame_length_with_most_significant_bit_set_is_closed_1002(
    ws: RawWebSocket, node: Node
) -> None:
    # RFC 6455 section 5.2: the most significant bit of a 64-bit length is 0.
    header = bytes([0x80 | OP_TEXT, 0x80 | 127]) + (2**63 + 5).to_bytes(8, "big")
    ws.send_raw(header + b"\x00\x00\x00\x00" + b"x" * 5)

    assert_failed_with(ws, node, 1002)


def test_close_inside_a_fragmented_message_is_echoed(ws: RawWebSocket) -> None:
    ws.send_frame(OP_TEXT, b'{"t":', fin=False)
    ws.send_close(1000)

    code, _ = ws.recv_close()

    assert code == 1000
    assert ws.wait_server_closed() == "eof"


# Bad messages keep the connection (DESIGN 3: unknown `t` is a 400).


def assert_status_400(message: dict[str, Any]) -> None:
    assert message["t"] == "status", message
    assert message["code"] == 400, message
    assert isinstance(message.get("reason"), str) and message["reason"], message


@pytest.mark.parametrize(
    "text",
    [b"hello, node", b'{"t":"ping"', b"", b"[1, 2, 3]", b'"ping"'],
    ids=["prose", "truncated-json", "empty", "array", "string"],
)
def test_text_that_is_not_a_json_object_gets_status_400_and_connection_stays_usable(
    ws: RawWebSocket, text: bytes
) -> None:
    ws.send_text(text)

    assert_status_400(ws.recv_message())
    assert_usable(ws)


def test_deeply_nested_json_gets_status_400_and_connection_stays_usable(
    ws: RawWebSocket,
) -> None:
    depth = (MAX_MESSAGE - 20) // 2  # as deep as the size limit allows
    ws.send_text(b'{"t":"ping","x":' + b"[" * depth + b"]" * depth + b"}")

    reply = ws.recv_message()

    # Within the parser's depth it is a ping; beyond, a bad message.
    assert reply == {"t": "pong"} or reply.get("code") == 400, reply
    assert_usable(ws)


def test_unknown_type_gets_status_400_and_connection_stays_usable(
    ws: RawWebSocket,
) -> None:
    ws.send_json({"t": "teleport", "id": 7, "to": "mars"})

    assert_status_400(ws.recv_message())
    assert_usable(ws)


def test_unknown_fields_are_ignored(ws: RawWebSocket) -> None:
    ws.send_json({"t": "ping", "extra": {"nested": [1, 2, 3]}, "more": None})

    assert ws.recv_message() == {"t": "pong"}


# Framing errors (RFC 6455 sections 5.1-5.4: fail the connection, 1002).


def test_unmasked_client_frame_is_closed_1002(ws: RawWebSocket, node: Node) -> None:
    ws.send_frame(OP_TEXT, PING, mask=False)

    assert_failed_with(ws, node, 1002)


@pytest.mark.parametrize("rsv", [4, 2, 1], ids=["rsv1", "rsv2", "rsv3"])
def test_frame_with_rsv_bit_is_closed_1002(
    ws: RawWebSocket, node: Node, rsv: int
) -> None:
    ws.send_frame(OP_TEXT, PING, rsv=rsv)

    assert_failed_with(ws, node, 1002)


@pytest.mark.parametrize("opcode", [0x3, 0x7, 0xB, 0xF])
def test_frame_with_reserved_opcode_is_closed_1002(
    ws: RawWebSocket, node: Node, opcode: int
) -> None:
    ws.send_frame(opcode, b"x")

    assert_failed_with(ws, node, 1002)


def test_continuation_without_a_message_is_closed_1002(
    ws: RawWebSocket, node: Node
) -> None:
    ws.send_frame(OP_CONTINUATION, PING, fin=True)

    assert_failed_with(ws, node, 1002)


def test_new_message_inside_a_fragmented_one_is_closed_1002(
    ws: RawWebSocket, node: Node
) -> None:
    ws.send_frame(OP_TEXT, b'{"t":', fin=False)
    ws.send_frame(OP_BINARY, b"\x00\x01", fin=True)

    assert_failed_with(ws, node, 1002)


# Every failed connection is counted (DESIGN 6: a metric counts bad input).


FAILURES: dict[str, Callable[[RawWebSocket], None]] = {
    "1007-invalid-utf8": lambda w: w.send_text(b"\xc0"),
    "1002-big-ping": lambda w: w.send_ping(b"p" * 126),
    "1002-unmasked": lambda w: w.send_frame(OP_TEXT, PING, mask=False),
    "1009-too-big": lambda w: w.send_text(padded_ping(MAX_MESSAGE + 1)),
    "400-not-json": lambda w: w.send_text(b"nope"),
}


@pytest.mark.parametrize("case", list(FAILURES), ids=list(FAILURES))
def test_each_bad_frame_or_message_is_counted_under_rejects(
    ws: RawWebSocket,
    node: Node,
    stats: Callable[[Node], dict[str, Any]],
    wait_rejects: Callable[..., dict[str, int]],
    case: str,
) -> None:
    before = stats(node)["rejects"]

    FAILURES[case](ws)
    ws.recv_frame()  # the close frame or the status: the node has acted
    after = wait_rejects(node, before)

    grown = {
        k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)
    }
    assert sum(grown.values()) == 1, grown


def test_frames_arriving_one_byte_at_a_time_are_reassembled(ws: RawWebSocket) -> None:
    message = padded_ping(300)  # a 16-bit length field
    data = (
        encode_frame(OP_TEXT, message[:150], fin=False)
        + encode_frame(OP_PING, b"split ping")
        + encode_frame(OP_CONTINUATION, message[150:], fin=True)
        + encode_frame(OP_TEXT, PING)
    )

    for i in range(len(data)):
        ws.send_raw(data[i : i + 1])

    pong = ws.recv_frame()
    assert (pong.opcode, pong.payload) == (OP_PONG, b"split ping")
    assert ws.recv_message() == {"t": "pong"}
    assert ws.recv_message() == {"t": "pong"}


def test_several_frames_in_one_write_are_all_answered(ws: RawWebSocket) -> None:
    ws.send_raw(b"".join(encode_frame(OP_TEXT, PING) for _ in range(50)))

    replies = [ws.recv_message() for _ in range(50)]

    assert replies == [{"t": "pong"}] * 50


def test_message_in_many_one_byte_fragments_is_reassembled(ws: RawWebSocket) -> None:
    message = '{"t":"ping","x":"é€😀"}'.encode()
    frames = [
        (OP_TEXT if i == 0 else OP_CONTINUATION, message[i : i + 1])
        for i in range(len(message))
    ]

    for i, (op, part) in enumerate(frames):
        ws.send_frame(op, part, fin=i == len(frames) - 1)

    assert ws.recv_message() == {"t": "pong"}


def test_unsolicited_pong_is_ignored(ws: RawWebSocket) -> None:
    ws.send_frame(OP_PONG, b"unasked")

    assert_usable(ws)


def test_server_frames_are_unmasked_and_final(ws: RawWebSocket) -> None:
    ws.send_text(PING)

    frame = ws.recv_frame()

    assert not frame.masked
    assert frame.fin and frame.rsv == 0
    assert frame.opcode == OP_TEXT
    assert frame.json() == {"t": "pong"}


def test_ping_payload_is_answered_even_when_empty(ws: RawWebSocket) -> None:
    ws.send_ping(b"")

    frame = ws.recv_frame()

    assert (frame.opcode, frame.payload) == (OP_PONG, b"")
