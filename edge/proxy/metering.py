"""Metering one request of a metered key (a token limit, or a balance and token prices): what it
asks for, what it costs, and what its answer used, observed as the bytes go by.

Only metered keys come here; for every other key the request path is what it was (no body
parse, one Redis call). For a metered one:
- the request body (when it is whole, as chat requests are) is read for its `model` and
  `stream`; a streaming Chat Completions or Completions request that did not ask for usage is
  given `stream_options.include_usage` (`metering.stream_usage = "inject"`, the default), and
  the usage-only chunk this adds is taken out of what the client receives;
- the answer's bytes pass through a `Meter` on their way to the client: a JSON answer keeps
  its first and last USAGE_WINDOW bytes to read `usage` from at the end, a streamed one goes
  through a `usage.EventScanner`;
- the cost is exact integers: prices are credits per million tokens, so a request costs
  `tokens * price` micro-credits; settle.lua carries the part of a credit not yet charged from
  one request to the next, so sums over any number of requests are what the prices say.
"""

from __future__ import annotations

import re
import zlib
from typing import Any, NamedTuple

import orjson

from edge.proxy.policy import DUPLICATE_MODEL, top_object
from edge.proxy.usage import NO_USAGE, EventScanner, Usage, estimate, in_json_tail
from edge.settings import ModelPrice, PricingSettings

USAGE_WINDOW = 16 * 1024  # bytes kept of each end of a JSON answer, to find its usage in
INFLATED = frozenset({b"gzip", b"x-gzip", b"deflate"})
INFLATE_ANY = 32 + zlib.MAX_WBITS  # zlib or gzip framing, told by its header
INFLATE_PIECE = 256 * 1024
UNREADABLE = object()  # an encoding edge cannot read: the answer is estimated
# the routes whose answers use tokens (exactly these paths after /v1/): a metered key's body
# is read whole there, and its answer metered; elsewhere (models, files, ...) it is not
METERED_ROUTES = frozenset({"chat/completions", "completions", "responses", "embeddings"})
STREAM_USAGE_ROUTES = ("chat/completions", "completions")  # where stream_options applies
INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


def glob_regex(glob: str) -> re.Pattern[str]:
    """A model glob (`*` any run of characters, `?` one) as a regular expression."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)
    return re.compile("".join(parts), re.DOTALL)


class Pricing:
    """`[pricing]`: credits per admitted request, and per million tokens by model glob."""

    def __init__(self, settings: PricingSettings) -> None:
        self.request = settings.request
        self._models = [(glob_regex(price.match), price) for price in settings.models]
        self.token_priced = bool(self._models)

    def price(self, model: str | None) -> ModelPrice | None:
        """The first price whose glob matches `model` (None: no token price applies). A body
        whose model could not be read is priced by a catch-all glob (`*`), if there is one."""
        if model is None:
            model = ""
        for pattern, price in self._models:
            if pattern.fullmatch(model):
                return price
        return None

    @staticmethod
    def cost_micros(price: ModelPrice | None, usage: Usage) -> int:
        """What `usage` costs at `price`, in millionths of a credit."""
        if price is None:
            return 0
        cached = min(usage.cached, usage.input)
        cached_price = price.input if price.cached_input is None else price.cached_input
        return (
            (usage.input - cached) * price.input
            + cached * cached_price
            + usage.output * price.output
        )


class UnusableBody(Exception):
    """A metered request's body that must not be sent (`problem` says why, to the client)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class Prepared(NamedTuple):
    body: bytes  # what goes upstream
    model: str | None
    strip: bool  # edge added include_usage: the usage-only chunk is not the client's
    problem: str | None = None  # why the body cannot be sent (refused, 400)


def prepare(body: bytes, route: str, inject: bool) -> Prepared:
    """A metered request's body, read for its model and, for a stream that did not ask for its
    usage, given `stream_options.include_usage` (the rest of the body kept byte for byte).
    A body with two fields that could be the model is refused: it could be priced as one
    model and run as another (`policy.top_object`)."""
    data, duplicate = top_object(body)
    if duplicate:
        return Prepared(body, None, False, DUPLICATE_MODEL.problem)
    if data is None:
        return Prepared(body, None, False)
    model = data.get("model") if isinstance(data.get("model"), str) else None
    if not (inject and data.get("stream") is True and route in STREAM_USAGE_ROUTES):
        return Prepared(body, model, False)
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return Prepared(body, model, False)  # the client asked: it gets its usage chunk
    if options is None and "stream_options" not in data and body[:1] == b"{":
        return Prepared(b"{" + INCLUDE_USAGE + body[1:], model, True)
    data["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    try:  # re-written whole (an integer beyond 64 bits would turn float: no parameter is one)
        return Prepared(orjson.dumps(data), model, True)
    except orjson.JSONEncodeError:  # what orjson cannot write (an integer over 64 bits)
        return Prepared(body, model, False)


class Meter:
    """What one metered request's answer used: pass each piece of the answer through
    `observe` (which returns what the client gets of it), then read `usage()`.

    A JSON answer keeps its first and last USAGE_WINDOW bytes (`usage` is at the end in
    OpenAI's answers, but a JSON object has no field order). An answer compressed though edge
    asked for none (`Content-Encoding: gzip` or `deflate`) is inflated on the side, for the
    meter only; the client gets the bytes as they came, and a stream's usage chunk is then
    left in (edge cannot take it out of compressed bytes)."""

    __slots__ = (
        "_events", "_head", "_inflate", "_tail", "bytes", "model", "request_bytes", "status",
        "strip",
    )  # fmt: skip

    def __init__(self, model: str | None, request_bytes: int, strip: bool) -> None:
        self.model = model
        self.request_bytes = request_bytes
        self.strip = strip
        self.status = 0
        self.bytes = 0  # of the answer, decoded
        self._events: EventScanner | None = None
        self._inflate: Any = None  # a zlib decompressor, for a compressed answer
        self._head = b""
        self._tail = b""

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The answer's head: a stream is read event by event, anything else by its ends."""
        self.status = status
        stream = False
        for name, value in headers:
            name = name.lower()
            if name == b"content-type":
                stream = value.lower().startswith(b"text/event-stream")
            elif name == b"content-encoding":
                coding = value.strip().lower()
                if coding in INFLATED:
                    self._inflate = zlib.decompressobj(INFLATE_ANY)
                    self.strip = False
                elif coding != b"identity":
                    self._inflate = UNREADABLE
                    self.strip = False
        if stream:
            self._events = EventScanner(self.strip)

    @property
    def changes_bytes(self) -> bool:
        """Whether what the client gets may differ from the upstream's bytes (its length too)."""
        return self._events is not None and self.strip

    def observe(self, data: bytes) -> bytes:
        if self._inflate is None:
            return self._read(data)
        self._read_inflated(data)
        return data  # a compressed answer is never changed

    def _read(self, data: bytes) -> bytes:
        if self._events is not None:
            out = self._events.feed(data)
            self.bytes = self._events.bytes
            return out
        self.bytes += len(data)
        if len(self._head) < USAGE_WINDOW:
            self._head += data[: USAGE_WINDOW - len(self._head)]
        tail = self._tail + data
        self._tail = tail[-USAGE_WINDOW:] if len(tail) > USAGE_WINDOW else tail
        return data

    def _read_inflated(self, data: bytes) -> None:
        """Read `data` inflated, in bounded pieces (a small answer may inflate to a large one,
        and the meter keeps only the ends of it)."""
        inflate = self._inflate
        if inflate is UNREADABLE:
            self._read(data)  # counted, for the estimate
            return
        try:
            piece = inflate.decompress(data, INFLATE_PIECE)
            while piece:
                self._read(piece)
                piece = inflate.decompress(inflate.unconsumed_tail, INFLATE_PIECE)
        except zlib.error:
            self._inflate = UNREADABLE  # not what it said it was: estimated from the bytes
            self._read(data)

    def end(self) -> bytes:
        """The answer is over: the rest of what was held back, if anything."""
        if self._inflate is not None:
            if self._events is not None:
                self._events.end()
            return b""
        return self._events.end() if self._events is not None else b""

    def usage(self) -> Usage:
        """Reported if the answer said; none for an error status; else estimated from bytes."""
        found: Usage | None = None
        if self._events is not None:
            found = self._events.usage
        elif self._tail:
            found = in_json_tail(self._tail)
            if found is None and self.bytes > len(self._tail):
                found = in_json_tail(self._head)
        if found is not None:
            return found
        if self.status >= 400:
            return NO_USAGE
        return estimate(self.request_bytes, self.bytes)
