"""Runs inside vLLM's worker process (`worker_extension_cls`): reads a swap's tensors by
path (the tensor store's objects, the checkpoint's own files; only what neither holds
arrives as safetensors bytes) under the checkpoint's own names, and reloads them in
place. Each worker reads what it needs itself, so nothing large crosses collective_rpc. vLLM fuses
q/k/v and gate/up itself, which is why a fused group must always arrive whole (the
engine checks that before it sends anything). Kept import-light: it loads in vLLM's
process, not ours."""
from __future__ import annotations

import os
import signal
import threading
import time


def _die_with_the_server() -> None:
    """vLLM's engine processes do not notice when our server dies (kill -9) and would keep
    their gigabytes. The worker (in vLLM's engine process, or a child of it) watches the
    server's pid, which the server put in its environment, and when it is gone kills the
    engine process and itself."""
    server = int(os.environ.get("TRANSPLANT_SERVER_PID", "0") or 0)
    if not server:
        return

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(server, 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:          # someone else's pid now: ours is gone
                pass
            parent = os.getppid()
            if parent not in (1, server):
                try:
                    os.kill(parent, signal.SIGKILL)
                except OSError:
                    pass
            os._exit(1)

    threading.Thread(target=watch, name="transplant-server-watch", daemon=True).start()


_die_with_the_server()


class TransplantWorker:
    def transplant_load(self, paths: list, blob: bytes) -> int:
        """Reload the tensors named by path, (key, file, name there, dtype, shape) (a dtype
        given: the file's bytes as that dtype and shape, as the tensor store is addressed
        by bytes alone), and those in `blob` (safetensors bytes), under the checkpoint's
        names."""
        import torch
        from safetensors import safe_open
        from safetensors.torch import load

        tensors = {}
        for key, file, name, dtype, shape in paths:
            with safe_open(file, framework="pt") as f:
                t = f.get_tensor(name)
            if dtype:
                want = getattr(torch, dtype)
                if t.dtype != want or list(t.shape) != list(shape):
                    t = t.reshape(-1).view(torch.uint8).view(want).reshape(shape)
            tensors[key] = t
        if blob:
            tensors.update(load(blob))
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return len(tensors)
