"""A small etcd v3 client over etcd's JSON gateway (`POST /v3/kv/range`, `/v3/kv/txn`,
`/v3/watch`, `/v3/lease/*`; keys and values base64), standard library only.

Why not a client library: the PyPI `etcd3` package (0.12, 2020) needs pure-Python
protobuf under protobuf >= 4, which would slow every gRPC message of the server. The
gateway is part of every etcd since 3.3 and speaks the same API as gRPC clients.

Every failure to reach etcd (refused, timed out, a 5xx, a reply that is not JSON) is
`Unavailable`, naming the endpoint, so callers can tell "etcd is down" from "etcd
said no" (a failed transaction is a normal result, not an exception)."""
from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
from dataclasses import dataclass
from typing import Iterator

from ..config import parse_endpoint, parse_endpoints  # noqa: F401 - what an endpoint list may be


class Unavailable(Exception):
    """etcd cannot be reached (or answered with a server error). `sent`: the request went
    out and no reply came back, so etcd may have applied it."""

    def __init__(self, message: str, sent: bool = False):
        super().__init__(message)
        self.sent = sent


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0

    def json(self):
        return json.loads(self.value)


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _kv(d: dict) -> KV:
    return KV(base64.b64decode(d["key"]).decode(), base64.b64decode(d.get("value", "")),
              int(d.get("mod_revision", 0)), int(d.get("create_revision", 0)), int(d.get("lease", 0)))


def prefix_end(prefix: str) -> str:
    """The range_end that selects every key starting with `prefix`."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return bytes(b).decode()


# ---- compare/op builders for txn ----------------------------------------------------------

def value_is(key: str, value: str | bytes) -> dict:
    return {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}


def absent(key: str) -> dict:
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def put(key: str, value: str | bytes, lease: int = 0) -> dict:
    req = {"key": _b64(key), "value": _b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"requestPut": req}


def get(key: str) -> dict:
    return {"requestRange": {"key": _b64(key)}}


class Etcd:
    """The v3 JSON gateway of one etcd cluster, through any of its members: a request that
    cannot reach one member goes to the next (each member forwards writes to the leader,
    so a cluster that keeps quorum stays writable with members down)."""

    def __init__(self, endpoint: str, timeout: float = 5.0):
        self.endpoint = endpoint                 # as configured: one member, or several
        self.members = parse_endpoints(endpoint)
        self.timeout = timeout
        self._at = 0                             # the member requests go to first (the last that answered)
        self._local = threading.local()          # one keep-alive connection per thread (and member)

    def __repr__(self) -> str:
        return f"Etcd({self.endpoint})"

    @property
    def host(self) -> str:
        return self.members[self._at][0]

    @property
    def port(self) -> int:
        return self.members[self._at][1]

    # ---- transport -----------------------------------------------------------------------

    def _conn(self, i: int) -> http.client.HTTPConnection:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        c = conns.get(i)
        if c is None:
            host, port = self.members[i]
            c = conns[i] = http.client.HTTPConnection(host, port, timeout=self.timeout)
        return c

    def _drop(self, i: int) -> None:
        c = getattr(self._local, "conns", {}).pop(i, None)
        if c is not None:
            c.close()

    def _where(self, i: int) -> str:
        host, port = self.members[i]
        return f"etcd at {self.endpoint}" if len(self.members) == 1 else f"etcd member {host}:{port} of {self.endpoint}"

    def call(self, path: str, body: dict) -> dict:
        """POST to the member that answered last, then to the others in turn; Unavailable
        (sent: if any member may have applied it) when none answers."""
        data = json.dumps(body).encode()
        sent, errors = False, []
        start = self._at
        for step in range(len(self.members)):
            i = (start + step) % len(self.members)
            try:
                r, raw = self._post(i, path, data)
            except Unavailable as e:
                sent = sent or e.sent
                errors.append(str(e))
                continue
            if r.status >= 500 and len(self.members) > 1:        # this member cannot serve it (no leader)
                sent = True
                errors.append(f"{self._where(i)} answered HTTP {r.status}")
                continue
            self._at = i
            return self._doc(i, path, r, raw)
        msg = errors[0] if len(errors) == 1 else "no member answered: " + "; ".join(errors)
        raise Unavailable(msg, sent=sent)

    def _post(self, i: int, path: str, data: bytes):
        sent = False
        for attempt in (0, 1):                   # a kept-alive connection the server closed: once more
            try:
                c = self._conn(i)
                c.request("POST", path, data, {"Content-Type": "application/json"})
                sent = True
                r = c.getresponse()
                return r, r.read()
            except (OSError, http.client.HTTPException) as e:
                self._drop(i)
                if attempt == 0 and isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError,
                                                   ConnectionResetError)):
                    continue
                raise Unavailable(f"{self._where(i)} is unreachable: {e or type(e).__name__}", sent=sent) from None

    def _doc(self, i: int, path: str, r, raw: bytes) -> dict:
        try:
            doc = json.loads(raw)
        except ValueError:
            raise Unavailable(f"{self._where(i)} answered {path} with HTTP {r.status} and no JSON", sent=True) from None
        if r.status >= 500 or (r.status >= 400 and "error" in doc):
            msg = doc.get("message") or doc.get("error") or raw[:200]
            if r.status >= 500 or "unavailable" in str(msg).lower():   # (a timeout inside etcd: maybe applied)
                raise Unavailable(f"{self._where(i)}: {msg}", sent=True)
            raise ValueError(f"{self._where(i)} refused {path}: {msg}")
        return doc

    # ---- kv --------------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        kvs = self.call("/v3/kv/range", {"key": _b64(key)}).get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def range(self, start: str, end: str | None = None, prefix: bool = False) -> tuple[list[KV], int]:
        """Keys in [start, end) (or with the prefix `start`), sorted by key; and the store revision."""
        body = {"key": _b64(start), "range_end": _b64(prefix_end(start) if prefix else end or "\0")}
        doc = self.call("/v3/kv/range", body)
        return [_kv(d) for d in doc.get("kvs", [])], int(doc["header"]["revision"])

    def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("/v3/kv/put", body)["header"]["revision"])

    def txn(self, compare: list[dict], success: list[dict], failure: list[dict] = ()) -> tuple[bool, list[dict]]:
        """All compares hold: the success ops run, else the failure ops; one atomic step.
        Returns (succeeded, responses), range responses as lists of KV."""
        doc = self.call("/v3/kv/txn", {"compare": compare, "success": success, "failure": list(failure)})
        out = []
        for r in doc.get("responses", []):
            rr = r.get("response_range")
            out.append([_kv(d) for d in rr.get("kvs", [])] if rr is not None else r)
        return bool(doc.get("succeeded")), out

    # ---- leases ----------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return int(self.call("/v3/lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive(self, lease: int) -> int:
        """Refresh a lease; its remaining TTL, 0 when it has expired."""
        try:
            doc = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        except ValueError as e:            # "requested lease not found": expired while we were cut off
            if "lease not found" in str(e):
                return 0
            raise
        return int(doc.get("result", {}).get("TTL", 0))

    def time_to_live(self, lease: int) -> tuple[int, int]:
        """A lease's (remaining, granted) TTL in seconds; remaining -1 once it has expired."""
        doc = self.call("/v3/lease/timetolive", {"ID": str(lease)})
        return int(doc.get("TTL", -1)), int(doc.get("grantedTTL", 0))

    def revoke(self, lease: int) -> None:
        self.call("/v3/lease/revoke", {"ID": str(lease)})

    # ---- watch -----------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int, stop: threading.Event, idle: float = 1.0) -> Iterator[list[KV]]:
        """Yield batches of changed keys under `prefix` from `start_revision` on, until `stop`
        is set; Unavailable when the stream breaks (the caller resumes from the last
        revision it saw). An empty batch every `idle` seconds without events, so the
        caller can look at `stop` and timers. (A raw socket: http.client's response
        cannot be read again after a read timed out.)"""
        body = json.dumps({"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                              "start_revision": str(start_revision)}}).encode()
        sock = None
        for step in range(len(self.members)):    # the member that answered last, then the others
            i = (self._at + step) % len(self.members)
            try:
                sock = socket.create_connection(self.members[i], timeout=self.timeout)
                self._at = i
                break
            except OSError as e:
                err = e
        if sock is None:
            raise Unavailable(f"etcd at {self.endpoint} is unreachable: {err}") from None
        head = (f"POST /v3/watch HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            sock.sendall(head + body)
            sock.settimeout(idle)
            stream = _Chunked()
            header = b""
            while not stop.is_set():
                try:
                    data = sock.recv(65536)
                except (socket.timeout, TimeoutError):
                    yield []
                    continue
                if not data:
                    raise Unavailable(f"etcd at {self.endpoint} closed the watch")
                if stream is not None and header is not None:
                    header += data
                    if b"\r\n\r\n" not in header:
                        continue
                    header, data = header.split(b"\r\n\r\n", 1)
                    status = header.split(b"\r\n", 1)[0]
                    if b" 200 " not in status + b" ":
                        raise Unavailable(f"etcd at {self.endpoint} refused the watch: {status.decode(errors='replace')}")
                    header = None
                for line in stream.feed(data):
                    doc = json.loads(line)
                    if "error" in doc:
                        raise Unavailable(f"the watch on etcd at {self.endpoint} failed: {doc['error']}")
                    res = doc.get("result", {})
                    if res.get("canceled"):
                        raise Unavailable(f"etcd at {self.endpoint} cancelled the watch: "
                                          f"{res.get('cancel_reason') or 'compacted'}")
                    events = [_kv(e["kv"]) for e in res.get("events", [])]
                    if events:
                        yield events
        except OSError as e:
            raise Unavailable(f"the watch on etcd at {self.endpoint} broke: {e}") from None
        finally:
            sock.close()


class _Chunked:
    """Decodes an HTTP/1.1 chunked body fed in pieces into its newline-ended lines."""

    def __init__(self):
        self.raw = b""
        self.body = b""

    def feed(self, data: bytes) -> list[bytes]:
        self.raw += data
        while True:
            nl = self.raw.find(b"\r\n")
            if nl < 0:
                break
            size = int(self.raw[:nl].split(b";")[0] or b"0", 16)
            if len(self.raw) < nl + 2 + size + 2:
                break
            self.body += self.raw[nl + 2:nl + 2 + size]
            self.raw = self.raw[nl + 2 + size + 2:]
        lines = self.body.split(b"\n")
        self.body = lines.pop()
        return [ln for ln in lines if ln.strip()]
