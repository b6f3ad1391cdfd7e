"""pooler.proc.channel: framing, chunking and reassembly of control messages."""
from __future__ import annotations

import os
import socket
import threading

import pytest

from pooler.proc import channel


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_kinds_are_distinct_single_bytes():
    kinds = [channel.KICK, channel.CANCEL, channel.ADMIN, channel.SNAP_REQUEST,
             channel.SNAP_REPLY, channel.RELOAD, channel.SET, channel.MOVE]
    assert all(len(k) == 1 for k in kinds)
    assert len(set(kinds)) == len(kinds)


def test_small_and_empty_messages_are_one_datagram():
    a, b = _pair()
    channel.send(a, channel.KICK)
    channel.send(a, channel.CANCEL, channel.CANCEL_BODY.pack(12, -7))
    got = list(channel.Assembler().drain(b))
    assert got == [(channel.KICK, b"", []), (channel.CANCEL, channel.CANCEL_BODY.pack(12, -7), [])]


def test_a_descriptor_travels_with_its_message():
    a, b = _pair()
    r, w = os.pipe()
    try:
        channel.send_fd(a, channel.MOVE, b"state", w)
        [(kind, body, fds)] = list(channel.Assembler().drain(b))
        assert (kind, body, len(fds)) == (channel.MOVE, b"state", 1)
        os.write(fds[0], b"through the copy")           # the receiver's own copy of `w`
        os.close(fds[0])
        assert os.read(r, 100) == b"through the copy"
        with pytest.raises(ValueError):                  # one datagram only
            channel.send_fd(a, channel.MOVE, b"x" * (channel.CHUNK + 1), w)
    finally:
        os.close(r)
        os.close(w)


def test_large_message_is_chunked_and_reassembled_while_the_receiver_drains():
    a, b = _pair()
    body = os.urandom(channel.CHUNK * 20 + 123)          # more than the queue holds at once
    got: list[tuple[bytes, bytes]] = []
    asm = channel.Assembler()
    done = threading.Event()

    def reader() -> None:
        b.setblocking(True)
        b.settimeout(5)
        while not got:
            msg = asm.feed(b.recv(channel.MAX_DATAGRAM))
            if msg is not None:
                got.append(msg)
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    channel.send(a, channel.RELOAD, body, timeout=5)
    assert done.wait(5)
    assert got == [(channel.RELOAD, body)]
    assert not asm.partial


def test_full_queue_raises_channel_full():
    a, _b = _pair()
    with pytest.raises(channel.ChannelFull):
        for _ in range(10000):
            channel.send(a, channel.KICK, b"x" * 1000, timeout=0)


def test_interleaved_chunks_of_two_messages_and_stale_partials():
    asm = channel.Assembler()
    a, b = _pair()
    one, two = b"1" * (channel.CHUNK + 5), b"2" * (channel.CHUNK * 2)
    channel.send(a, channel.SNAP_REPLY, one)
    channel.send(a, channel.SNAP_REPLY, two)
    datagrams = [b.recv(channel.MAX_DATAGRAM) for _ in range(4)]
    out = [asm.feed(d) for d in (datagrams[0], datagrams[2], datagrams[3], datagrams[1])]
    assert out == [None, None, (channel.SNAP_REPLY, two), (channel.SNAP_REPLY, one)]
    # A half-sent message (its sender died) is dropped once it is stale.
    asm.feed(channel.HEADER.pack(channel.ADMIN, 1, 999999, 0, 2) + b"half")
    assert len(asm.partial) == 1
    key = next(iter(asm.partial))
    asm.partial[key] = (asm.partial[key][0] - channel.STALE_PARTIAL - 1, asm.partial[key][1])
    asm.feed(channel.HEADER.pack(channel.ADMIN, 2, 999999, 0, 2) + b"new")
    assert list(asm.partial) == [(999999, 2)]
