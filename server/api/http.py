"""The HTTP side: GET /metrics (Prometheus), POST /alerts (Alertmanager webhook) and the
OpenAI-compatible API under /v1 (server/api/openai.py).

This module only speaks HTTP: routing, bearer tokens, size limits, JSON, keep-alive
(HTTP/1.1) and server-sent events (chunked). What an alert means is the runtime's;
what a /v1 call means is the API's."""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..auth import check_bearer
from .errors import openai_error

log = logging.getLogger("transplant.http")
MAX_BODY = 1 << 20
DRAIN_LIMIT = 64 * MAX_BODY    # a larger body is refused without reading it (the connection closes)
API_ROUTES = {"/v1/completions": False, "/v1/chat/completions": True}


class _Server(ThreadingHTTPServer):
    daemon_threads = True              # SO_REUSEADDR (the default) only skips TIME_WAIT; a taken port still fails
    request_queue_size = 1024          # socketserver's 5: a burst of new connections past it waits ~1 s for a SYN retry

    def handle_error(self, request, client_address) -> None:
        """A client that hung up is not an error; anything else goes to the log, not stderr."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("client %s went away: %s", client_address, exc)
        else:
            log.exception("HTTP request from %s failed", client_address)


class HttpServer:
    def __init__(self, listen: str, registry, token: str,
                 on_alert: Callable[[dict], tuple[int, dict]] | None = None, api=None,
                 inference_key: str | None = None, count: Callable[[str, int, float], None] | None = None,
                 serving: Callable[[], bool] | None = None, fleet_state: Callable[[], dict | None] | None = None):
        host, _, port = listen.rpartition(":")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"          # keep-alive: clients reuse connections
            disable_nagle_algorithm = True         # else each small reply waits ~40 ms for the client's ACK

            def log_message(self, fmt, *args):
                log.debug("%s " + fmt, self.address_string(), *args)

            def _reply(self, code: int, body: bytes, ctype: str = "application/json", headers=None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def _json(self, code: int, doc: dict, headers=None) -> None:
                self._reply(code, (json.dumps(doc) + "\n").encode(), headers=headers)

            def _body(self, api: bool):
                """The JSON body, or None after replying with why not (errors in the
                API's shape on /v1, plain ones elsewhere)."""
                def fail(code, msg):
                    self.close_connection = True           # an unread body must not become the next request
                    if api:
                        self._json(code, openai_error(code, msg))
                    else:
                        self._json(code, {"error": msg})
                    return None

                if self.headers.get("Transfer-Encoding"):
                    return fail(411, "send the body with a Content-Length")
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    return fail(400, "Content-Length is not a number")
                if length > MAX_BODY:
                    if length <= DRAIN_LIMIT:        # read it away, so the client sees the reply, not a reset
                        while length > 0:
                            length -= len(self.rfile.read(min(length, 1 << 16))) or length
                    return fail(413, f"the body has {int(self.headers.get('Content-Length'))} bytes; "
                                     f"the limit is {MAX_BODY}")
                if length <= 0:
                    return fail(400, f"the body must be 1..{MAX_BODY} bytes of JSON")
                try:
                    return json.loads(self.rfile.read(length))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    if api:
                        self._json(400, openai_error(400, f"the body is not valid JSON: {e}"))
                    else:
                        self._json(400, {"error": f"body is not JSON: {e}"})
                    return None

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":        # liveness of the HTTP listener itself
                    self._json(200, {"ok": True})
                elif path == "/health":         # readiness, for a load balancer: 503 unless SERVING
                    ok = outer.serving()
                    self._json(200 if ok else 503, {"status": "SERVING" if ok else "NOT_SERVING"})
                elif path == "/version":
                    self._api(lambda body: outer.api.version(), path, False)
                elif path == "/fleet/state" and outer.fleet_state() is not None:   # peers ask (generation ids only)
                    self._json(200, outer.fleet_state())
                elif path == "/v1/models" or path.startswith("/v1/models/"):
                    self._api(lambda body: outer.api.models(path[len("/v1/models/"):] or None), path, False)
                else:
                    self._json(404, {"error": "not found; try /metrics, /health or /v1/models"})

            def do_POST(self):
                path = self.path.split("?")[0]
                if path in API_ROUTES:
                    return self._api(lambda body: outer.api.create(body, API_ROUTES[path], self._timeout()), path,
                                     True)
                if path in ("/tokenize", "/detokenize"):          # vLLM's server has them: same shapes
                    return self._api(lambda body: getattr(outer.api, path[1:])(body), path, True)
                if path != "/alerts":
                    return self._json(404, {"error": f"not found: POST {path}; POST /alerts takes Alertmanager "
                                                     "webhooks, POST /v1/completions and /v1/chat/completions "
                                                     "generate"})
                verdict = check_bearer(self.headers.get("Authorization"), token)
                if verdict is not None:
                    self.close_connection = True
                    return self._json(401, {"error": f"bearer token {verdict}"})
                doc = self._body(api=False)
                if doc is None:
                    return
                if outer.on_alert is None:
                    return self._json(200, {"handled": False, "reason": "alert handling is not configured"})
                code, reply = outer.on_alert(doc)
                self._json(code, reply)

            def _timeout(self) -> float | None:
                v = self.headers.get("x-request-timeout")
                try:
                    return float(v) if v and 0 < float(v) < 86400 else None
                except ValueError:
                    return None

            def _api(self, call, route: str, with_body: bool) -> None:
                from .openai import ApiError, check_key, error_reply

                t0 = time.perf_counter()
                if outer.api is None:
                    return self._json(404, openai_error(404, "the OpenAI-compatible API is not enabled here"))
                body = None
                if with_body:
                    body = self._body(api=True)
                    if body is None:
                        return outer.count(route, 400, time.perf_counter() - t0)
                try:
                    check_key(self.headers, outer.inference_key, check_bearer)
                    reply = call(body)
                except (ApiError, Exception) as e:   # noqa: BLE001 - the one place errors become statuses
                    if not isinstance(e, ApiError) and error_reply(e).status == 500:
                        log.exception("%s failed", route)
                    reply = error_reply(e)
                if reply.stream is None:
                    self._json(reply.status, reply.body, reply.headers)
                else:
                    self._events(reply)
                outer.count(route, reply.status, time.perf_counter() - t0)

            def _events(self, reply) -> None:
                """Server-sent events, one HTTP chunk each; a client that leaves closes
                the generator, which cancels what it still had running."""
                self.send_response(reply.status)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                for k, v in (reply.headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    for data in reply.stream:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                finally:
                    reply.stream.close()

        self.on_alert = on_alert
        self.serving = serving or (lambda: True)
        self.fleet_state = fleet_state or (lambda: None)
        self.api = api
        self.inference_key = inference_key
        self.count = count or (lambda route, status, seconds: None)
        self._srv = _Server((host, int(port)), Handler)
        self.port = self._srv.server_address[1]
        self._thread = threading.Thread(target=self._srv.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()
