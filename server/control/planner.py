"""What a transplant would change: validate the request, select modules (explicit, or a
task's ranking by any selector, optionally a retention floor choosing K), and build
the validated plan (whole modules, or low-rank factors). Nothing changes here."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transplant_core import front
from transplant_core import transplant as tp
from transplant_core.checkpoint import ModelTensors
from transplant_core.errors import Incompatible, InvalidArgument, PreconditionFailed
from transplant_core.mapped import release
from transplant_core.selectors import LENGTH_FREE, Evidence
from transplant_core.tasks import Task
from transplant_core.workflow import _compatible, compare, explicit_modules, rank, select

from ..donors import Donor


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
    retention_statistic: str = ""  # what retention measures: accuracy (""), likelihood or kl (front.STATISTICS)


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

    def selection(self, a: TransplantArgs) -> dict:
        """The selection evidence journaled with the generation."""
        k = next((p.k for p in self.front if p.chosen), a.k)     # a retention floor chose K
        out = {"method": "explicit" if a.modules else (self.selector or "lae"), "task": a.task, "k": k,
               "alignment": a.alignment or "free",
               "scores": {name: s for name, s, _ in self.ranked[:k]} if self.ranked else {}}
        if self.plan.casts:
            out["cast"] = self.plan.casts
        if self.front:
            out["front"] = {"floor": a.retention_floor, "statistic": a.retention_statistic or "accuracy",
                            "retain": self.retained, "why": self.front_why,
                            "points": [p.to_dict() for p in self.front]}
        if self.plan.factors:
            out["lowrank"] = {"rank": a.rank, "param_budget": a.param_budget, "ranks": self.plan.ranks,
                              "energy": self.plan.energy}
        if a.task:
            out["selected_on"] = ("probe split" if a.task.startswith("zoo:") else
                                  "even-numbered examples (evaluated on the odd ones)")
        return out


class Planner:
    def __init__(self, rt):
        self.rt = rt

    def plan(self, a: TransplantArgs) -> PlanResult:
        """Validate and select; nothing changes."""
        rt = self.rt
        donor = rt.donors.get(a.donor)
        if not donor.compat.usable:
            raise Incompatible(f"donor {donor.name} cannot give modules to the live model",
                               list(donor.compat.model_mismatches + donor.compat.mismatches))
        if bool(a.modules) == bool(a.task):
            raise InvalidArgument("give either modules or a task with k")
        live = rt.gens.live
        if a.modules:
            refs = explicit_modules(",".join(a.modules), donor.compat)
            if a.retention_floor or a.retain:
                raise InvalidArgument("a retention floor chooses K along a task's ranking: give a task and k, "
                                      "not modules")
            return PlanResult(donor, self._plan(a, donor, refs, live), [], live.id)
        if a.k < 1:
            raise InvalidArgument("k must be at least 1 with a task")
        if (a.retain or a.retention_statistic) and not a.retention_floor:
            raise InvalidArgument("retain and retention_statistic say what a retention floor measures: give "
                                  "retention_floor too")
        if a.task in a.retain:
            raise InvalidArgument(f"{a.task} is the task being transplanted; retain lists the other tasks to keep")
        probe = rt.selection_task(a.task, a.probe_prompts or rt.cfg.probe_prompts)
        selector = a.selector or "lae"
        if rt.on_vllm:
            return self._weight_only(a, donor, probe, selector, live)
        # hooks go on a private module tree; selectors that swap modules or take gradients
        # get private copies of the transplantable weights too (the live ones are shared)
        private = [] if selector == "lae" else [k for m in rt.table.modules.values() for k in m.keys]
        shadow = tp.fork(live.model, private)
        steps = a.max_new_tokens or rt.cfg.probe_max_new_tokens
        donor_model = rt.donor_model(donor)
        comparison = None
        if selector == "all":
            comparison = compare(shadow, rt.tokenizer, rt.table, donor_model, probe, donor.compat, steps, a.k)
            selector = comparison.chosen
        ranking = rank(shadow, rt.tokenizer, rt.table, donor_model, probe, donor.compat, steps, selector,
                       a.alignment or "free", k=a.k)
        points, why, k, retained = [], "", a.k, []
        if a.retention_floor:
            points, why, k, retained = self._front(a, donor, donor_model, ranking, live, probe, steps)
        refs = select(ranking, k)
        ranked = [(str(r), s, rt.table[r].nbytes) for r, s in ranking.ranking()]
        return PlanResult(donor, self._plan(a, donor, refs, live), ranked, live.id, selector, comparison,
                          points, why, retained)

    def _weight_only(self, a: TransplantArgs, donor: Donor, probe: Task, selector: str, live) -> PlanResult:
        """On vLLM, which holds the only copy of the model: selectors that read weights alone,
        the live weights from the checkpoint's files (and the store) and the donor's from its
        files, module by module; those that need both models' activations are refused."""
        rt = self.rt
        if selector not in LENGTH_FREE:
            raise InvalidArgument(
                f"selector {selector!r} needs both models' activations, and on the vLLM engine vLLM holds the only "
                f"copy of the model; rank offline with `transplant analyze --target {rt.cfg.model} --donor {donor.path} "
                f"--task {a.task} --k {a.k} --selector {selector}` (a process that loads both models and exits), "
                f"then transplant its choice with --modules; or use a weight-only selector here "
                f"({', '.join(LENGTH_FREE)})",
                field="selector")
        if a.retention_floor:
            raise InvalidArgument("a retention floor measures each candidate K on both models' outputs, which the "
                                  "vLLM engine does not hold here; choose K offline (`transplant analyze`) and give "
                                  "k or --modules", field="retention_floor")
        ev = Evidence(live.model, None, rt.tokenizer, _compatible(rt.table, donor.compat), probe.prompts, 1)
        ev._cache["src"] = donor.checkpoint.tensors          # the donor's files, read per module
        try:
            ranking = rank(None, rt.tokenizer, rt.table, None, probe, donor.compat, 1, selector, evidence=ev)
        finally:
            release(live.model)
        ranked = [(str(r), s, rt.table[r].nbytes) for r, s in ranking.ranking()]
        refs = select(ranking, a.k)
        return PlanResult(donor, self._plan(a, donor, refs, live), ranked, live.id, selector)

    def _front(self, a: TransplantArgs, donor: Donor, donor_model, ranking, live, probe: Task, steps: int):
        """Measure Recovery (on the selection prompts) and retention (on the retained tasks'
        selection prompts) of the top-K for K up to a.k, each built off to the side; return
        the points, why, and the K with the largest Recovery whose retention stays at the floor."""
        rt = self.rt
        if not 0.0 < a.retention_floor <= 1.0:
            raise InvalidArgument(f"retention_floor must be in (0, 1] (0 = off), got {a.retention_floor!r}")
        statistic = a.retention_statistic or "accuracy"
        if statistic not in front.STATISTICS:
            raise InvalidArgument(f"retention_statistic must be one of {', '.join(front.STATISTICS)}, got "
                                  f"{a.retention_statistic!r}", field="retention_statistic")
        retain = list(dict.fromkeys(a.retain or [p.task for p in rt.cfg.probes if p.task != a.task]))
        if not retain:
            raise InvalidArgument("a retention floor needs tasks to retain: give retain (--retain TASK,...) or "
                                  "configure probes")
        n = a.probe_prompts or rt.cfg.probe_prompts
        tasks = {t: rt.selection_task(t, n) for t in retain}
        order = [r for r, _ in ranking.ranking()]

        def build(k: int):
            return tp.derive(live.model, self._plan(a, donor, order[:k], live))[0]

        points = front.measure(build, live.model, donor_model, rt.tokenizer, probe, tasks,
                               front.ks_up_to(min(a.k, len(order))), rt.cfg.eval_max_new_tokens, statistic=statistic)
        chosen, why = front.choose(points, a.retention_floor)
        if chosen is None:
            raise PreconditionFailed(f"{why}; lower the floor or retain fewer tasks; nothing changed")
        return points, f"{why} (retained: {', '.join(retain)})", chosen.k, retain

    def _plan(self, a: TransplantArgs, donor: Donor, refs, live) -> tp.Plan:
        """The validated plan: whole modules, or (a rank or a parameter budget) the live
        generation's weights moved by the low-rank factors of their difference to the donor's."""
        if a.rank < 0 or a.param_budget < 0:
            raise InvalidArgument("rank and param_budget must be >= 0 (0 = a full-module transplant)")
        p = dataclasses.replace(tp.plan(self.rt.table, donor.checkpoint.tensors, refs, a.alpha, cast=a.cast),
                                donor=donor.name)
        if a.rank or a.param_budget:
            try:
                p = tp.lowrank(p, ModelTensors(live.model), rank=a.rank or None, budget=a.param_budget or None)
            finally:
                release(live.model)          # a mapped base (vLLM): the pages just read go back
        return p
