"""A minimal HTTP/2 client over a plain socket, for requests no gRPC library sends: a header twice
(``grpc-encoding: identity`` then ``gzip``), a message that stops half way, hundreds of streams
that never finish.  Headers go out as HPACK literals (no index, no Huffman); of the answers only
``:status`` is read, which nginx writes as a static-table index (``0x88`` 200, ``0x89`` 204, ...)
or a literal of three digits.
"""

from __future__ import annotations

import select
import socket
import struct
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
_STATIC_STATUS = {0x88: 200, 0x89: 204, 0x8A: 206, 0x8B: 304, 0x8C: 400, 0x8D: 404, 0x8E: 500}


def _int(value: int, prefix_bits: int = 7, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = [first | limit], value - limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes([*out, value])


def _literal(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return b"\x00" + _int(len(n)) + n + _int(len(v)) + v


def grpc_message(payload: bytes, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message."""
    return struct.pack(">BI", int(compressed), len(payload)) + payload


class H2:
    """One HTTP/2 connection: ``request`` opens a stream, ``send`` writes DATA within the peer's
    flow-control windows, ``status`` waits for a stream's ``:status``."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(PREFACE + self._frame(SETTINGS, 0, 0, b""))
        self.timeout = timeout
        self.next_id, self.initial, self.conn_window = 1, 65535, 65535
        self.windows: dict[int, int] = {}
        self.statuses: dict[int, int] = {}
        self.closed: set[int] = set()
        self.buf = b""
        self.goaway = False

    @staticmethod
    def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

    def request(self, path: str, headers: list[tuple[str, str]] = (), end_stream: bool = False) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost")]
        fields += [("content-type", "application/grpc"), ("te", "trailers"), *headers]
        block = b"".join(_literal(k, v) for k, v in fields)
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        self.windows[sid] = self.initial
        self.sock.sendall(self._frame(HEADERS, flags, sid, block))
        return sid

    def send(self, sid: int, data: bytes, end_stream: bool = False, deadline_s: float = 30.0) -> None:
        """``data`` on stream ``sid``, waiting for window updates as needed."""
        end = time.monotonic() + deadline_s
        view = memoryview(data)
        while view or end_stream:
            n = min(len(view), self.windows.get(sid, 0), self.conn_window, 16384)
            if n <= 0 and view:
                if sid in self.closed or self.goaway or time.monotonic() > end:
                    return
                self.pump(0.5)
                continue
            last = end_stream and n == len(view)
            self.sock.sendall(self._frame(DATA, END_STREAM if last else 0, sid, bytes(view[:n])))
            self.windows[sid] -= n
            self.conn_window -= n
            view = view[n:]
            if last or not view:
                return

    def pump(self, wait_s: float = 0.0) -> None:
        """Read and handle every frame that arrives within ``wait_s``."""
        end = time.monotonic() + wait_s
        while True:
            left = max(0.0, end - time.monotonic())
            if not select.select([self.sock], [], [], left)[0]:
                return
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                self.goaway = True
                self.closed.update(self.windows)
                return
            self.buf += chunk
            self._frames()

    def _frames(self) -> None:
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                return
            kind, flags = self.buf[3], self.buf[4]
            sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload, self.buf = self.buf[9 : 9 + length], self.buf[9 + length :]
            self._handle(kind, flags, sid, payload)

    def _handle(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            for i in range(0, len(payload), 6):
                key, value = struct.unpack(">HI", payload[i : i + 6])
                if key == 4:  # SETTINGS_INITIAL_WINDOW_SIZE
                    for s in self.windows:
                        self.windows[s] += value - self.initial
                    self.initial = value
            self.sock.sendall(self._frame(SETTINGS, ACK, 0, b""))
        elif kind == WINDOW_UPDATE:
            inc = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if sid == 0:
                self.conn_window += inc
            elif sid in self.windows:
                self.windows[sid] += inc
        elif kind == HEADERS and sid not in self.statuses:
            self.statuses[sid] = _status(payload, flags)
        elif kind == DATA and payload:  # keep the answers flowing
            inc = struct.pack(">I", len(payload))
            self.sock.sendall(self._frame(WINDOW_UPDATE, 0, 0, inc) + self._frame(WINDOW_UPDATE, 0, sid, inc))
        elif kind == PING and not flags & ACK:
            self.sock.sendall(self._frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            self.goaway = True
        if kind in (HEADERS, DATA, RST_STREAM) and (flags & END_STREAM or kind == RST_STREAM):
            self.closed.add(sid)

    def status(self, sid: int, timeout_s: float | None = None) -> int | None:
        """The ``:status`` of stream ``sid`` (None: reset or no answer in time)."""
        end = time.monotonic() + (self.timeout if timeout_s is None else timeout_s)
        while sid not in self.statuses and sid not in self.closed and not self.goaway and time.monotonic() < end:
            self.pump(min(0.5, max(0.0, end - time.monotonic())))
        return self.statuses.get(sid)

    def close(self) -> None:
        self.sock.close()


def _status(block: bytes, flags: int) -> int:
    if flags & 0x8:  # PADDED
        block = block[1 : len(block) - block[0]]
    if flags & 0x20:  # PRIORITY
        block = block[5:]
    if block[0] in _STATIC_STATUS:
        return _STATIC_STATUS[block[0]]
    if block[0] in (0x48, 0x08) and block[1] == 3:  # literal :status, three raw digits
        return int(block[2:5])
    raise AssertionError(f"unexpected :status encoding {block[:8]!r}")
