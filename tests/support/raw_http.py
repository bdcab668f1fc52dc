"""HTTP/1.1 written and read byte for byte over real sockets, for what httpx will not send or
would hide: smuggling probes, repeated or malformed headers, slow uploads, FIN vs RST closes,
and responses cut without their final chunk."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in the order received
    body: bytes  # de-chunked, or cut to Content-Length
    raw: bytes  # everything received, head included

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]

    def header(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None


def chunked(pieces: list[bytes]) -> bytes:
    """`pieces` as a chunked request body, terminated."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2 :]
    return out


def chunked_length(data: bytes) -> int:
    """How many bytes of `data` a chunked body takes, its last chunk included; -1 if the
    body is not whole yet."""
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return -1
        size = int(data[pos:line_end].split(b";")[0], 16)
        pos = line_end + 2 + size + 2
        if pos > len(data):
            return -1
        if size == 0:
            return pos


def complete_chunked(raw: bytes) -> bool:
    """Whether a chunked response ended with its final (zero) chunk."""
    return raw.endswith(b"0\r\n\r\n")


def request_head(port: int, key: str | None, start: str, *lines: str) -> bytes:
    """A request head: `start` line, Host, the key's Authorization (if any), `lines`."""
    head = [start, f"Host: 127.0.0.1:{port}"]
    if key is not None:
        head.append(f"Authorization: Bearer {key}")
    return ("\r\n".join([*head, *lines]) + "\r\n\r\n").encode("latin-1")


def exchange(port: int, data: bytes, limit: float = 2.0) -> tuple[bytes, bool]:
    """Send `data` on a fresh connection; read until EOF or `limit` seconds.

    Returns what came back and whether the server closed the connection (FIN or RST).
    """
    deadline = time.monotonic() + limit
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
        sock.sendall(data)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
    return received, False


def parse_response(data: bytes) -> RawResponse:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    response = RawResponse(int(status_line.split()[1]), headers, rest, data)
    if "chunked" in ",".join(response.values("transfer-encoding")).lower():
        response.body = dechunk(rest)
    elif lengths := response.values("content-length"):
        response.body = rest[: int(lengths[0])]
    return response


def raw_get(
    port: int, header_lines: list[bytes], path: bytes = b"/v1/models", limit: float = 10.0
) -> RawResponse:
    """One GET written byte for byte (`Connection: close`); the whole response."""
    request = (
        b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % (path, port)
        + b"".join(line + b"\r\n" for line in header_lines)
        + b"Connection: close\r\n\r\n"
    )
    data, _ = exchange(port, request, limit)
    return parse_response(data)


def open_request(port: int, data: bytes, timeout: float = 5.0) -> socket.socket:
    """A connection with `data` sent on it, left open for the caller to read and close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(data)
    return sock


def close(sock: socket.socket, rst: bool = False) -> None:
    """Close with a FIN, or with an RST (SO_LINGER 0) as a crashed client would."""
    if rst:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def send_in_pieces(
    port: int,
    head: bytes,
    pieces: list[bytes],
    gap: float,
    on_piece: Callable[[], object] | None = None,
) -> bytes:
    """Send `head`, then each piece `gap` seconds apart (calling `on_piece` after each); read
    the answer until it looks complete or the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        for piece in pieces:
            time.sleep(gap)
            sock.sendall(piece)
            if on_piece is not None:
                on_piece()
        received = b""
        while b"\r\n\r\n" not in received or not received.endswith((b"}", b"0\r\n\r\n")):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def split_responses(data: bytes, most: int = 10) -> list[RawResponse]:
    """The responses that came one after another on one connection (pipelined requests'),
    each framed by its Content-Length or its chunks; a trailing partial one is left out."""
    answers: list[RawResponse] = []
    while b"\r\n\r\n" in data and len(answers) < most:
        head_len = data.index(b"\r\n\r\n") + 4
        answer = parse_response(data[:head_len])
        rest = data[head_len:]
        if "chunked" in ",".join(answer.values("transfer-encoding")).lower():
            size = chunked_length(rest)
            if size < 0:
                break
            answer = RawResponse(
                answer.status, answer.headers, dechunk(rest[:size]), data[: head_len + size]
            )
        else:
            size = int(answer.header("content-length") or 0)
            if len(rest) < size:
                break
            answer = RawResponse(
                answer.status, answer.headers, rest[:size], data[: head_len + size]
            )
        answers.append(answer)
        data = rest[size:]
    return answers
