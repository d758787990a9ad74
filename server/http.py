"""The HTTP side: GET /metrics (Prometheus) and POST /alerts (Alertmanager webhook).

The webhook's handling lives in the runtime (it decides what an alert means); this
module only speaks HTTP: bearer token, size limit, JSON."""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .auth import check_bearer

log = logging.getLogger("transplant.http")
MAX_BODY = 1 << 20


class HttpServer:
    def __init__(self, listen: str, registry, token: str,
                 on_alert: Callable[[dict], tuple[int, dict]] | None = None):
        host, _, port = listen.rpartition(":")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):
                log.debug("%s " + fmt, self.address_string(), *args)

            def _reply(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, code: int, doc: dict) -> None:
                self._reply(code, (json.dumps(doc) + "\n").encode())

            def do_GET(self):
                if self.path.split("?")[0] == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    self._json(200, {"ok": True})
                else:
                    self._json(404, {"error": "not found; try /metrics"})

            def do_POST(self):
                if self.path.split("?")[0] != "/alerts":
                    return self._json(404, {"error": "not found; POST /alerts takes Alertmanager webhooks"})
                verdict = check_bearer(self.headers.get("Authorization"), token)
                if verdict is not None:
                    return self._json(401, {"error": f"bearer token {verdict}"})
                length = int(self.headers.get("Content-Length") or 0)
                if length <= 0 or length > MAX_BODY:
                    return self._json(400, {"error": f"body must be 1..{MAX_BODY} bytes of JSON"})
                try:
                    doc = json.loads(self.rfile.read(length))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    return self._json(400, {"error": f"body is not JSON: {e}"})
                if outer.on_alert is None:
                    return self._json(200, {"handled": False, "reason": "alert handling is not configured"})
                code, reply = outer.on_alert(doc)
                self._json(code, reply)

        self.on_alert = on_alert
        self._srv = ThreadingHTTPServer((host, int(port)), Handler)
        self._srv.daemon_threads = True
        self.port = self._srv.server_address[1]
        self._thread = threading.Thread(target=self._srv.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()
