"""Runs inside vLLM's worker process (`worker_extension_cls`): takes a transplant's
tensors as safetensors bytes (tensors do not survive collective_rpc arguments across
processes) under the checkpoint's own names, and reloads them in place. vLLM fuses
q/k/v and gate/up itself, which is why a fused group must always arrive whole (the
engine checks that before it sends anything). Kept import-light: it loads in vLLM's
process, not ours."""
from __future__ import annotations


class TransplantWorker:
    def transplant_load(self, blob: bytes) -> int:
        from safetensors.torch import load

        tensors = load(blob)
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return len(tensors)
