"""The runtime: the live model, its generations, donors, the scheduler and the
operations the servicers expose. Servicers translate protos; this does the work."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from transplant_core import front
from transplant_core import transplant as tp
from transplant_core.checkpoint import ModelTensors
from transplant_core.errors import Incompatible, InvalidArgument, PreconditionFailed
from transplant_core.evaluate import evaluate
from transplant_core.generation import DecodeBatch, SamplingParams, SpliceUnsupported
from transplant_core.tasks import Task, held_out_task, load_task, selection_task
from transplant_core.workflow import compare, explicit_modules, open_model, rank, select

from .config import ServeConfig
from .donors import Donor, DonorRegistry
from .engines import Request, make_engine
from .errors import NotReady
from .control import alerts, outcome
from .control.requests import Requests
from .generations import Generations, Record, claim
from .metrics import Metrics, QualityMetrics
from .quality import QualityMonitor

log = logging.getLogger("transplant.runtime")



@dataclass
class TransplantArgs:
    donor: str
    modules: list[str] = field(default_factory=list)
    task: str = ""
    k: int = 0
    alpha: float = 1.0
    probe_prompts: int = 0
    max_new_tokens: int = 0
    alignment: str = "free"
    eval_tasks: list[str] = field(default_factory=list)
    eval_examples: int = 0
    reason: str = ""
    selector: str = ""
    cast: bool = False
    rank: int = 0                 # > 0: a low-rank transplant, this rank in every module
    param_budget: int = 0         # > 0: a low-rank transplant, factor parameters shared across modules
    retention_floor: float = 0.0  # > 0: K = the largest Recovery (up to k) whose retention stays >= this
    retain: list[str] = field(default_factory=list)   # the tasks retention is measured on (default: probes)
    idempotency_key: str = ""     # the same call sent again with it returns the first outcome


@dataclass
class PlanResult:
    donor: Donor
    plan: tp.Plan | None
    ranked: list[tuple[str, float, int]]
    base_generation: int
    selector: str = ""
    comparison: object | None = None            # workflow.Comparison for selector "all"
    front: list = field(default_factory=list)   # retention_floor: front.Point per K measured
    front_why: str = ""
    retained: list = field(default_factory=list)   # retention_floor: the tasks retention was measured on


@dataclass
class SwapResult:
    record: Record
    before: list[dict]
    after: list[dict]
    seconds: float
    rollout: dict | None = None       # where the generation stands (control.outcome), filled in on return
    replayed: bool = False            # an idempotency key named an earlier call: its generation


class Runtime:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.metrics = Metrics()
        self.started = time.time()
        self.serving = False
        self._donor_models: dict[str, object] = {}
        self.ready = threading.Event()
        self.fleet = None                   # fleet.agent.FleetAgent with `fleet:` configured
        self.endpoints: dict[str, str] = {}  # set by the server: where clients reach this replica
        self._prepared: dict[int, tuple] = {}   # fleet: candidates this replica built and appended
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

            self.loaded = open_model(cfg.model, cfg.allow_pickle, parse_dtype(cfg.dtype))
            self.tokenizer, self.table = self.loaded.tokenizer, self.loaded.table
            self.gens = Generations(self.loaded.model, self.table, cfg.state_dir, cfg.model, self._crash_hook,
                                    owner=owner, keep_servable=0 if cfg.engine == "vllm" else cfg.servable_generations,
                                    shared_store=cfg.fleet.store if cfg.fleet else None)
        except BaseException:
            owner.close()
            raise
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
                                     self.metrics.batch_size.observe, table=self.table, model_path=self.loaded.path)
        self.requests = Requests(cfg, self.tokenizer, self.gens, self.scheduler)
        self.scheduler.start()
        self._stopped_during_start()
        self.metrics.engine_up.set(1)
        threading.Thread(target=self._watch_engine, name="engine-watch", daemon=True).start()
        self.quality = QualityMonitor(cfg, self.tokenizer, self.task, QualityMetrics(self.metrics.registry))
        self._probe_generation(self.gens.live, "post_swap")
        self.quality.start(lambda: self.gens.live, self._record_probe)
        if cfg.fleet is not None:
            from .fleet.agent import FleetAgent

            self.fleet = FleetAgent(self, cfg.fleet, self.endpoints)
            self.fleet.on_fence = lambda why: self.on_fence(why)
            self.metrics.watch_fleet(self.fleet)
            self.fleet.start()              # catches up to the fleet's head before serving
        self._stopped_during_start()
        self.ready.set()

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

    def _donor_model(self, donor: Donor):
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

    def evaluate_on(self, model, gen: int, spec: str, n: int = 0, max_new_tokens: int = 0,
                    held_out: bool = False) -> dict:
        n = n or self.cfg.eval_examples
        task = self.held_out_task(spec, n) if held_out else self.task(spec, n)
        r = evaluate(model, self.tokenizer, task, max_new_tokens or self.cfg.eval_max_new_tokens)
        lo, hi = r.interval()
        return {"task": spec, "accuracy": r.accuracy, "n": r.n, "correct": r.n_correct, "generation": gen,
                "ci_low": lo, "ci_high": hi, "phase": "request"}

    def evaluate_live(self, spec: str, n: int = 0, max_new_tokens: int = 0) -> dict:
        live = self.gens.live
        q = self.evaluate_on(live.model, live.id, spec, n, max_new_tokens)
        self.gens.add_quality(live.id, q)
        return q

    # ---- admin: plan, transplant, revert ---------------------------------------------------

    def plan(self, a: TransplantArgs) -> PlanResult:
        """Validate and select; nothing changes."""
        donor = self.donors.get(a.donor)
        if not donor.compat.usable:
            raise Incompatible(f"donor {donor.name} cannot give modules to the live model",
                               list(donor.compat.model_mismatches + donor.compat.mismatches))
        if bool(a.modules) == bool(a.task):
            raise InvalidArgument("give either modules or a task with k")
        ranked: list[tuple[str, float, int]] = []
        live = self.gens.live
        if a.modules:
            refs = explicit_modules(",".join(a.modules), donor.compat)
        else:
            if a.k < 1:
                raise InvalidArgument("k must be at least 1 with a task")
            if a.retain and not a.retention_floor:
                raise InvalidArgument("retain names the tasks a retention floor measures: give retention_floor too")
            if a.task in a.retain:
                raise InvalidArgument(f"{a.task} is the task being transplanted; retain lists the other tasks to keep")
            probe = self.selection_task(a.task, a.probe_prompts or self.cfg.probe_prompts)
            selector = a.selector or "lae"
            # hooks go on a private module tree; selectors that swap modules or take gradients
            # get private copies of the transplantable weights too (the live ones are shared)
            private = [] if selector == "lae" else [k for m in self.table.modules.values() for k in m.keys]
            shadow = tp.fork(live.model, private)
            steps = a.max_new_tokens or self.cfg.probe_max_new_tokens
            donor_model = self._donor_model(donor)
            comparison = None
            if selector == "all":
                comparison = compare(shadow, self.tokenizer, self.table, donor_model, probe, donor.compat, steps, a.k)
                selector = comparison.chosen
            ranking = rank(shadow, self.tokenizer, self.table, donor_model, probe, donor.compat, steps, selector,
                           a.alignment or "free", k=a.k)
            points, why, k, retained = [], "", a.k, []
            if a.retention_floor:
                points, why, k, retained = self._front(a, donor, donor_model, ranking, live, probe, steps)
            refs = select(ranking, k)
            ranked = [(str(r), s, self.table[r].nbytes) for r, s in ranking.ranking()]
            return PlanResult(donor, self._plan(a, donor, refs, live), ranked, live.id, selector, comparison,
                              points, why, retained)
        if a.retention_floor or a.retain:
            raise InvalidArgument("a retention floor chooses K along a task's ranking: give a task and k, not modules")
        return PlanResult(donor, self._plan(a, donor, refs, live), ranked, live.id)

    def _front(self, a: TransplantArgs, donor: Donor, donor_model, ranking, live, probe: Task, steps: int):
        """Measure Recovery (on the selection prompts) and retention (on the retained tasks'
        selection prompts) of the top-K for K up to a.k, each built off to the side; return
        the points, why, and the K with the largest Recovery whose retention stays at the floor."""
        if not 0.0 < a.retention_floor <= 1.0:
            raise InvalidArgument(f"retention_floor must be in (0, 1] (0 = off), got {a.retention_floor!r}")
        retain = list(dict.fromkeys(a.retain or [p.task for p in self.cfg.probes if p.task != a.task]))
        if not retain:
            raise InvalidArgument("a retention floor needs tasks to retain: give retain (--retain TASK,...) or "
                                  "configure probes")
        n = a.probe_prompts or self.cfg.probe_prompts
        tasks = {t: self.selection_task(t, n) for t in retain}
        order = [r for r, _ in ranking.ranking()]

        def build(k: int):
            return tp.derive(live.model, self._plan(a, donor, order[:k], live))[0]

        points = front.measure(build, live.model, donor_model, self.tokenizer, probe, tasks,
                               front.ks_up_to(min(a.k, len(order))), self.cfg.eval_max_new_tokens)
        chosen, why = front.choose(points, a.retention_floor)
        if chosen is None:
            raise PreconditionFailed(f"{why}; lower the floor or retain fewer tasks; nothing changed")
        return points, f"{why} (retained: {', '.join(retain)})", chosen.k, retain

    def _plan(self, a: TransplantArgs, donor: Donor, refs, live) -> tp.Plan:
        """The validated plan: whole modules, or (a rank or a parameter budget) the live
        generation's weights moved by the low-rank factors of their difference to the donor's."""
        if a.rank < 0 or a.param_budget < 0:
            raise InvalidArgument("rank and param_budget must be >= 0 (0 = a full-module transplant)")
        p = dataclasses.replace(tp.plan(self.table, donor.checkpoint.tensors, refs, a.alpha, cast=a.cast),
                                donor=donor.name)
        if a.rank or a.param_budget:
            p = tp.lowrank(p, ModelTensors(live.model), rank=a.rank or None, budget=a.param_budget or None)
        return p

    def transplant(self, a: TransplantArgs, requested_by: str = "") -> SwapResult:
        if a.selector == "all":
            raise InvalidArgument("selector 'all' compares selectors in a dry run (PlanTransplant, `transplant admin "
                                  "plan --selector all`); give the selector to transplant with")
        key = outcome.check_key(a.idempotency_key)
        digest = outcome.request_digest("transplant", a)
        if key and (done := self._keyed(key, digest)) is not None:   # (a fleet waits for it: not under the lock)
            return done
        with self.gens.lock:
            if key and (done := self._keyed(key, digest, wait=False)) is not None:
                return done
            pr = self.plan(a)
            tasks = list(dict.fromkeys(([a.task] if a.task else []) + list(a.eval_tasks)))
            k = next((p.k for p in pr.front if p.chosen), a.k)     # a retention floor chose K
            selection = {"method": "explicit" if a.modules else (pr.selector or "lae"), "task": a.task, "k": k,
                         "alignment": a.alignment or "free",
                         "scores": {name: s for name, s, _ in pr.ranked[:k]} if pr.ranked else {}}
            if pr.plan.casts:
                selection["cast"] = pr.plan.casts          # journaled with the generation
            if pr.front:
                selection["front"] = {"floor": a.retention_floor, "retain": pr.retained, "why": pr.front_why,
                                      "points": [p.to_dict() for p in pr.front]}
            if pr.plan.factors:
                selection["lowrank"] = {"rank": a.rank, "param_budget": a.param_budget, "ranks": pr.plan.ranks,
                                        "energy": pr.plan.energy}
            if a.task:
                selection["selected_on"] = ("probe split" if a.task.startswith("zoo:") else
                                            "even-numbered examples (evaluated on the odd ones)")
            idem = outcome.stamp(key, digest)
            if self.fleet is None:
                return self._where(self._swap(pr.plan, "transplant", tasks, a.eval_examples, requested_by, a.reason,
                                              selection, held_out=a.task, idempotency=idem))
            rec, before, seconds = self._append(pr.plan, tasks, a.eval_examples, requested_by, a.reason, selection,
                                                held_out=a.task, idempotency=idem)
        return self._await(rec, before, tasks, a.eval_examples, seconds, held_out=a.task)

    def revert(self, to: int | None, reason: str = "", requested_by: str = "", eval_tasks=(), eval_examples: int = 0,
               why: str = "manual", extra: dict | None = None, idempotency_key: str = "") -> SwapResult:
        key = outcome.check_key(idempotency_key)
        digest = outcome.request_digest("revert", {"to": to, "reason": reason, "eval_tasks": list(eval_tasks),
                                                   "eval_examples": eval_examples})
        idem = outcome.stamp(key, digest)
        if key and (done := self._keyed(key, digest)) is not None:
            return done
        if self.fleet is not None:
            live = self.gens.live
            before = [self.evaluate_on(live.model, live.id, t, eval_examples) for t in eval_tasks]
            with self.gens.lock:                  # one call per key at a time on this replica
                if key and (done := self._keyed(key, digest, wait=False)) is not None:
                    return done
                rec = self.fleet.revert(to, why, requested_by, reason, extra, idempotency=idem)
            return self._await(rec, before, list(eval_tasks), eval_examples, 0.0)
        with self.gens.lock:
            if key and (done := self._keyed(key, digest, wait=False)) is not None:
                return done
            p, target = self.gens.revert_plan(to)
            return self._where(self._swap(p, "revert", list(eval_tasks), eval_examples, requested_by, reason,
                                          {"method": "revert", "why": why, **(extra or {})}, reverted_to=target,
                                          idempotency=idem))

    # ---- outcomes: idempotency keys and where a generation stands --------------------------------

    def _keyed(self, key: str, digest: str, wait: bool = True) -> SwapResult | None:
        """The outcome of the earlier call that gave `key` (the generation it made, where it
        stands now), or None if no generation carries it. In a fleet the log is read fresh
        (a call whose outcome was unknown may have landed meanwhile) and, with `wait`, the
        generation is waited for as a new call's would be."""
        if self.fleet is None:
            rec = outcome.find(self.gens.records.values(), key, digest)
            return None if rec is None else self._where(SwapResult(rec, [], [], 0.0, replayed=True))
        self.fleet.refresh()
        doc = outcome.find(self.fleet.records.values(), key, digest)
        if doc is None:
            return None
        gen = int(doc["id"])
        if wait:
            state, why = self.fleet.wait_installed(gen, self.cfg.fleet.rollout_timeout_s)
            if state in ("failed", "refused"):       # what the first call was told
                raise PreconditionFailed(f"generation {gen} (idempotency key {key!r}) was appended to fleet "
                                         f"{self.cfg.fleet.name} but did not go live here: {why}; see "
                                         "`transplant admin fleet`")
        rec = self.gens.records.get(gen) or self.fleet.record(gen)
        return self._where(SwapResult(rec, [], [], 0.0, replayed=True))

    def _where(self, res: SwapResult) -> SwapResult:
        res.rollout = (outcome.standalone(res.record, self.gens.live.id, self.cfg.model_name) if self.fleet is None
                       else self.fleet.rollout_of(res.record.id))
        return res

    # ---- fleet: append to the fleet log, install what it says -----------------------------------

    def _append(self, p: tp.Plan, tasks: list[str], n: int, requested_by: str, reason: str, selection: dict,
                held_out: str = "", idempotency: dict | None = None) -> tuple[Record, list[dict], float]:
        """A transplant on a fleet replica: prepared, shadow-measured and judged here exactly
        as on a single server, its tensors written to the shared store, then appended to the
        fleet log (on this replica's live generation, which must be the fleet's head). Every
        replica, this one included, installs it from the log (install_record)."""
        parent = self.gens.live
        before = [self.evaluate_on(parent.model, parent.id, t, n, held_out=t == held_out) for t in tasks]
        t0 = time.perf_counter()
        cand = self.gens.prepare(p)
        verdict, shadow = self._judge(cand, parent, "transplant", p, requested_by, fleet=True)   # any guard mode
        self.fleet.check_publishable(parent.id)          # before any object is written: a refusal leaves none
        rec = self.gens.stage(cand, "transplant", requested_by, reason, selection, idempotency)
        seconds = time.perf_counter() - t0
        # installing it here needs no second build (if it is this record that wins the head)
        self._prepared = {rec.id: (cand, verdict, shadow, dict(rec.state))}
        try:
            self.fleet.publish(rec)
        except BaseException:
            self._prepared = {}
            raise
        return rec, before, seconds

    def _await(self, rec: Record, before: list[dict], tasks: list[str], n: int, seconds: float,
               held_out: str = "") -> SwapResult:
        """Wait (up to fleet.rollout_timeout_s) until this replica serves the appended
        record; its rollout failing is an error, a timeout returns the record as appended."""
        outcome, why = self.fleet.wait_installed(rec.id, self.cfg.fleet.rollout_timeout_s)
        if outcome in ("failed", "refused"):
            self._prepared.pop(rec.id, None)       # never installed here: drop the candidate
            raise PreconditionFailed(f"generation {rec.id} was appended to fleet {self.cfg.fleet.name} but did not "
                                     f"go live here: {why}; see `transplant admin fleet`")
        after = []
        live = self.gens.live
        if outcome == "installed":
            rec = self.gens.records[rec.id]
            seconds += getattr(self, "_install_seconds", {}).get(rec.id, 0.0)
            for t in tasks:
                q = self.evaluate_on(live.model, live.id, t, n, held_out=t == held_out)
                self.gens.add_quality(live.id, q)
                after.append(q)
        else:
            log.warning("generation %d is in fleet %s's log but not live here after %.0f s: %s", rec.id,
                        self.cfg.fleet.name, self.cfg.fleet.rollout_timeout_s, why)
        return self._where(SwapResult(rec, before, after, seconds))

    def install_record(self, rec: Record, skipped: tuple[Record, ...] = ()) -> SwapResult | None:
        """Make a record of the fleet log live here, through the same path as every swap:
        its weights read from the store (digests verified), shadow-measured, judged by
        this replica's guard (a refusal raises PreconditionFailed: never installed, and
        the rollout fails), committed with the fleet's id, probed. `skipped`: records
        before it this replica never made live."""
        with self.gens.lock:
            if rec.id <= self.gens.live.id:
                return None
            prepared = self._prepared.pop(rec.id, None)
            if prepared is not None and (prepared[0].parent != self.gens.live.id or prepared[3] != rec.state):
                prepared = None                 # another replica's record won this id
            prepared = prepared[:3] if prepared else None
            # its state may name low-rank weights of records this replica skipped: their recipes too
            derived = {d: r for s in (*skipped, rec) for d, r in s.derived.items()}
            p = prepared[0].plan if prepared else self.gens.state_plan(rec.state, rec.id, derived)
            self._prepared = {k: v for k, v in self._prepared.items() if k > rec.id}   # superseded ones go
            res = self._swap(p, rec.kind, [], 0, rec.requested_by, rec.reason, rec.selection, rec.reverted_to,
                             record=rec, skipped=skipped, prepared=prepared)
            self._install_seconds = {rec.id: res.seconds}
            return res

    def _swap(self, p: tp.Plan, kind: str, tasks: list[str], n: int, requested_by: str, reason: str,
              selection: dict, reverted_to: int | None = None, held_out: str = "", record: Record | None = None,
              skipped: tuple[Record, ...] = (), prepared: tuple | None = None,
              idempotency: dict | None = None) -> SwapResult:
        """Prepare off to the side, shadow-measure the probes, let the guard judge,
        commit (write-ahead, swap), then measure again on the live generation. The task
        `held_out` (the one modules were selected on) is measured on its held-out part.
        A fleet record (`record`) commits under the fleet's id; `prepared` is the
        (candidate, verdict, shadow) this replica built before appending it."""
        parent = self.gens.live
        why = selection.get("why", "manual")
        before = [self.evaluate_on(parent.model, parent.id, t, n, held_out=t == held_out) for t in tasks]
        t0 = time.perf_counter()
        if prepared is not None:
            cand, verdict, shadow = prepared
        else:
            try:       # a revert's (or a fleet record's) values are stored, immutable: shared
                cand = self.gens.prepare(p, share=kind == "revert" or record is not None)
            except Exception:
                self.metrics.swaps.labels(kind, "error", why).inc()
                raise
            verdict, shadow = self._judge(cand, parent, kind, p, requested_by, fleet=record is not None)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            rec = self.scheduler.install(parent.model, cand, lambda: self.gens.commit(
                cand, kind, requested_by, reason, selection, reverted_to, record=record, skipped=skipped,
                idempotency=idempotency))
        except Exception:
            self.metrics.swaps.labels(kind, "error", why).inc()
            raise
        seconds += time.perf_counter() - t0
        m = self.metrics
        m.swaps.labels(kind, "ok", why).inc()
        m.swap_seconds.labels(kind).observe(seconds)
        m.modules_swapped.inc(len(p.modules))
        m.bytes_swapped.inc(p.nbytes)
        m.live_generation.set(rec.id)
        live = self.gens.live
        for s in shadow:
            self.gens.add_quality(rec.id, self.quality.adopt(rec.id, s).to_dict())
        self._probe_generation(live, "post_swap", donor=p.donor if kind == "transplant" else None)
        after = []
        for t in tasks:
            q = self.evaluate_on(live.model, live.id, t, n, held_out=t == held_out)
            self.gens.add_quality(live.id, q)
            after.append(q)
        log.info("%s: generation %d -> %d (%d modules, %.1f ms)", kind, parent.id, rec.id, len(p.modules), seconds * 1e3)
        if verdict is not None and not verdict.ok and record is None:   # guard mode "revert": take it back now
            back = self.revert(None, reason="guard", why="guard", extra={"violations": verdict.violations})
            raise PreconditionFailed(f"the guard reverted generation {rec.id} at once (now {back.record.id}): "
                                     f"{verdict.reason()}")
        return SwapResult(rec, before, after, seconds)

    def _judge(self, cand, parent, kind: str, p: tp.Plan, requested_by: str, fleet: bool = False):
        """Shadow-measure the candidate; a guard refusal raises (in a fleet, whatever the
        guard's mode: the rollout fails and the fleet reverts)."""
        verdict, shadow = self._shadow(cand, parent, kind)
        if verdict is not None and not verdict.ok and (self.cfg.guard.mode == "refuse" or fleet):
            self.gens.append_event({"event": "refused", "reason": "guard", "kind": kind, "donor": p.donor,
                                    "modules": [str(r) for r in p.refs], "violations": verdict.violations,
                                    "requested_by": requested_by, "parent": parent.id})
            self.metrics.swaps.labels(kind, "refused", "guard").inc()
            raise PreconditionFailed(f"the guard refused this transplant: {verdict.reason()}; "
                                     f"generation {parent.id} stays live")
        return verdict, shadow

    def _shadow(self, cand, parent, kind: str):
        """Probe the candidate before it goes live; the guard judges transplants (never reverts)."""
        if not self.quality.probes:
            return None, []
        base = {t: self.quality.baseline(parent.model, parent.id, t) for t in self.quality.tasks}
        shadow = {t: self.quality.measure(cand.model, None, t, "shadow") for t in self.quality.tasks}
        verdict = self.quality.judge(base, shadow) if kind == "transplant" else None
        return verdict, list(shadow.values())

    def _probe_generation(self, live, phase: str, donor: str | None = None) -> None:
        for t in self.quality.tasks:
            self._record_probe(live, self.quality.measure(live.model, live.id, t, phase), export=False)
        donor_acc = None
        if donor is not None and self.quality.tasks and donor in {d.name for d in self.donors.list()}:
            d = self.donors.get(donor)   # (a fleet replica may not have the donor another one used)
            donor_acc = {t: self.quality.donor_accuracy(donor, t, lambda: self._donor_model(d)) for t in self.quality.tasks}
        self._donor_acc_live = donor_acc
        self.quality.export(live.id, self.gens.records[live.id].parent, donor_acc)

    def _record_probe(self, live, m, export: bool = True) -> None:
        self.gens.add_quality(live.id, m.to_dict())
        if export and live.id == self.gens.live.id:
            self.quality.export(live.id, self.gens.records[live.id].parent, getattr(self, "_donor_acc_live", None))

    # ---- alerts (Alertmanager webhook) ---------------------------------------------------

    def on_alert(self, doc: dict) -> tuple[int, dict]:
        """Revert the live generation to its parent, once, when a rollback alert fires for
        it. Everything else is answered and changes nothing."""
        alerts = doc.get("alerts") if isinstance(doc, dict) else None
        if not isinstance(alerts, list) or not all(isinstance(a, dict) for a in alerts):
            self.quality.metrics.alerts.labels("malformed").inc()
            return 400, {"error": "expected an Alertmanager webhook body: {\"alerts\": [{\"status\", \"labels\", ...}]}"}
        from .fleet.etcd import Unavailable

        try:
            decisions = [self._alert(a) for a in alerts]
        except Unavailable as e:             # a fleet whose etcd is down: Alertmanager retries
            return 503, {"error": str(e)}
        return 200, {"decisions": decisions}

    def _alert(self, a: dict) -> dict:
        labels = a.get("labels") if isinstance(a.get("labels"), dict) else {}
        fp = str(a.get("fingerprint", ""))
        out = {"fingerprint": fp, "alertname": labels.get("alertname", ""), "action": "none"}

        def ignored(why: str) -> dict:
            self.quality.metrics.alerts.labels("ignored").inc()
            return dict(out, reason=why)

        if a.get("status") != "firing":
            return ignored(f"status is {a.get('status')!r}, not firing")
        if labels.get("alertname") not in self.cfg.rollback_alerts:
            return ignored(f"alert {labels.get('alertname')!r} is not a rollback alert ({', '.join(self.cfg.rollback_alerts)})")
        gen = labels.get("generation", "")
        if not str(gen).isdigit():
            return ignored("the alert has no numeric 'generation' label")
        gen = int(gen)
        if self.fleet is not None:
            action, why, new = self.fleet.alert(gen, {"fingerprint": fp, "alertname": labels.get("alertname"),
                                                      "task": labels.get("task")})
            if action == "none":
                return ignored(why)
            self.quality.metrics.alerts.labels("reverted").inc()
            return dict(out, action="reverted", reason=why, generation=new)
        with self.gens.lock:
            live = self.gens.live.id
            why = alerts.refusal(gen, live, self.gens.records, f"generation {gen} is not live (live is {live})")
            if why is not None:
                return ignored(why)
            res = self.revert(None, reason="alert", requested_by="alertmanager", why="alert",
                              extra={"fingerprint": fp, "alertname": labels.get("alertname"), "task": labels.get("task")})
        self.quality.metrics.alerts.labels("reverted").inc()
        return dict(out, action="reverted", reason=f"generation {gen} reverted to {res.record.reverted_to}",
                    generation=res.record.id)

    def generation(self, gen: int) -> Record:
        return self.gens.get(gen)

    def status(self) -> dict:
        return {"model": self.cfg.model, "model_path": str(self.loaded.path), "arch": self.table.arch,
                "live_generation": self.gens.live.id, "generations": len(self.gens.records),
                "donors": len(self.donors.list()), "health": "SERVING" if self.serving else "NOT_SERVING",
                "queue_depth": self.scheduler.depth, "max_batch_size": self.cfg.max_batch_size,
                "transplantable_modules": len(self.table.modules), "uptime_seconds": time.time() - self.started,
                "state_dir": str(self.cfg.state_dir),
                "fleet": self.cfg.fleet.name if self.cfg.fleet else "", "replica": self.fleet.name if self.fleet else ""}

