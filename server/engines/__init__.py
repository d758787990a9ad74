"""Engines: what decodes requests. The runtime (generations, journal, guard, probes,
metrics) sits above the seam in base.py and is written once; an engine only queues,
batches and decodes requests, each on the generation it is pinned to."""
from .base import Engine, QueueFull, Request

__all__ = ["Engine", "QueueFull", "Request", "make_engine"]


def make_engine(kind: str, gens, tokenizer, cfg, on_finish, on_step, table=None, model_path=None,
                attach=None) -> Engine:
    """attach: (engine client, event loop) of a running vLLM server (the plugin inside `vllm serve`)."""
    if kind == "vllm" and attach is not None:
        from .vllm_attached import AttachedVllmEngine

        return AttachedVllmEngine(*attach, gens, table, model_path, cfg, on_finish=on_finish, on_step=on_step)
    if kind == "vllm":
        from .vllm import VllmEngine

        return VllmEngine(gens, table, model_path, cfg, on_finish=on_finish, on_step=on_step)
    if kind == "static":
        from .static import Scheduler

        return Scheduler(gens, tokenizer, cfg.max_batch_size, cfg.max_queue, cfg.batch_wait_ms,
                         on_finish=on_finish, on_step=on_step)
    from .embedded import ContinuousEngine

    return ContinuousEngine(gens, tokenizer, cfg.max_batch_size, cfg.max_queue, on_finish=on_finish, on_step=on_step)
