"""A TCP proxy a test owns, between one replica and etcd, to cut that replica alone.

Modes (set `mode`; connections follow at once):
  pass            bytes flow both ways
  blackhole       a partition: nothing flows either way (connections stay open, hang)
  lose_txn_reply  the reply to the next etcd transaction is lost (etcd applies it;
                  the replica never hears back), then pass again
  mute_after_txn  from the next transaction on, every reply is lost (requests still
                  reach etcd) until the mode is set again
"""
from __future__ import annotations

import socket
import threading


class Proxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        self.target = (host, target_port)
        self.mode = "pass"
        self.txns = 0                               # transactions seen
        self._srv = socket.create_server((host, 0))
        self.port = self._srv.getsockname()[1]
        self.endpoint = f"etcd://{host}:{self.port}"
        self._lock = threading.Lock()
        self._conns: list[dict] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, mode: str) -> None:
        assert mode in ("pass", "blackhole", "lose_txn_reply", "mute_after_txn"), mode
        with self._lock:
            self.mode = mode
            if mode == "pass":
                for c in self._conns:
                    c["muted"] = False

    def close(self) -> None:
        self._closed = True
        self._srv.close()
        with self._lock:
            for c in self._conns:
                for s in (c["client"], c["server"]):
                    try:
                        s.close()
                    except OSError:          # already closed by its pump: nothing to free
                        pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            c = {"client": client, "server": server, "muted": False}
            with self._lock:
                self._conns.append(c)
            threading.Thread(target=self._pump, args=(c, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(c, False), daemon=True).start()

    def _pump(self, c: dict, upstream: bool) -> None:
        src, dst = (c["client"], c["server"]) if upstream else (c["server"], c["client"])
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    mode = self.mode
                    if upstream and b"/v3/kv/txn" in data:
                        self.txns += 1
                        if mode == "lose_txn_reply":
                            c["muted"], self.mode = True, "pass"     # this reply only
                        elif mode == "mute_after_txn":
                            c["muted"], self.mode = True, "mute_all"
                    if mode == "mute_all" and not upstream:
                        c["muted"] = True
                    drop = mode == "blackhole" or (not upstream and c["muted"])
                if not drop:
                    dst.sendall(data)
        except OSError:                      # either side hung up: this connection is over
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:              # not connected any more: nothing to shut down
                    pass
