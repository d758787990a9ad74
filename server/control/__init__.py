"""The control path: what a transplant or revert call becomes and what it reports back.

Owns: idempotency keys (a call sent again with its key gets the first outcome) and the
truthful outcome of a change (live here, live on k of n replicas, pending in its canary
phase, unknown). The runtime (server/runtime.py) drives the swap; this says what
happened."""
