"""The vLLM plugin: transplant inside `vllm serve`. vLLM's whole OpenAI server stays as it
is; the plugin adds our Admin API (gRPC on its own port, the same operations as JSON
under /transplant/v1/ on vLLM's port), generations, journal, store, donors, guard,
probes, metrics and the Alertmanager webhook (on our own HTTP port), all the runtime's
one implementation on vLLM's own engine (engines/vllm_attached.py), and labels every
reply with the generation that computed it (middleware.py).

    VLLM_PLUGINS=transplant TRANSPLANT_CONFIG=transplant.yaml \\
      vllm serve MODEL_DIR --worker-extension-cls server.engines.vllm_worker.TransplantWorker
"""
