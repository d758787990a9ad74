"""The control path: what a call becomes before the engine or the swap sees it, and
what a change reports back.

Owns: the one validation of a generate request for gRPC and /v1 (requests.py);
idempotency keys and the truthful outcome of a transplant or revert: live here, live on
k of n replicas, pending in its canary phase, replayed (outcome.py); the alert policy
(alerts.py: revert the head once), the same for a standalone server and a fleet. The runtime
(server/runtime.py) drives the swap; this says what a request may be and what happened."""
