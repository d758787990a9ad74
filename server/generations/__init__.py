"""The generations room: what a server has served and serves now, and where its weights live.

- records.py: a generation's record (journal and fleet log), what a request pins, a
  change built off to the side, StoreDamaged
- journal.py: the append-only, fsync'd journal (one JSON record a line)
- store.py: the content-addressed tensor store (one safetensors file per sha256)
- values.py: tensor values by digest (base, memory, store, low-rank rebuild), verified
- live.py: Generations, the live generation and its history: recovery, prepare,
  stage, commit (the one way a generation goes live), the servable window
- log.py: the generation log interface and the local one (a standalone server is a
  fleet of one; server/fleet/ has the etcd one)
- legacy.py: state directories from before the store; lock.py: one server per state dir
"""
from .live import Generations
from .lock import claim
from .records import Candidate, Live, Record, StoreDamaged
from .store import write_tensor

__all__ = ["Candidate", "Generations", "Live", "Record", "StoreDamaged", "claim", "write_tensor"]
