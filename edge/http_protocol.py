"""edge's HTTP/1.1 server protocol: uvicorn's httptools protocol, speaking edge's JSON.

uvicorn answers a request it cannot parse (Content-Length with chunked, a bad chunk, an
obs-folded header: the request-smuggling probes) with a text/plain 400 of its own. Every answer
edge gives is JSON (DESIGN §5), so this subclass renders that 400 in OpenAI's error shape; the
connection still closes after it, and nothing reaches the app or the upstream.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edge.errors import BadRequest

INVALID_REQUEST = BadRequest("Invalid HTTP request received.", code="invalid_http_request")


class EdgeHttpToolsProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        body = INVALID_REQUEST.body()
        content = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()
