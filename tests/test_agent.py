"""The guest agent protocol, host side (pyvmm/agent.py), without a guest.

The frame layouts are checked against guest/agent.h with gcc; a fake guest
(a thread speaking the guest side of the protocol) drives AgentPort and
AgentSession through the same calls a virtio-console makes.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cheader import probe
from pyvmm import agent
from pyvmm.agent import (AGENT_MAX_PAYLOAD, AgentPort, AgentProtocolError, AgentSession, AgentTimeout,
                         FrameDecoder, FrameType, agent_config, agent_frame_header, config_payload,
                         encode_frame)

AGENT_H = str(Path(__file__).resolve().parent.parent / "guest" / "agent.h")


def test_layouts_match_guest_agent_h(tmp_path):
    fields = {"agent_frame_header": ["type", "flags", "reserved", "length"],
              "agent_config": ["realtime_sec", "realtime_nsec", "flags", "entropy"]}
    lines = []
    for struct, names in fields.items():
        lines.append(f'printf("size {struct} %zu\\n", sizeof(struct {struct}));')
        for name in names:
            lines.append(f'printf("offset {struct} {name} %zu\\n", offsetof(struct {struct}, {name}));')
    for t in FrameType:
        lines.append(f'printf("const {t.name} %d\\n", AGENT_{t.name});')
    for const in ("AGENT_VERSION", "AGENT_MAX_PAYLOAD", "AGENT_ENTROPY_BYTES",
                  "AGENT_CONFIG_SET_CLOCK", "AGENT_CONFIG_ENTROPY"):
        lines.append(f'printf("const {const} %d\\n", {const});')
    program = (f'#include <stdio.h>\n#include <stddef.h>\n#include "{AGENT_H}"\n'
               "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    c = probe(tmp_path, AGENT_H, program)
    for struct, names in fields.items():
        py = getattr(agent, struct)
        assert c[f"size {struct}"] == ctypes.sizeof(py)
        for name in names:
            assert c[f"offset {struct} {name}"] == getattr(py, name).offset, (struct, name)
    for t in FrameType:
        assert c[f"const {t.name}"] == t.value
    for const in ("AGENT_VERSION", "AGENT_MAX_PAYLOAD", "AGENT_ENTROPY_BYTES",
                  "AGENT_CONFIG_SET_CLOCK", "AGENT_CONFIG_ENTROPY"):
        assert c[f"const {const}"] == getattr(agent, const), const


# --- frames ---------------------------------------------------------------------------------
def test_decoder_joins_split_frames_and_splits_joined_ones():
    stream = encode_frame(FrameType.STDOUT, b"abc") + encode_frame(FrameType.EXIT, b"\x07\0\0\0")
    d = FrameDecoder()
    got = []
    for i in range(len(stream)):   # one byte at a time
        got += d.feed(stream[i:i + 1])
    assert got == [(FrameType.STDOUT, b"abc"), (FrameType.EXIT, b"\x07\0\0\0")]
    assert FrameDecoder().feed(stream) == got


def test_decoder_refuses_a_frame_longer_than_the_maximum():
    d = FrameDecoder()
    with pytest.raises(AgentProtocolError):
        d.feed(bytes(agent_frame_header(type=5, length=AGENT_MAX_PAYLOAD + 1)))
    assert d.feed(encode_frame(FrameType.READY)) == [(FrameType.READY, b"")]   # resynchronised


def test_encode_refuses_an_oversized_payload():
    with pytest.raises(ValueError):
        encode_frame(FrameType.EXEC, b"x" * (AGENT_MAX_PAYLOAD + 1))


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=8),
       cuts=st.lists(st.integers(1, 64), max_size=40))
def test_any_chunking_gives_the_same_frames(frames, cuts):
    stream = b"".join(encode_frame(t, p) for t, p in frames)
    d, got, pos = FrameDecoder(), [], 0
    for n in cuts:
        got += d.feed(stream[pos:pos + n])
        pos += n
    got += d.feed(stream[pos:])
    assert got == frames


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_from_a_guest_never_raises_in_the_port(data):
    port = AgentPort()
    sent = []
    port.attach(sent.append)
    port.from_guest(data)   # bad frames are logged and dropped


# --- the VMM's port ---------------------------------------------------------------------------
def test_hello_gets_config_with_clock_entropy_and_words():
    port = AgentPort(words="pyvmm.share=work:dax")
    sent = []
    port.attach(sent.append)
    port.from_guest(encode_frame(FrameType.HELLO, (1).to_bytes(4, "little")))
    port.from_guest(encode_frame(FrameType.HELLO, (1).to_bytes(4, "little")))   # a second boot/restore
    configs = [f for data in sent for f in FrameDecoder().feed(data)]
    assert [t for t, _ in configs] == [FrameType.CONFIG, FrameType.CONFIG]
    fixed = [agent_config.from_buffer_copy(p[:ctypes.sizeof(agent_config)]) for _, p in configs]
    assert abs(fixed[0].realtime_sec - time.time()) < 5
    assert fixed[0].flags == agent.AGENT_CONFIG_SET_CLOCK | agent.AGENT_CONFIG_ENTROPY
    assert bytes(fixed[0].entropy) != bytes(fixed[1].entropy)
    assert configs[0][1][ctypes.sizeof(agent_config):] == b"pyvmm.share=work:dax"


def test_config_payload_layout():
    payload = config_payload("a b", now_ns=5_000_000_123, entropy=bytes(range(64)))
    c = agent_config.from_buffer_copy(payload[:80])
    assert (c.realtime_sec, c.realtime_nsec) == (5, 123)
    assert bytes(c.entropy) == bytes(range(64)) and payload[80:] == b"a b"


def test_frames_wait_for_a_client_and_only_exec_and_kill_reach_the_guest():
    port = AgentPort()
    to_guest = []
    port.attach(to_guest.append)
    port.from_guest(encode_frame(FrameType.READY))
    port.from_guest(encode_frame(FrameType.CONFIG, b"from a guest: not allowed"))
    assert port.ready.is_set()
    got = []
    port.connect_client(lambda t, p: got.append((t, p)))
    assert got == [(FrameType.READY, b"")]
    port.client_frame(FrameType.CONFIG, b"not from a client either")
    port.client_frame(FrameType.EXEC, b"true")
    assert to_guest == [encode_frame(FrameType.EXEC, b"true")]


def test_output_kept_for_a_missing_client_is_bounded():
    port = AgentPort()
    port.attach(lambda data: None)
    chunk = b"x" * AGENT_MAX_PAYLOAD
    for _ in range(agent.PENDING_MAX // AGENT_MAX_PAYLOAD * 3):
        port.from_guest(encode_frame(FrameType.STDOUT, chunk))
    kept = []
    port.connect_client(lambda t, p: kept.append(p))
    assert sum(map(len, kept)) <= agent.PENDING_MAX


# --- a client against a fake guest ------------------------------------------------------------
class FakeGuest:
    """The guest side: HELLO, READY after CONFIG, and commands answered by ``answer``."""

    def __init__(self, port: AgentPort, answer) -> None:
        self.port = port
        self.answer = answer
        self.decoder = FrameDecoder()
        self.killed: list[int] = []
        port.attach(self.receive)

    def boot(self) -> None:
        self.port.from_guest(encode_frame(FrameType.HELLO, (1).to_bytes(4, "little")))

    def receive(self, data: bytes) -> None:   # VirtioConsole.receive: host -> guest bytes
        for ftype, payload in self.decoder.feed(data):
            if ftype == FrameType.CONFIG:
                threading.Thread(target=self.port.from_guest,
                                 args=(encode_frame(FrameType.READY),)).start()
            elif ftype == FrameType.EXEC:
                threading.Thread(target=self.answer, args=(self, payload.decode())).start()
            elif ftype == FrameType.KILL:
                self.killed.append(int.from_bytes(payload, "little"))

    def say(self, ftype: int, payload: bytes = b"") -> None:
        self.port.from_guest(encode_frame(ftype, payload))


def echo_answer(guest: FakeGuest, command: str) -> None:
    if command == "hang":
        guest.say(FrameType.STDOUT, b"started\n")
        while not guest.killed:
            time.sleep(0.01)
        guest.say(FrameType.EXIT, (137).to_bytes(4, "little"))
        return
    guest.say(FrameType.STDOUT, command.encode() + b"\n")
    guest.say(FrameType.STDERR, b"err\n")
    guest.say(FrameType.EXIT, (7).to_bytes(4, "little", signed=True))


def test_session_runs_commands_and_kills_on_timeout():
    port = AgentPort()
    guest = FakeGuest(port, echo_answer)
    session = AgentSession(port.client_frame)
    port.connect_client(session.deliver)
    guest.boot()
    assert session.wait_ready(5) == ""
    r = session.run("hello", timeout=5)
    assert (r.returncode, r.stdout, r.stderr) == (7, "hello\n", "err\n")
    with pytest.raises(AgentTimeout) as e:
        session.run("hang", timeout=0.3)
    assert guest.killed == [9]
    assert e.value.result.stdout == "started\n" and e.value.result.returncode == 137
    assert session.run("again", timeout=5).stdout == "again\n"   # still usable


def test_session_over_the_socket(tmp_path):
    path = str(tmp_path / "agent.sock")
    port = AgentPort(socket_path=path)
    guest = FakeGuest(port, echo_answer)
    try:
        guest.boot()   # READY waits in the port until the client connects
        first = agent.connect(path)
        assert first.session.wait_ready(5) == ""
        assert first.session.run("over a socket", timeout=5).stdout == "over a socket\n"
        first.close()
        second = agent.connect(path)   # a second client after the first left
        assert second.session.run("second", timeout=5).stdout == "second\n"
        second.close()
    finally:
        port.close()
    assert not os.path.exists(path)


def test_closing_the_port_under_a_connected_client_ends_its_socket_thread(tmp_path, monkeypatch):
    # close() while the thread serves a client: once the client leaves, the thread's
    # next accept() must end it quietly (it once found self._server None and raised).
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    before = set(threading.enumerate())
    path = str(tmp_path / "agent.sock")
    port = AgentPort(socket_path=path)
    (thread,) = [t for t in threading.enumerate() if t not in before and t.name == "agent-socket"]
    client = agent.connect(path)
    deadline = time.monotonic() + 5
    while port._client is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert port._client is not None, "the client never reached the port"
    port.close()
    client.close()
    thread.join(5)
    assert not thread.is_alive() and errors == []


def test_closed_session_raises_instead_of_waiting():
    session = AgentSession(lambda t, p: None)
    session.close("the VMM exited")
    with pytest.raises(agent.AgentClosed, match="the VMM exited"):
        session.wait_ready(5)


def test_connect_gives_up_after_its_timeout(tmp_path):
    with pytest.raises(OSError):
        agent.connect(str(tmp_path / "nobody.sock"), timeout=0.2)
