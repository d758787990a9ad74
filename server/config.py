"""The server's one typed, validated configuration: loaded once (file, then flags)
and passed down. Nothing reads the environment or globals after this."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from transplant_core.errors import InvalidArgument


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "transplant"


class DonorSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
    path: str          # checkpoint dir or zoo:NAME


class ProbeSpec(BaseModel):
    """A task whose quality the server measures on every generation."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    task: str
    examples: int = Field(64, ge=1, le=100_000)
    interval_s: float = Field(60.0, gt=0)
    guard: bool = False               # refuse/revert transplants that drop this task
    statistic: Literal["accuracy", "likelihood", "kl"] | None = None   # what the guard judges (default: guard's)


class GuardSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    margin: float = Field(0.05, ge=0, le=1)        # largest accuracy drop tolerated
    confidence: float = Field(0.95, gt=0.5, lt=1)  # one-sided; the drop must be this sure
    mode: Literal["refuse", "revert"] = "refuse"
    # what a guarded probe is judged on (a probe's own `statistic` wins): exact-match
    # accuracy; the reference answers' likelihood (a rise of the answer NLL beyond
    # nll_margin nats per token, paired, sure at `confidence`); or kl, label-free (the
    # lower bound of the mean KL from the parent beyond kl_budget nats per answer position)
    statistic: Literal["accuracy", "likelihood", "kl"] = "accuracy"
    nll_margin: float = Field(0.02, ge=0)       # (docs/experiments/guard: the margins measured)
    kl_budget: float = Field(0.01, ge=0)


# Default probes for a zoo model: the cross-generation setting's task (add), the base vs
# tuned setting's (rev), and copy, which every model of the family does well, guarded.
# 64 eval-split examples each take about a second on the family's models.
ZOO_PROBES = (
    {"task": "zoo:add", "examples": 64, "interval_s": 60},
    {"task": "zoo:rev", "examples": 64, "interval_s": 60},
    {"task": "zoo:copy", "examples": 64, "interval_s": 60, "guard": True},
)


class VllmSpec(BaseModel):
    """The vLLM engine (`engine: vllm`): vLLM's AsyncLLM in its own engine process."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    swap_policy: Literal["drain", "freeze"] = "drain"   # see the README: exact generations vs never waiting
    swap_drain_timeout_s: float = Field(30.0, gt=0)    # drain: longest wait for running requests
    guard_trial_timeout_s: float = Field(120.0, gt=0)  # longest a guard trial may hold requests (else: refused)
    kv_cache_gib: int = Field(1, ge=1)                  # VLLM_CPU_KVCACHE_SPACE (CPU builds)
    memory_fraction: float = Field(0.2, gt=0, le=1)     # gpu_memory_utilization (on CPU: of host memory)
    dtype: str = "float32"                              # exact parity with transformers needs float32
    max_model_len: int | None = Field(None, ge=1)
    enforce_eager: bool = True                          # no graph capture/compilation: starts in seconds


class FleetSpec(BaseModel):
    """Replicas of one model coordinated through etcd (README: "A fleet")."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    etcd: str                                  # etcd://HOST:PORT[,HOST:PORT...] (the v3 JSON gateway, etcd >= 3.3)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    store: Path                                # the shared tensor store (a ReadWriteMany volume)
    replica: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")   # default: host name
    canaries: float = Field(1, ge=0)           # >= 1: that many replicas install first; < 1: a fraction; 0: none
    probe_window_s: float = Field(30.0, ge=0)  # canaries serve this long before the rest install
    canary_timeout_s: float = Field(180.0, gt=0)    # a canary phase with a canary not serving it by then ...
    on_canary_timeout: Literal["revert", "repick"] = "revert"   # ... fails (the fleet reverts), or re-picks
    rollout_timeout_s: float = Field(300.0, gt=0)   # longest a Transplant/Revert call waits for this replica
    cut_off_s: float = Field(30.0, ge=0)       # cut off from etcd this long, and a peer says our generation was
                                               # reverted: NOT_SERVING until etcd answers (0: keep serving)
    store_sweep_s: float = Field(3600.0, ge=0)      # how often objects no record names leave the store (0: never)
    store_sweep_grace_s: float = Field(3600.0, ge=0)   # ... once older than this (an append may be on its way)
    lease_ttl_s: int = Field(10, ge=2, le=3600)     # a dead replica's report expires after this
    tick_s: float = Field(1.0, gt=0, le=60)         # how often the rollout is looked at without changes
    etcd_timeout_s: float = Field(5.0, gt=0)

    @field_validator("etcd")
    @classmethod
    def _endpoint(cls, v: str) -> str:

        parse_endpoints(v)
        return v

    @field_validator("canaries")
    @classmethod
    def _canaries(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError(f"canaries is a count (1, 2, ...) or a fraction below 1, not {v}")
        return v


class DriftSpec(BaseModel):
    """Drift on traffic-like prompts (server/quality/drift.py): off by default."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = False
    sample: int = Field(64, ge=1, le=4096)            # recent prompts kept, in memory only
    max_tokens: int = Field(256, ge=1, le=8192)       # of each prompt, its last ones


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = "zoo:v2"
    donors: tuple[DonorSpec, ...] = ()
    zoo_donors: bool = True               # with a zoo model: register the family's other models
    donor_roots: tuple[Path, ...] = ()
    watch_donor_roots: bool = True
    state_dir: Path = Field(default_factory=default_state_dir)
    grpc_listen: str = "127.0.0.1:50051"
    http_listen: str = "127.0.0.1:9400"
    admin_token_file: Path | None = None   # default: <state_dir>/admin_token, created 0600
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_pickle: bool = False
    task_roots: tuple[Path, ...] = ()     # JSONL task files named in RPCs must lie here (zoo: tasks always work)
    test_crash_at: str | None = None      # test hook: SIGKILL self at a commit step (after_tensors, ...)

    served_model_name: str | None = Field(None, pattern=r"^[^@\s]{1,128}$")   # `model` in requests (default: zoo:NAME or the folder name)
    inference_key_file: Path | None = None  # set: Inference (gRPC) and /v1 need 'Bearer <key>'; unset: open
    dtype: Literal["float32", "bfloat16", "float16"] | None = None   # the live model's; default: as stored
    engine: Literal["embedded", "vllm"] = "embedded"
    vllm: VllmSpec = VllmSpec()
    batching: Literal["continuous", "static"] = "continuous"
    servable_generations: int = Field(3, ge=0, le=64)   # past generations requests may still pin
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_ms: float = Field(10.0, ge=0, le=1000)   # most a new batch waits for company (<= 5% of a decode)
    max_queue: int = Field(256, ge=1)
    max_prompt_chars: int = Field(4096, ge=1)
    max_new_tokens_limit: int = Field(0, ge=0)     # 0: what the model's context leaves (as vLLM)
    default_max_new_tokens: int = Field(32, ge=1)
    grpc_workers: int = Field(64, ge=4)
    drain_timeout_s: float = Field(30.0, ge=0)
    engine_dead_exit_s: float = Field(10.0, ge=0)  # a dead engine: NOT_SERVING at once, exit 1 this much later
    http_timeout_s: float = Field(600.0, gt=0)     # a /v1 call's deadline (header x-request-timeout: less)

    probe_prompts: int = Field(64, ge=1)        # activation analysis defaults
    probe_max_new_tokens: int = Field(16, ge=1)
    eval_examples: int = Field(100, ge=1)
    eval_max_new_tokens: int = Field(32, ge=1)

    probes: tuple[ProbeSpec, ...] = ()
    guard: GuardSpec = GuardSpec()
    drift: DriftSpec = DriftSpec()
    rollback_alerts: tuple[str, ...] = ("TransplantQualityRegression",)   # alertnames that revert
    fleet: FleetSpec | None = None        # unset: a standalone server (its own generations)

    @model_validator(mode="before")
    @classmethod
    def _default_probes(cls, data):
        """The embedded family gets probes unless the config names its own (an empty list
        turns them off): plain `transplant serve` exports task quality from the start."""
        if isinstance(data, dict) and "probes" not in data and str(data.get("model", "zoo:v2")).startswith("zoo:"):
            data = dict(data, probes=ZOO_PROBES)
        return data

    @field_validator("grpc_listen", "http_listen")
    @classmethod
    def _address(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"{v!r} is not HOST:PORT (for example 127.0.0.1:50051; port 0 picks a free one)")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if self.max_new_tokens_limit and self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("default_max_new_tokens exceeds max_new_tokens_limit")
        if self.engine == "vllm" and self.drift.enabled:
            raise ValueError("drift compares the new generation's and its parent's full next-token distributions on "
                             "sampled traffic, and on the vLLM engine only one of them is installed at a time: turn "
                             "drift off, or serve with the embedded engine")
        names = [d.name for d in self.donors]
        if len(names) != len(set(names)):
            raise ValueError(f"donor names repeat: {names}")
        return self

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model.startswith("zoo:"):
            return self.model
        from transplant_core.checkpoint import hub_repo

        # a Hugging Face cache folder or snapshot: its repository (ORG/NAME), not the commit hash
        return hub_repo(Path(self.model).expanduser()) or Path(self.model).name or self.model

    @property
    def token_file(self) -> Path:
        return self.admin_token_file or self.state_dir / "admin_token"


def load_config(path: str | None = None, **overrides) -> ServeConfig:
    """A config file (YAML or JSON), then non-None overrides from flags."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise InvalidArgument(f"config file {path!r} does not exist")
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise InvalidArgument(f"config file {path}: expected a mapping at the top level")
    for k, v in overrides.items():
        if v is None:
            continue
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    try:
        return ServeConfig(**data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise InvalidArgument(f"invalid configuration: {problems}") from None


# ---- etcd endpoints (fleet.etcd) ----------------------------------------------------------

def parse_endpoint(spec: str) -> tuple[str, int]:
    """etcd://HOST:PORT or http://HOST:PORT -> (host, port)."""
    u = urlsplit(spec if "://" in spec else f"etcd://{spec}")
    if u.scheme not in ("etcd", "http") or not u.hostname or not u.port or u.path not in ("", "/"):
        raise ValueError(f"{spec!r} is not an etcd endpoint; expected etcd://HOST:PORT (for example "
                         "etcd://127.0.0.1:2379), or a cluster's members separated by commas "
                         "(etcd://a:2379,b:2379,c:2379)")
    return u.hostname, u.port


def parse_endpoints(spec: str) -> list[tuple[str, int]]:
    """etcd://a:2379,b:2379,c:2379 (the scheme once, or on each) -> [(host, port), ...]."""
    parts = [p.strip() for p in spec.split(",")]
    if not all(parts):
        raise ValueError(f"{spec!r} has an empty endpoint; expected etcd://HOST:PORT[,HOST:PORT...]")
    scheme = spec.split("://", 1)[0] + "://" if "://" in parts[0] else ""
    out = [parse_endpoint(p if "://" in p else scheme + p) for p in parts]
    if len(set(out)) != len(out):
        raise ValueError(f"{spec!r} names an endpoint twice")
    return out
