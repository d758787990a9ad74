"""The experiment's numbers: every row (method, L, K) against the baselines, best K
chosen three ways, the sweep summary and the verdicts on what the issue hopes for.

Input: per-state outcomes (sweep.py), the selections (config.Selections);
output: the plain results document that report.py renders. Nothing here
evaluates a model or prints.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import selectors as sel
from .stats import (Boot, accuracy_stat, difference_stat, recovery_stat, retention_stat, spread,
                               tir_stat)
from .config import EXTRAS, REFERENCES, UNITS  # noqa: F401 - named in the results document
from .sweep import DEV
from ..metrics import recovery, retention, tir

if TYPE_CHECKING:
    from .config import Selections, Workload
    from .sweep import Sweep

SAFE = 0.95      # the retention-safe K rule: every other task keeps >= 95% of its dev accuracy

SPLITS = ("dev", "test", "full")


def _split(outcome_l: dict, split: str) -> np.ndarray:
    if split == "full":
        return np.concatenate([outcome_l["dev"], outcome_l["test"]]).astype(float)
    return outcome_l[split].astype(float)


def _composition(refs) -> dict:
    out = {"attention": 0, "ffn": 0, "other": 0}
    for r in refs:
        out[r.group] += 1
    return out


class Numbers:
    """Per-L vectors and bootstraps, and the stats of one row against the baselines."""

    def __init__(self, cfg, work: Workload, L: int, base_t, base_d):
        self.L, self.t, self.d = L, base_t[L], base_d[L]
        self.boots = {sp: Boot.make(len(_split(self.t, sp)), cfg.n_boot, cfg.seed + i)
                      for i, sp in enumerate(SPLITS)}
        self.rboots = {r: Boot.make(len(self.t[r]), cfg.n_boot, cfg.seed + 10 + i)
                       for i, r in enumerate(work.retain)}
        self.retain = list(work.retain)

    def main(self, after: dict, refs_vs: dict[str, dict]) -> dict:
        out = {}
        for sp in SPLITS:
            a, t, d, b = _split(after, sp), _split(self.t, sp), _split(self.d, sp), self.boots[sp]
            row = {"accuracy": accuracy_stat(a, b), "tir": tir_stat(a, t, b), "recovery": recovery_stat(a, t, d, b)}
            row["vs"] = {name: difference_stat(a, _split(other, sp), b) for name, other in refs_vs.items()}
            out[sp] = row
        return out

    def retention(self, after: dict) -> dict:
        """Per retention task: accuracy and retention on its test questions (with
        intervals), and the retention point value on its dev questions."""
        out = {}
        for r in self.retain:
            b = self.rboots[r]
            out[r] = {"accuracy": accuracy_stat(after[r].astype(float), b),
                      "retention": retention_stat(after[r].astype(float), self.t[r].astype(float), b),
                      "retention_dev": retention(float(after[DEV + r].mean()), float(self.t[DEV + r].mean()))}
        return out


def _mean_outcome(outcomes: list[dict]) -> dict:
    return {b: np.mean([o[b].astype(float) for o in outcomes], axis=0) for b in outcomes[0]}


def _draw_points(draws: list[dict], t: dict, d: dict) -> dict:
    out = {}
    for sp in SPLITS:
        accs = [float(_split(o, sp).mean()) for o in draws]
        ta, da = float(_split(t, sp).mean()), float(_split(d, sp).mean())
        out[sp] = {"accuracy": spread(accs), "tir": spread([tir(a, ta) for a in accs]),
                   "recovery": spread([recovery(a, ta, da) for a in accs])}
    return out


def _retention_summary(ret: dict) -> dict:
    vals = [v["retention"]["value"] for v in ret.values() if v["retention"]["value"] is not None]
    return {"mean": float(np.mean(vals)) if vals else None, "min": float(min(vals)) if vals else None}


def assemble(cfg, work, table, ks, lengths, base_t, base_d, s: Selections, sweep: Sweep) -> dict:
    m = len(table.modules)
    doc = {"setting": _setting(cfg, work, table, lengths), "baselines": {}, "rows": [], "scores": {},
           "best_k": [], "summary": []}
    for L in lengths:
        num = Numbers(cfg, work, L, base_t, base_d)
        doc["baselines"][str(L)] = _baselines(num, work, base_t[L], base_d[L])
        rand = {k: _mean_outcome([sweep(d)[L] for d in s.draws(k)]) for k in ks}
        for k in ks:
            draws = [sweep(d)[L] for d in s.draws(k)]
            row = {"method": "random", "L": L, "k": k, "modules": [[str(r) for r in d] for d in s.random[k]],
                   "composition": _composition(s.random[k][0]) if cfg.seeds == 1 else None,
                   "split": num.main(rand[k], {}), "draws": _draw_points(draws, num.t, num.d),
                   "retention": num.retention(rand[k])}
            row["retention_summary"] = _retention_summary(row["retention"])
            doc["rows"].append(row)
        for name in cfg.methods:
            if name in s.scores:
                doc["scores"].setdefault(name, {})[str(L)] = {str(r): v for r, v in s.scores[name][L].items()}
            for k in ks:
                refs = s.sets[(name, L, k)]
                after = sweep(s.state(name, L, k))[L]
                vs = {"random": rand[k]}
                for ref_name in REFERENCES:
                    if ref_name != name:
                        vs[ref_name] = sweep(s.state(ref_name, L, k))[L]
                row = {"method": name, "L": L, "k": k, "modules": [str(r) for r in refs],
                       "rank": s.state(name, L, k).rank, "composition": _composition(refs),
                       "density": (s.state(name, L, k).sparse or (None, None))[1],
                       "split": num.main(after, vs), "retention": num.retention(after)}
                row["retention_summary"] = _retention_summary(row["retention"])
                doc["rows"].append(row)
        doc["best_k"] += _best_k(doc["rows"], L, ("random",) + cfg.methods)
        doc["summary"] += _sweep_summary(num, L, ks, cfg.methods, s, sweep, rand, m)
    doc["verdicts"] = verdicts(doc, m)
    return doc


def _setting(cfg, work: Workload, table, lengths) -> dict:
    return {"target": cfg.target, "donor": cfg.donor, "task": cfg.task, "lengths": lengths,
            "splits": {"dev": len(work.dev), "test": len(work.test), "probe": len(work.probe), "keep": len(work.keep),
                       "probe_source": "zoo probe split" if cfg.task.startswith("zoo:") else "first questions of the dev half"},
            "retain": {k: len(v) for k, v in work.retain.items()},
            "retain_dev": {k: len(v) for k, v in work.retain_dev.items()}, "random_draws": cfg.seeds,
            "bootstrap_resamples": cfg.n_boot, "methods": list(cfg.methods),
            "method_descriptions": {k: _describe(k) for k in cfg.methods},
            "arch": table.arch, "modules": [str(r) for r in table.refs()]}


def _describe(name: str) -> str:
    base = UNITS.get(name.removesuffix(EXTRAS)) or sel.DESCRIPTIONS[name.removesuffix(EXTRAS)]
    return base + (", plus every differing norm, embedding and output-head weight" if name.endswith(EXTRAS) else "")


def _baselines(num: Numbers, work: Workload, t: dict, d: dict) -> dict:
    out = {"target": {}, "donor": {}, "retain_target": {}, "retain_donor": {}}
    for sp in SPLITS:
        out["target"][sp] = accuracy_stat(_split(t, sp), num.boots[sp])
        out["donor"][sp] = accuracy_stat(_split(d, sp), num.boots[sp])
        out.setdefault("donor_minus_target", {})[sp] = difference_stat(_split(d, sp), _split(t, sp), num.boots[sp])
    for r in work.retain:
        out["retain_target"][r] = accuracy_stat(t[r].astype(float), num.rboots[r])
        out["retain_donor"][r] = accuracy_stat(d[r].astype(float), num.rboots[r])
    gap = out["donor_minus_target"]["dev"]["value"]
    out["warning"] = None if gap > 0 else (
        f"the donor is not better than the target on the dev split (donor - target = {gap:+.3f}); "
        "the paper moves modules from the better model to the worse one: swap --target and --donor")
    return out


def _pick(rows: list[dict], split: str) -> dict:
    """The row with the highest accuracy on `split`; ties go to the smaller K."""
    return max(rows, key=lambda r: (r["split"][split]["accuracy"]["value"], -r["k"]))


def _safe(row: dict) -> bool:
    """Every retention task keeps >= SAFE of its dev accuracy (a task the target scores 0
    on cannot lose anything)."""
    return all(v["retention_dev"] is None or v["retention_dev"] >= SAFE for v in row["retention"].values())


def _held_out(row: dict) -> dict:
    test = row["split"]["test"]
    return {"k": row["k"], "reported_on": "test", **{k: test[k] for k in ("accuracy", "tir", "recovery")},
            "vs": test.get("vs", {}), "retention": row["retention_summary"],
            "retention_by_task": {t: v["retention"] for t, v in row["retention"].items()}}


def _best_k(rows: list[dict], L: int, methods) -> list[dict]:
    """Per method, K chosen three ways: on dev accuracy (reported on test); on dev
    accuracy among the retention-safe K (reported on test; None if no K is safe); on the
    full set, as the paper does (in-sample)."""
    out = []
    for name in methods:
        mine = [r for r in rows if r["method"] == name and r["L"] == L]
        held, paper = _pick(mine, "dev"), _pick(mine, "full")
        safe = [r for r in mine if _safe(r)]
        out.append({"method": name, "L": L,
                    "held_out": dict(_held_out(held), chosen_on="dev accuracy"),
                    "held_out_safe": dict(_held_out(_pick(safe, "dev")), chosen_on=(
                        f"dev accuracy among K keeping >= {SAFE:.0%} on every other task's dev questions"))
                    if safe else None,
                    "in_sample": {"k": paper["k"], "chosen_on": "full", "reported_on": "full (in-sample, as the paper)",
                                  **{k: paper["split"]["full"][k] for k in ("accuracy", "tir", "recovery")},
                                  "retention": paper["retention_summary"]}})
    return out


def _sweep_summary(num: Numbers, L: int, ks, methods, s: Selections, sweep: Sweep, rand, m: int) -> list[dict]:
    """Per method: accuracy averaged over the K sweep (a per-question mean over K, so it
    has a paired interval), its difference to random / LAE / dW, and the smallest K
    that reaches Recovery >= 80% on the full set."""
    def curve(name):
        if name == "random":
            return {b: np.mean([rand[k][b] for k in ks], axis=0) for b in ("dev", "test")}
        return {b: np.mean([sweep(s.state(name, L, k))[L][b].astype(float) for k in ks], axis=0)
                for b in ("dev", "test")}

    curves = {name: curve(name) for name in ("random",) + tuple(methods)}
    out = []
    for name, c in curves.items():
        row = {"method": name, "L": L, "mean_over_k": {}}
        for sp in SPLITS:
            a, b = _split(c, sp), num.boots[sp]
            row["mean_over_k"][sp] = {"accuracy": accuracy_stat(a, b),
                                      "vs": {o: difference_stat(a, _split(curves[o], sp), b)
                                             for o in ("random", "lae", "dw") if o != name and o in curves}}
        row["k80"] = None
        for k in ks:
            if name == "random":
                rec = recovery(float(_split(rand[k], "full").mean()), float(_split(num.t, "full").mean()),
                               float(_split(num.d, "full").mean()))
            else:
                rec = recovery(float(_split(sweep(s.state(name, L, k))[L], "full").mean()),
                               float(_split(num.t, "full").mean()), float(_split(num.d, "full").mean()))
            if rec is not None and rec >= 80:
                row["k80"] = k
                break
        row["quarter"] = m // 4
        out.append(row)
    return out


def verdicts(doc: dict, m: int) -> dict:
    """The three outcomes the issue hopes for, stated as measured."""
    beats, loses = [], []
    for r in doc["rows"]:
        if r["method"] == "lae" and r["k"] < m:
            d = r["split"]["full"]["vs"]["random"]
            if d["ci95"] and d["ci95"][0] > 0:
                beats.append((r["L"], r["k"]))
            if d["ci95"] and d["ci95"][1] < 0:
                loses.append((r["L"], r["k"]))
    k80 = {f"{x['method']}@L{x['L']}": x["k80"] for x in doc["summary"]}
    quarter = {k: v is not None and v <= m // 4 for k, v in k80.items()}
    ret = {f"{b['method']}@L{b['L']}": b["held_out"]["retention"]["min"] for b in doc["best_k"]}
    both = {}
    for b in doc["best_k"]:
        h = b["held_out_safe"]
        rec, keep = (h["recovery"]["value"], h["retention"]["min"]) if h else (None, None)
        both[f"{b['method']}@L{b['L']}"] = {
            "k": h["k"] if h else None, "recovery_test": rec, "retention_min_test": keep,
            "all_three": bool(h) and rec is not None and rec >= 80 and h["k"] <= m // 4
            and (keep is None or keep >= SAFE)}
    return {"lae_beats_random_beyond_interval": [f"L={L} K={k}" for L, k in beats],
            "lae_below_random_beyond_interval": [f"L={L} K={k}" for L, k in loses],
            "smallest_k_recovery_80_full": k80, "recovery_80_within_quarter": quarter,
            "min_retention_at_best_k_test": ret,
            "retention_95": {k: v is not None and v >= SAFE for k, v in ret.items()},
            "retention_safe_k": both}
