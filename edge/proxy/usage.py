"""The LLM tokens an answer used, read from what the provider reports, without parsing the
answer whole and without changing a byte of it (but one: see `EventScanner`). Pure, no I/O.

Where OpenAI-style providers say it:
- a JSON answer's `usage` object, near its end: Chat Completions and Completions
  (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`), Embeddings
  (`prompt_tokens`), the Responses API (`input_tokens`, `output_tokens`,
  `input_tokens_details.cached_tokens`);
- a Chat Completions stream's last chunk, `"choices": []` with `usage`, when the request asked
  with `stream_options.include_usage` (the last report counts: some providers put the running
  usage on every chunk); the Responses API stream's `response.completed` event (or
  `response.incomplete`, `response.failed`).

An answer that reports nothing (a provider that does not, a stream cut or left early) is
estimated from the bytes that crossed: `ceil(bytes / 4)` tokens each way (about four bytes a
token for English text and JSON), counted apart as `source="estimated"`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple

import orjson

BYTES_PER_TOKEN = 4
MOST_TOKENS = 10**9  # a reported count above this is not believed
USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
EVENT_END = re.compile(rb"\r?\n\r?\n")
PARTIAL_EVENT_MAX = 4 * 1024 * 1024  # an SSE event longer than this is not read for usage
_JSON = json.JSONDecoder()  # raw_decode: one JSON value from a position, and where it ends
# the Responses API's last event, with the response and its usage, however it ended
RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class Usage(NamedTuple):
    input: int
    output: int
    cached: int = 0  # of `input`, read from the provider's cache
    reported: bool = True  # False: estimated from bytes


NO_USAGE = Usage(0, 0)


def estimate(request_bytes: int, response_bytes: int) -> Usage:
    return Usage(
        math.ceil(request_bytes / BYTES_PER_TOKEN),
        math.ceil(response_bytes / BYTES_PER_TOKEN),
        reported=False,
    )


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MOST_TOKENS:
        return value
    return None


def from_object(usage: Any) -> Usage | None:
    """A `usage` object in any of the shapes above, or None if it is not one."""
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage:  # the Responses API
        tokens_in = _count(usage.get("input_tokens"))
        tokens_out = _count(usage.get("output_tokens"))
        details = usage.get("input_tokens_details")
    else:
        tokens_in = _count(usage.get("prompt_tokens"))
        tokens_out = _count(usage.get("completion_tokens", 0))  # embeddings have none
        details = usage.get("prompt_tokens_details")
    if tokens_in is None or tokens_out is None:
        return None
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Usage(tokens_in, tokens_out, min(cached or 0, tokens_in))


def in_json_tail(tail: bytes) -> Usage | None:
    """The last `usage` object in the tail of a JSON answer, if it is whole there."""
    end = len(tail)
    while True:  # the last one counts: look from the end (rfind is a memchr, a regex is not)
        at = tail.rfind(b'"usage"', 0, end)
        if at < 0:
            return None
        match = USAGE_OBJECT.match(tail, at)
        if match is not None:
            break
        end = at
    text = tail[match.end() - 1 :].decode("utf-8", "replace")
    try:
        obj, _ = _JSON.raw_decode(text)
    except ValueError:
        return None
    return from_object(obj)


def in_event(event: bytes) -> tuple[Usage | None, bool]:
    """The usage an SSE event reports, and whether it is a usage-only Chat Completions chunk
    (`"choices": []`), the one a client that did not ask for usage must not see."""
    if b'"usage"' not in event or not USAGE_OBJECT.search(event):
        return None, False
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    try:
        data = orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None, False
    if not isinstance(data, dict):
        return None, False
    response = data.get("response")
    if data.get("type") in RESPONSE_ENDS and isinstance(response, dict):
        return from_object(response.get("usage")), False
    usage = from_object(data.get("usage"))
    return usage, usage is not None and data.get("choices") == []


class EventScanner:
    """Reads a streamed (SSE) answer's events for its usage as the pieces go by.

    `strip`: edge asked for the usage on the client's behalf, so the usage-only chunk is taken
    out of what the client receives. Then an event split across reads is held back until its
    end arrives (never longer), so the chunk can be dropped whole; otherwise every byte is
    passed on at once, untouched, and the scanner only keeps the unfinished event to read."""

    __slots__ = ("_partial", "bytes", "strip", "usage")

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.usage: Usage | None = None
        self.bytes = 0  # of the answer, as the upstream sent it
        self._partial: bytes | None = b""  # the unfinished event; None: no longer reading

    def feed(self, data: bytes) -> bytes:
        """What to pass on of `data`."""
        self.bytes += len(data)
        partial = self._partial
        if partial is None:
            return data  # given up on an event over PARTIAL_EVENT_MAX
        buffer = partial + data if partial else data
        out: list[bytes] = []
        start = 0
        for end in EVENT_END.finditer(buffer):
            event = buffer[start : end.end()]
            start = end.end()
            usage, usage_only = in_event(event)
            if usage is not None:
                self.usage = usage
            if not (usage_only and self.strip):
                out.append(event)
        rest = buffer[start:]
        if len(rest) > PARTIAL_EVENT_MAX:
            self._partial = None
            out.append(rest)
        else:
            self._partial = rest
        return b"".join(out) if self.strip else data

    def end(self) -> bytes:
        """The answer is over: what was held back (an event that never ended)."""
        rest, self._partial = self._partial or b"", None
        return rest if self.strip else b""
