"""edge/proxy/usage.py and edge/proxy/metering.py: reading the usage an answer reports, taking
the usage-only chunk out of a stream, preparing a metered request, and pricing it exactly.
Pure, no I/O."""

from __future__ import annotations

import gzip
import json
import zlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.proxy.metering import Meter, Pricing, prepare
from edge.proxy.policy import top_object
from edge.proxy.usage import EventScanner, Usage, estimate, from_object, in_event, in_json_tail
from edge.settings import ModelPrice, PricingSettings


def chunk(**fields: object) -> bytes:
    return b"data: " + orjson.dumps(fields) + b"\n\n"


USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 30,
    "prompt_tokens_details": {"cached_tokens": 4},
}
STREAM = (
    chunk(id="c", choices=[{"index": 0, "delta": {"content": "hi"}}], usage=None)
    + chunk(id="c", choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}], usage=None)
    + chunk(id="c", choices=[], usage=USAGE)
    + b"data: [DONE]\n\n"
)


@pytest.mark.parametrize(
    ("obj", "usage"),
    [
        (USAGE, Usage(12, 30, 4)),
        ({"prompt_tokens": 7, "total_tokens": 7}, Usage(7, 0)),  # embeddings
        ({"input_tokens": 5, "output_tokens": 9, "input_tokens_details": {"cached_tokens": 9}},
         Usage(5, 9, 5)),  # responses; cached never more than the input
        ({"prompt_tokens": -1, "completion_tokens": 3}, None),
        ({"prompt_tokens": True, "completion_tokens": 3}, None),
        ({"prompt_tokens": 10**10, "completion_tokens": 3}, None),
        (None, None),
    ],
)  # fmt: skip
def test_usage_objects_of_every_shape(obj: object, usage: Usage | None) -> None:
    assert from_object(obj) == usage


def test_the_usage_at_the_end_of_a_json_answer_with_or_without_spaces() -> None:
    body = orjson.dumps({"id": "x", "choices": [], "usage": USAGE, "system_fingerprint": "f"})
    assert in_json_tail(body[-200:]) == Usage(12, 30, 4)
    spaced = b'{"choices" : [], "usage" : { "prompt_tokens" : 3 , "completion_tokens" : 4 } }'
    assert in_json_tail(spaced) == Usage(3, 4)
    assert in_json_tail(b'{"usage": {"prompt_tokens": 3, "compl') is None  # cut
    assert in_json_tail(b'{"text": "no usage here"}') is None


def test_a_stream_passes_untouched_when_the_client_asked_for_usage() -> None:
    scanner = EventScanner(strip=False)
    out = b"".join(scanner.feed(STREAM[i : i + 7]) for i in range(0, len(STREAM), 7))
    assert out == STREAM and scanner.usage == Usage(12, 30, 4) and scanner.end() == b""


@pytest.mark.parametrize("size", [1, 5, 64, 10_000])
def test_the_usage_only_chunk_is_taken_out_whatever_the_reads(size: int) -> None:
    scanner = EventScanner(strip=True)
    out = b"".join(scanner.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size))
    out += scanner.end()
    assert b'"choices":[]' not in out and out.endswith(b"data: [DONE]\n\n")
    assert out.count(b"data: ") == 3 and scanner.usage == Usage(12, 30, 4)
    assert scanner.bytes == len(STREAM)


def test_a_spaced_usage_chunk_is_read_and_taken_out_too() -> None:
    spaced = (
        b'data: {"id": "c", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}'
        b"\r\n\r\n"
    )
    scanner = EventScanner(strip=True)
    assert scanner.feed(spaced + b"data: [DONE]\r\n\r\n") == b"data: [DONE]\r\n\r\n"
    assert scanner.usage == Usage(2, 3)


def test_the_responses_api_reports_in_its_completed_event() -> None:
    done = {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": 4, "output_tokens": 6}},
    }
    event = b"event: response.completed\ndata: " + orjson.dumps(done) + b"\n\n"
    assert in_event(event) == (Usage(4, 6), False)  # never taken out: it is the answer's end


def test_an_estimate_is_a_quarter_of_the_bytes_rounded_up() -> None:
    assert estimate(9, 400) == Usage(3, 100, 0, reported=False)
    meter = Meter("m", request_bytes=10, strip=False)
    meter.start(200, [(b"content-type", b"application/json")])
    meter.observe(b'{"no": "usage"}')
    assert meter.usage() == Usage(3, 4, reported=False)
    failed = Meter("m", 10, False)
    failed.start(500, [])
    failed.observe(b'{"error": {}}')
    assert failed.usage() == Usage(0, 0)  # an error status costs no tokens


def test_prepare_asks_for_usage_only_for_a_stream_that_did_not() -> None:
    plain = b'{"model": "m", "stream": true, "messages": []}'
    added = prepare(plain, "chat/completions", inject=True)
    assert added.strip and added.model == "m"
    assert added.body == b'{"stream_options":{"include_usage":true},' + plain[1:]
    assert orjson.loads(added.body)["messages"] == []
    other = b'{"model": "m", "stream": true, "stream_options": {"x": 1}}'
    merged = prepare(other, "completions", inject=True)
    assert orjson.loads(merged.body)["stream_options"] == {"x": 1, "include_usage": True}
    asked = b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'
    for body, route, inject in (
        (asked, "chat/completions", True),  # the client asked: its usage chunk is its own
        (plain, "chat/completions", False),  # metering.stream_usage = "client"
        (plain, "embeddings", True),
        (b'{"model": "m"}', "chat/completions", True),
        (b"not json", "chat/completions", True),
    ):
        kept = prepare(body, route, inject)
        assert kept.body == body and not kept.strip


def test_prices_match_first_and_costs_are_exact_integers() -> None:
    pricing = Pricing(
        PricingSettings(
            models=(
                ModelPrice(match="gpt-4o-mini*", input=150, output=600, cached_input=75),
                ModelPrice(match="gpt-4o*", input=2500, output=10000),
            )
        )
    )
    mini = pricing.price("gpt-4o-mini-2024-07-18")
    assert mini is not None and mini.input == 150
    assert pricing.price("gpt-4o") is not None and pricing.price("o1") is None
    assert pricing.price(None) is None  # no catch-all: an unread model has no token price
    usage = Usage(1000, 500, cached=400)
    assert pricing.cost_micros(mini, usage) == 600 * 150 + 400 * 75 + 500 * 600
    big = pricing.price("gpt-4o")
    assert pricing.cost_micros(big, usage) == 1000 * 2500 + 500 * 10000  # cached: input price
    assert pricing.cost_micros(None, usage) == 0


def test_an_unread_model_is_priced_by_the_catch_all_only() -> None:
    catch_all = ModelPrice(match="*", input=1, output=2)
    pricing = Pricing(
        PricingSettings(models=(ModelPrice(match="a*", input=5, output=5), catch_all))
    )
    assert pricing.price(None) is catch_all and pricing.price("b") is catch_all


def test_the_last_usage_report_of_a_stream_counts() -> None:
    """vLLM's continuous usage stats: the running usage on every chunk, the last one whole."""
    running = b"".join(
        chunk(choices=[{"index": 0, "delta": {"content": "w"}}], usage={
            "prompt_tokens": 10, "completion_tokens": i})
        for i in range(1, 4)
    )  # fmt: skip
    final = chunk(choices=[], usage={"prompt_tokens": 10, "completion_tokens": 4})
    scanner = EventScanner(strip=True)
    out = scanner.feed(running) + scanner.feed(final + b"data: [DONE]\n\n") + scanner.end()
    assert scanner.usage == Usage(10, 4)
    assert out == running + b"data: [DONE]\n\n"  # only the usage-only chunk taken out


@pytest.mark.parametrize("kind", ["response.completed", "response.incomplete", "response.failed"])
def test_a_responses_stream_reports_however_it_ended(kind: str) -> None:
    usage = {"input_tokens": 3, "output_tokens": 8}
    event = b"event: %s\ndata: %s\n\n" % (
        kind.encode(),
        orjson.dumps({"type": kind, "response": {"status": "x", "usage": usage}}),
    )
    assert in_event(event) == (Usage(3, 8), False)


def json_answer(usage_first: bool, filler: int) -> bytes:
    usage = {"prompt_tokens": 40, "total_tokens": 40}
    data = [{"embedding": [0.5] * filler}]
    fields = {"usage": usage, "data": data} if usage_first else {"data": data, "usage": usage}
    return orjson.dumps({"object": "list", **fields})


@pytest.mark.parametrize("usage_first", [True, False])
def test_a_json_answer_s_usage_is_found_at_either_end(usage_first: bool) -> None:
    answer = json_answer(usage_first, 20_000)
    assert len(answer) > 4 * 16 * 1024
    meter = Meter("m", 10, strip=False)
    meter.start(200, [(b"content-type", b"application/json")])
    assert (
        b"".join(meter.observe(answer[i : i + 1000]) for i in range(0, len(answer), 1000)) == answer
    )
    assert meter.usage() == Usage(40, 0)


@pytest.mark.parametrize("coding", [b"gzip", b"deflate"])
def test_a_compressed_answer_is_read_inflated_and_relayed_as_it_came(coding: bytes) -> None:
    answer = json_answer(False, 50_000)
    packed = gzip.compress(answer) if coding == b"gzip" else zlib.compress(answer)
    meter = Meter("m", 10, strip=True)
    meter.start(200, [(b"content-type", b"application/json"), (b"content-encoding", coding)])
    out = b"".join(meter.observe(packed[i : i + 700]) for i in range(0, len(packed), 700))
    assert out + meter.end() == packed
    assert meter.usage() == Usage(40, 0)


def test_an_unreadable_encoding_is_estimated_from_its_bytes() -> None:
    meter = Meter("m", 40, strip=True)
    meter.start(200, [(b"content-type", b"text/event-stream"), (b"content-encoding", b"br")])
    assert not meter.changes_bytes  # edge cannot take a chunk out of compressed bytes
    assert meter.observe(b"\x8b\x00garbled") == b"\x8b\x00garbled"
    assert meter.usage() == estimate(40, 9)
    liar = Meter("m", 0, strip=False)  # says gzip, is not
    liar.start(200, [(b"content-encoding", b"gzip")])
    assert liar.observe(b"plain text") == b"plain text"
    assert liar.usage() == estimate(0, 10)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "tiny", "MODEL": "dear"}',
        b'{"model": "tiny", "model": "dear"}',
        b'{"mod\\u0065l": "dear", "model": "tiny"}',
    ],
)
def test_a_body_with_two_models_is_unusable_for_a_metered_key(body: bytes) -> None:
    prepared = prepare(body, "responses", inject=True)
    assert prepared.problem is not None and "model" in prepared.problem


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["model", "MODEL", "Model", "stream", "input", "x"]),
        st.one_of(st.text(max_size=8), st.booleans(), st.integers(), st.none()),
        max_size=4,
    ),
    st.sampled_from(["model", "MODEL", "mod\\u0065l", "x"]),
    st.booleans(),
)
def test_top_object_tells_every_duplicate_model_fast_or_slow(
    fields: dict[str, object], extra: str, spaced: bool
) -> None:
    """The orjson fast path and the pair-by-pair path agree: whatever the spelling, two
    candidate fields are always told."""
    sep = ", " if spaced else ","
    pairs = [json.dumps(k) + ":" + json.dumps(v) for k, v in fields.items()]
    pairs.append(f'"{extra}":"other"')
    body = ("{" + sep.join(pairs) + "}").encode()
    names = [k.casefold() for k in fields] + [extra.replace("\\u0065", "e").casefold()]
    data, duplicate = top_object(body)
    assert data is not None
    assert duplicate == (names.count("model") > 1)
