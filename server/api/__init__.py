"""The surfaces clients call: the gRPC servicers (grpc.py: Inference and Admin), the
OpenAI-compatible API under /v1 (openai.py, with openai_request.py checking a body),
the HTTP server (http.py: /v1, /metrics, /health, the Alertmanager webhook at /alerts),
and one error map from exceptions to gRPC and HTTP status (errors.py).

Nothing is imported here: each surface is imported from its own module.
"""
