"""The control path: every change a server makes, from request to reply.

Owns: the controller (controller.py: transplant, revert and rollback alerts, from the
plan to the outcome the caller sees; read it to follow a transplant end to end); the
planner (planner.py: validation and module selection, nothing changes); the follower
(follower.py: the one way a generation goes live, standalone or from a fleet's log,
with shadow probes, the guard and post-swap probes); the one validation of a generate
request for gRPC and /v1 (requests.py); idempotency keys and truthful outcomes
(outcome.py); the alert policy, revert the head once (alerts.py). The generation log it
appends to is server/generations/log.py (standalone) or server/fleet/ (etcd)."""
