"""The experiment: the paper's tables on one (target, donor, task) setting, with the
controls the paper lacks.

For every decoding length L and transplant strength K it measures, on a dev and a
disjoint test split of the task: accuracy after transplanting the top-K modules of
each selector (paper-exact LAE, weight-difference norm, and any of selectors.py),
K random compatible modules (several draws), TIR and Recovery with paired bootstrap
intervals, retention on other tasks, and the attention/FFN composition of the top-K.
Best K is chosen on dev and reported on test; the paper's in-sample choice (best K
on the full set) is reported separately, labelled as such.

This module: selection and the run. config.py holds the configuration and inputs,
sweep.py the model states and their evaluation, numbers.py the arithmetic of the
results document, report.py its rendering, stats.py the bootstrap. Both models load once; each
distinct state is committed, evaluated once and reverted bitwise, however many
(method, K, L) rows name it.

Nothing here prints; `progress(stage, done, total)` reports where it is.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict

import torch

from .. import selectors as sel
from .. import sparse
from .. import transplant as tp
from ..arch import ModuleTable
from ..checkpoint import ModelTensors
from ..export import versions
from ..selection import random_k, top_k
from ..tasks import Task
from ..workflow import compatibility, open_model
from .config import EXTRAS, UNITS, ExperimentConfig, Progress, Selections, Workload, load_workload, resolve_ks
from .numbers import assemble
from .sweep import DEV, Evaluator, State, Sweep, extras_table, lowrank_rank


def compatible_table(table: ModuleTable, refs) -> ModuleTable:
    return ModuleTable(table.arch, table.source, table.layers_path, table.vocab_size, {r: table[r] for r in refs})



def blocks(work: Workload) -> dict[str, Task]:
    """The question blocks every state is evaluated on."""
    return {"dev": work.dev, "test": work.test, **work.retain, **{DEV + k: v for k, v in work.retain_dev.items()}}


# ---- the run ----------------------------------------------------------------------------

def select_all(cfg: ExperimentConfig, ev: sel.Evidence, ks: list[int], lengths: list[int],
               progress: Progress) -> Selections:
    s = Selections()
    for i, name in enumerate(cfg.methods):
        progress(f"selector {name}", i, len(cfg.methods))
        t0 = time.perf_counter()
        unit = name.removesuffix(EXTRAS)
        if unit in UNITS:     # every module; K sets the rank (lowrank) or the share of entries kept
            for L in lengths:
                for k in ks:
                    d = sparse.unit_density(ev.table, k)
                    key = sparse.learned_key(unit, L, d)
                    if unit in sparse.LEARNED and d is not None and key not in s.learned:
                        sp = sparse.Sparse(ev.table, ev.target, ev.donor_source())
                        s.learned[key] = sparse.learn(ev, L, unit, sp, init_density=d)
                    s.sets[(name, L, k)] = ev.refs()
                    if unit == "lowrank":
                        s.ranks[(name, L, k)] = lowrank_rank(ev.table, k)
                    else:
                        # a learned mask depends on L (the donor's answers); trim and drop do not
                        s.sparse[(name, L, k)] = None if d is None else (unit, d, L if unit in sparse.LEARNED else 0)
            s.seconds[name] = round(time.perf_counter() - t0, 3)
            continue
        base = name.removesuffix(EXTRAS)
        s.scores[name] = {}
        for L in lengths:
            if base in s.scores and L in s.scores[base]:
                s.scores[name][L] = s.scores[base][L]
            elif base in sel.LENGTH_FREE and s.scores[name]:
                s.scores[name][L] = next(iter(s.scores[name].values()))
            else:
                s.scores[name][L] = sel.scores(base, ev, L)
            for k in ks:
                s.sets[(name, L, k)] = top_k(s.scores[name][L], k)
        s.seconds[name] = round(time.perf_counter() - t0, 3)
    progress("selectors", len(cfg.methods), len(cfg.methods))
    s.traces = {k.replace("_trace", "@L"): v for k, v in ev._cache.items() if "_trace" in k}
    refs = ev.refs()
    for k in ks:
        s.random[k] = [random_k(refs, k, seed=_draw_seed(cfg.seed, k, d)) for d in range(cfg.seeds)]
    return s


def _draw_seed(seed: int, k: int, draw: int) -> int:
    return random.Random(f"{seed}/{k}/{draw}").randrange(2 ** 31)


def run(cfg: ExperimentConfig, progress: Progress | None = None) -> dict:
    """Run the whole experiment; returns the results document (built by `assemble`)."""
    cfg.validate()
    progress = progress or (lambda *_: None)
    t_start = time.perf_counter()
    progress("loading models", 0, 2)
    target, donor = open_model(cfg.target, cfg.allow_pickle), open_model(cfg.donor, cfg.allow_pickle)
    progress("loading models", 2, 2)
    compat = compatibility(target.table, donor.table)
    table = compatible_table(target.table, compat.compatible)
    m = len(table.modules)
    ks, notes = resolve_ks(cfg.ks, m)
    lengths = sorted(set(cfg.max_new_tokens))
    work = load_workload(cfg)
    evaluator = Evaluator(target.tokenizer, blocks(work), lengths, cfg.batch_size)
    digest = tp.model_digest(target.model)
    timings = {}

    progress("baselines", 0, 2)
    t0 = time.perf_counter()
    base_t, base_d = evaluator(target.model), evaluator(donor.model)
    timings["baselines"] = round(time.perf_counter() - t0, 2)
    progress("baselines", 2, 2)

    t0 = time.perf_counter()
    ev = sel.Evidence(target.model, donor.model, target.tokenizer, table, work.probe.prompts, max(lengths),
                      greedy_steps=cfg.greedy_steps or max([k for k in ks if k < m], default=m),
                      keep_prompts=list(work.keep))
    s = select_all(cfg, ev, ks, lengths, progress)
    timings["selection"] = round(time.perf_counter() - t0, 2)

    extras = extras_table(table, target.model, donor.model)
    sweep = Sweep(target.model, table, extras, ModelTensors(donor.model, cfg.donor), evaluator)
    sweep.sparse.learned.update(s.learned)
    sweep.cache[State(frozenset())] = base_t
    todo = list(dict.fromkeys([s.state(*key) for key in s.sets] + [d for k in ks for d in s.draws(k)]))
    t0 = time.perf_counter()
    for i, key in enumerate(todo):
        progress("transplant + evaluate", i, len(todo))
        sweep(key)
    progress("transplant + evaluate", len(todo), len(todo))
    timings["sweep"] = round(time.perf_counter() - t0, 2)
    restored = tp.model_digest(target.model) == digest

    doc = assemble(cfg, work, table, ks, lengths, base_t, base_d, s, sweep)
    doc["setting"].update(compatible_modules=m, dropped_ks=notes, model_states_evaluated=len(sweep.cache) + 1,
                          target_restored_bitwise=restored,
                          extras=[{"name": str(r), "key": i.weight_key} for r, i in sorted(extras.modules.items())])
    doc["selector_seconds"] = s.seconds
    doc["greedy_traces"] = s.traces
    doc["timings_s"] = dict(timings, total=round(time.perf_counter() - t_start, 2))
    doc["command"] = cfg.command()
    doc["argv"] = list(sys.argv)
    doc["versions"] = dict(versions(), torch_threads=torch.get_num_threads())
    doc["config"] = asdict(cfg)
    return doc

