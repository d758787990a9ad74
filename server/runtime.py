"""The runtime: what a server holds (the model as loaded, its generations, donors,
the engine, the quality monitor, the generation log) and the operations the servicers
expose. Servicers translate protos; this wires and delegates: generate requests to
control/requests.py and the engine, plan to control/planner.py, transplant, revert and
alerts to control/controller.py (read that file to follow a transplant end to end),
installs to control/follower.py."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from transplant_core.errors import InvalidArgument, PreconditionFailed
from transplant_core.generation import DecodeBatch, SamplingParams, SpliceUnsupported
from transplant_core.mapped import NotMappable
from transplant_core.tasks import Task, held_out_task, load_task, selection_task
from transplant_core.workflow import open_mapped, open_model

from .config import ServeConfig
from .control.controller import Controller, SwapResult
from .control.follower import Follower
from .control.planner import PlanResult, Planner, TransplantArgs
from .control.requests import Requests
from .donors import Donor, DonorRegistry
from .engines import Request, make_engine
from .engines.base import NotReady
from .generations import Generations, Record, claim
from .generations.log import LocalLog
from .metrics import Metrics, QualityMetrics
from .quality import QualityMonitor
from .quality.drift import Drift
from .quality.forward import EngineForward, ModelForward

__all__ = ["PlanResult", "Runtime", "SwapResult", "TransplantArgs"]

log = logging.getLogger("transplant.runtime")



class Runtime:
    def __init__(self, cfg: ServeConfig, attach=None):
        """attach: (engine client, event loop) of a running vLLM server: the plugin inside
        `vllm serve` serves on vLLM's engine instead of starting one."""
        self.cfg = cfg
        self.attach = attach
        self.metrics = Metrics()
        self.started = time.time()
        self.serving = False
        self._donor_models: dict[str, object] = {}
        self.ready = threading.Event()
        self.fleet = None                   # fleet.agent.FleetAgent with `fleet:` configured
        self.endpoints: dict[str, str] = {}  # set by the server: where clients reach this replica
        self.log = None                     # the generation log: generations.log.LocalLog, or the FleetAgent
        self.planner, self.follower, self.controller = Planner(self), Follower(self), Controller(self)
        self.on_engine_dead = lambda: None      # the server: health NOT_SERVING, exit
        self.on_fence = lambda why: None          # the server: health NOT_SERVING while a fleet replica is fenced
        self.engine_dead = False
        self._closing = threading.Event()

    # ---- lifecycle ----------------------------------------------------------------

    def load(self) -> None:
        cfg = self.cfg
        owner = claim(cfg.state_dir)      # before the (long) model load: a second server fails at once
        try:
            from transplant_core.checkpoint import parse_dtype

            self.loaded, mapped = None, False
            if cfg.engine == "vllm":      # vLLM holds the model: its weights stay in the checkpoint's files here
                try:
                    self.loaded, mapped = open_mapped(cfg.model, cfg.allow_pickle), True
                    if cfg.dtype:
                        log.warning("dtype %s is the embedded engine's; on vLLM the weights are read as stored and "
                                    "vLLM computes in its own dtype (vllm.dtype, or vLLM's --dtype)", cfg.dtype)
                except NotMappable as e:
                    log.warning("%s; holding a transformers copy of the model beside vLLM's (its memory again)", e)
            if self.loaded is None:
                self.loaded = open_model(cfg.model, cfg.allow_pickle, parse_dtype(cfg.dtype))
            try:
                self.gens = self._generations(owner)
            except PreconditionFailed as e:
                if not mapped or "changed on disk" not in str(e):
                    raise
                # generation 0 recorded from a transformers copy (an earlier version, or a dtype
                # converting the stored weights): its checksums are that copy's, so load it again
                log.warning("%s: the weights as stored differ from those generation 0 recorded; holding a "
                            "transformers copy of the model (dtype %s) to serve this state directory",
                            cfg.state_dir, cfg.dtype or "as stored")
                self.loaded = open_model(cfg.model, cfg.allow_pickle, parse_dtype(cfg.dtype))
                owner = claim(cfg.state_dir)       # (the failed attempt released it)
                self.gens = self._generations(owner)
        except BaseException:
            owner.close()
            raise
        if self.gens.unverifiable:
            u = self.gens.unverifiable
            log.warning("cannot build generation %d from the shared store (%s); serving generation %d, the newest "
                        "this replica can verify, until the fleet's follower can install the head",
                        u["generation"], u["message"], self.gens.live.id)
        self.metrics.live_generation.set(self.gens.live.id)
        roots = list(cfg.donor_roots) or [cfg.state_dir / "donors"]   # a drop-in folder by default
        for r in roots:
            Path(r).mkdir(parents=True, exist_ok=True)
        zoo_specs = self._zoo_donors()
        self.donors = DonorRegistry(self.table, roots, cfg.allow_pickle, on_change=self.metrics.donors.set)
        for d in cfg.donors:
            path = str(self._resolve_spec(d.path))
            self.donors.register(d.name, path, origin="config", trusted=True)
        for name, path in zoo_specs:
            self.donors.register(name, str(path), origin="config", trusted=True)
        if cfg.watch_donor_roots and roots:
            self.donors.watch()
        kind = "vllm" if cfg.engine == "vllm" else self._batching()
        self._stopped_during_start()
        self.scheduler = make_engine(kind, self.gens, self.tokenizer, cfg, self._on_finish,
                                     self.metrics.batch_size.observe, table=self.table, model_path=self.loaded.path,
                                     attach=self.attach)
        self.requests = Requests(cfg, self.tokenizer, self.gens, self.scheduler)
        self.scheduler.start()
        self._stopped_during_start()
        self.metrics.engine_up.set(1)
        threading.Thread(target=self._watch_engine, name="engine-watch", daemon=True).start()
        self.quality = QualityMonitor(cfg, self.tokenizer, self.task, QualityMetrics(self.metrics.registry))
        self.drift = Drift(cfg.drift, self.quality.metrics, self.tokenizer.pad_token_id or 0)
        self.requests.on_prompt = self.drift.keep
        self.follower.probe(self.gens.live, "post_swap")
        self.quality.start(lambda: self.gens.live, self.follower.record_probe, self.forward)
        if cfg.fleet is None:
            self.log = LocalLog(self.gens, self.follower.install, cfg.model_name)
        else:
            from .fleet.agent import FleetAgent

            self.fleet = self.log = FleetAgent(self, cfg.fleet, self.endpoints)
            self.fleet.on_fence = lambda why: self.on_fence(why)
            self.metrics.watch_fleet(self.fleet)
            self.fleet.start()              # catches up to the fleet's head before serving
        self._stopped_during_start()
        self.ready.set()

    def _generations(self, owner) -> Generations:
        cfg = self.cfg
        self.tokenizer, self.table = self.loaded.tokenizer, self.loaded.table
        return Generations(self.loaded.model, self.table, cfg.state_dir, cfg.model, self._crash_hook, owner=owner,
                           keep_servable=0 if cfg.engine == "vllm" else cfg.servable_generations,
                           shared_store=cfg.fleet.store if cfg.fleet else None)

    def _stopped_during_start(self) -> None:
        """close() came while load() ran: stop here, so nothing started after it outlives it."""
        if self._closing.is_set():
            for part in ("fleet", "quality", "scheduler"):
                if getattr(self, part, None) is not None:
                    getattr(self, part).stop()
            raise NotReady("the server was stopped during start-up")

    def _watch_engine(self, every_s: float = 0.5) -> None:
        """A dead engine (vLLM's process killed, say) must not look healthy: once it cannot
        decode, the server stops serving (health, /health, the fleet report, metrics)."""
        while not self._closing.wait(every_s):
            if not self.scheduler.healthy() and not self._closing.is_set():
                log.error("the engine died (%s engine): NOT_SERVING", self.cfg.engine)
                self.engine_dead, self.serving = True, False
                self.metrics.engine_up.set(0)
                self.metrics.healthy.set(0)
                self.on_engine_dead()
                return

    def _batching(self) -> str:
        """Continuous batching where the model's KV cache can be spliced (tried on one
        token), else static batching, said in the log."""
        if self.cfg.batching == "static":
            return "static"
        try:
            DecodeBatch(self.gens.live.model, self.tokenizer).add([(0, [0], SamplingParams(max_new_tokens=1))])
        except SpliceUnsupported as e:
            log.warning("continuous batching is off: %s; batching whole requests instead", e)
            return "static"
        return "continuous"

    def _crash_hook(self, point: str) -> None:
        if self.cfg.test_crash_at == point:
            log.warning("test hook: SIGKILL at %s", point)
            os.kill(os.getpid(), signal.SIGKILL)

    @staticmethod
    def _resolve_spec(spec: str) -> Path:
        from transplant_core.checkpoint import resolve_model_path

        return resolve_model_path(spec)

    def _zoo_donors(self) -> list[tuple[str, Path]]:
        """With a zoo model live, the family's other models are donors (`transplant serve`)."""
        if not (self.cfg.zoo_donors and self.cfg.model.startswith("zoo:")):
            return []
        from transplant_core import zoo

        live = self.cfg.model[4:]
        return [(name, zoo.model_dir(name)) for name in zoo.MODEL_NAMES if name != live]

    def close(self) -> None:
        self.serving = False
        self._closing.set()
        if self.fleet is not None:
            self.fleet.stop()
        if hasattr(self, "quality"):
            self.quality.stop()
        if hasattr(self, "scheduler"):
            self.scheduler.stop()
        if hasattr(self, "donors"):
            self.donors.close()
        if hasattr(self, "gens"):
            self.gens.close()

    def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.scheduler.idle():
                return True
            time.sleep(0.05)
        return False

    # ---- inference ----------------------------------------------------------------

    def request(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
                stop: list[str], deadline: float | None = None, alive=lambda: True, stream=None,
                messages: list[dict] | None = None, model: str = "", generation: int | None = None,
                pinned=None) -> Request:
        """Validate a generate request and queue it (see `prepare`)."""
        req = self.prepare(prompt, max_new_tokens, temperature, top_p, seed, stop, deadline, alive, stream,
                           messages, model, generation, pinned)
        return self.submit([req])[0]

    def prepare(self, *args, **kwargs) -> Request:
        """The one validation of a generate request (server/control/requests.py)."""
        return self.requests.prepare(*args, **kwargs)

    def submit(self, reqs: list[Request]) -> list[Request]:
        """Queue validated requests; several (the choices of one /v1 call) start together,
        on one generation."""
        self.scheduler.submit_many(reqs) if len(reqs) > 1 else self.scheduler.submit(reqs[0])
        self.metrics.queue_depth.set(self.scheduler.depth)
        return reqs

    def pin(self, model: str = "", generation: int | None = None, field: str = "model"):
        return self.requests.pin(model, generation, field)

    def render_chat(self, messages: list[dict], field: str = "messages") -> str:
        return self.requests.render_chat(messages, field)

    def _on_finish(self, r: Request) -> None:
        m = self.metrics
        m.queue_depth.set(self.scheduler.depth)
        if r.internal:                  # a probe's request: the traffic metrics are the users'
            return
        if r.started is not None:
            m.queue_seconds.observe(r.started - r.enqueued)
        if r.first_token is not None:
            m.ttft_seconds.observe(r.first_token - r.enqueued)
        if r.result is not None:
            m.tokens.inc(r.result.completion_tokens)
            m.prompt_tokens.inc(r.result.prompt_tokens)

    # ---- admin: donors --------------------------------------------------------------

    def register_donor(self, name: str, path: str) -> Donor:
        return self.donors.register(name, path, origin="rpc")

    def donor_model(self, donor: Donor):
        """The donor loaded for activation analysis (one cached)."""
        if donor.name not in self._donor_models:
            self._donor_models.clear()
            self._donor_models[donor.name] = open_model(str(donor.path), self.cfg.allow_pickle).model
        return self._donor_models[donor.name]

    # ---- admin: tasks and quality -------------------------------------------------------

    def task(self, spec: str, n: int | None = None) -> Task:
        if not spec:
            raise InvalidArgument("task is empty; give zoo:NAME or a JSONL file inside a task root")
        if not spec.startswith("zoo:"):
            p = Path(spec).expanduser().resolve()
            roots = [Path(r).resolve() for r in self.cfg.task_roots]
            if not any(r == p.parent or r in p.parents for r in roots):
                raise InvalidArgument(f"task file {spec!r} is outside the task roots "
                                      f"({', '.join(map(str, roots)) or 'none configured'}); use zoo:NAME, or start the server with --task-root DIR (task_roots in its config)")
        return load_task(spec, n=n)

    def selection_task(self, spec: str, n: int | None = None) -> Task:
        """The prompts a task + K selection analyses (transplant_core.tasks.selection_task,
        as the CLI's), after the server's checks on the task."""
        self.task(spec)                               # the same checks and errors
        return selection_task(spec, n)

    def held_out_task(self, spec: str, n: int | None = None) -> Task:
        """What a selection's task is evaluated on: disjoint from selection_task."""
        self.task(spec)
        return held_out_task(spec, n)

    @property
    def on_vllm(self) -> bool:
        """vLLM holds the weights: the runtime has no model copy (transplant_core.mapped);
        probes and evaluation are requests to the engine."""
        return self.cfg.engine == "vllm"

    def forward(self, live, direct: bool = False):
        """What serves generation `live` (quality.forward): its model object (embedded), or
        the engine (vLLM; `direct`: past the gate, for a candidate the guard judges)."""
        if self.on_vllm:
            return EngineForward(self.scheduler, live.id if live is not None else None, direct)
        return ModelForward(live.model, live.id)

    def evaluate_on(self, model, gen: int, spec: str, n: int = 0, max_new_tokens: int = 0,
                    held_out: bool = False) -> dict:
        """Accuracy of generation `gen` (whose model object is `model`; on vLLM the engine
        serving it, which must be the live one) on task `spec`."""
        n = n or self.cfg.eval_examples
        task = self.held_out_task(spec, n) if held_out else self.task(spec, n)
        fwd = EngineForward(self.scheduler, gen) if self.on_vllm else ModelForward(model, gen)
        r = fwd.accuracy(self.tokenizer, task, max_new_tokens or self.cfg.eval_max_new_tokens)
        lo, hi = r.interval()
        return {"task": spec, "accuracy": r.accuracy, "n": r.n, "correct": r.n_correct, "generation": gen,
                "ci_low": lo, "ci_high": hi, "phase": "request"}

    def evaluate_live(self, spec: str, n: int = 0, max_new_tokens: int = 0) -> dict:
        live = self.gens.live
        q = self.evaluate_on(live.model, live.id, spec, n, max_new_tokens)
        self.gens.add_quality(live.id, q)
        return q

    # ---- admin: plan, transplant, revert, alerts (control/) -----------------------------------

    def plan(self, a: TransplantArgs) -> PlanResult:
        return self.planner.plan(a)

    def transplant(self, a: TransplantArgs, requested_by: str = "") -> SwapResult:
        return self.controller.transplant(a, requested_by)

    def revert(self, to: int | None, reason: str = "", requested_by: str = "", eval_tasks=(), eval_examples: int = 0,
               why: str = "manual", extra: dict | None = None, idempotency_key: str = "") -> SwapResult:
        return self.controller.revert(to, reason, requested_by, eval_tasks, eval_examples, why, extra,
                                      idempotency_key)

    def on_alert(self, doc: dict) -> tuple[int, dict]:
        return self.controller.on_alert(doc)

    def generation(self, gen: int) -> Record:
        return self.gens.get(gen)

    def probe_quality(self) -> list[dict]:
        """The live generation's latest measurement of each probe task (accuracy, answer NLL,
        KL from its parent where measured)."""
        live = self.gens.live.id
        return [m.to_dict() for t in self.quality.tasks if (m := self.quality.latest(live, t)) is not None]

    def status(self) -> dict:
        return {"model": self.cfg.model, "model_path": str(self.loaded.path), "arch": self.table.arch,
                "live_generation": self.gens.live.id, "generations": len(self.gens.records),
                "donors": len(self.donors.list()), "health": "SERVING" if self.serving else "NOT_SERVING",
                "queue_depth": self.scheduler.depth, "max_batch_size": self.cfg.max_batch_size,
                "transplantable_modules": len(self.table.modules), "uptime_seconds": time.time() - self.started,
                "state_dir": str(self.cfg.state_dir),
                "fleet": self.cfg.fleet.name if self.cfg.fleet else "", "replica": self.fleet.name if self.fleet else ""}

