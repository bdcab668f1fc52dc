"""The upstream HTTP/1.1 client: a keep-alive connection pool to the one provider origin
(`pool.py`) of connections (`connection.py`) on asyncio's Protocol and httptools' response
parser (the C parser uvicorn already uses), each answer a `response.Response`; its failures in
`errors.py`.

Why hand-written: under load, aiohttp's `ClientSession` took 43.6 % of edge's CPU samples
(`benchmarks/profile_edge.py`, 32 connections): per request it builds a `ClientRequest`, a
`CIMultiDict` of headers, a payload object, a `ClientResponse` with its `StreamReader`, trace
hooks and timers, for features edge turns off (cookies, redirects, decompression, proxies,
auto headers). edge needs one origin, bytes in and bytes out. This client writes the request
head as one bytes join, feeds the answer to httptools, and hands body pieces over as they
arrive; docs/performance.md says what it bought.

Semantics kept from the aiohttp version (tests/test_upstream_faults_e2e.py holds them):
- a request the upstream provably never received (connect refused or timed out, no pool slot
  in time) raises with `never_sent`, so its credit is refunded;
- only an idempotent request is sent again, once, and only when a reused keep-alive
  connection was found closed before any byte of an answer (RFC 9112 §9.3.1); a POST never is;
- a body without length framing ends when the connection does: a clean close ends it, a reset
  cuts it (`read()` raises), as does any close mid-way through a framed body;
- a connection goes back to the pool only when both directions are complete: the whole request
  body was written and the whole answer read. An upstream that answers before taking the whole
  body ends the upload, and its connection is closed after the answer: were it reused, the next
  request would be read as the rest of the abandoned body (a cross-tenant leak);
- what is not an HTTP/1.1 answer edge can relay is a `BadResponse` (502): a head over
  `max_head_bytes` or `max_head_fields`, a status outside 200-599 (1xx other than 100 and 103,
  which precede the answer), a transfer coding other than plain chunked (as nginx refuses it:
  edge re-frames answers, so it could not pass such a coding on faithfully);
- `connect_timeout` bounds the wait for a pool slot plus the TCP/TLS connect; `read_timeout`
  bounds each silence of the upstream (before its headers, between two body pieces), not the
  whole exchange, so a stream may last as long as it keeps sending.
"""
