"""The experiment's outputs: results.json, report.md and PNG plots, from the results
document experiment.run returns. Nothing here computes a number the document lacks."""
from __future__ import annotations

import json
from pathlib import Path

from .numbers import EXTRAS, UNITS
from ..front import choose, front_rows
from ..refs import ModuleRef

COLORS = {"lae": "tab:blue", "random": "tab:gray", "dw": "tab:orange", "lae_tf": "tab:cyan",
          "lae_kind": "tab:purple", "dwx": "tab:brown", "taylor": "tab:olive", "swap": "tab:pink",
          "loo": "tab:red", "greedy": "tab:green", "greedy_keep": "darkgreen", "lowrank": "black"}


def _style(method: str) -> tuple[str | None, str]:
    """(colour, line style): a +x variant is drawn dashed in its base method's colour."""
    return COLORS.get(method.removesuffix(EXTRAS)), "--" if method.endswith(EXTRAS) else "-"


# ---- formatting -------------------------------------------------------------------------

def fmt(stat: dict | None, pct: bool = False, digits: int = 3) -> str:
    """'0.520 [0.460, 0.580]', '71.4% [50.0, 92.0]' or 'undefined'."""
    if stat is None or stat.get("value") is None:
        return "undefined"
    d = 1 if pct else digits
    v = f"{stat['value']:.{d}f}" + ("%" if pct else "")
    ci = stat.get("ci95")
    return v + (f" [{ci[0]:.{d}f}, {ci[1]:.{d}f}]" if ci else "")


def _num(x, spec=".3f") -> str:
    return "undefined" if x is None else format(x, spec)


def _spread(sp: dict, pct: bool = False) -> str:
    if sp["mean"] is None:
        return "undefined"
    d = 1 if pct else 3
    s = f"{sp['mean']:.{d}f} ± {sp['sd']:.{d}f} (min {sp['min']:.{d}f}, max {sp['max']:.{d}f})"
    return s + (f", {sp['undefined_draws']} draws undefined" if sp["undefined_draws"] else "")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def best_selector(doc: dict, L: int, modules_only: bool = False) -> str | None:
    """The non-reference method with the highest DEV accuracy averaged over K (chosen
    on dev, so that the test numbers shown for it stay held out); with `modules_only`,
    among those that move whole modules (not lowrank)."""
    rows = [r for r in doc["summary"] if r["L"] == L and r["method"] not in ("lae", "dw", "random")
            and not (modules_only and r["method"].removesuffix(EXTRAS) in UNITS)]
    if not rows:
        return None
    return max(rows, key=lambda r: r["mean_over_k"]["dev"]["accuracy"]["value"])["method"]


# ---- report.md --------------------------------------------------------------------------

def report_markdown(doc: dict, plots: dict[str, str]) -> str:
    st = doc["setting"]
    L_all = st["lengths"]
    lines = [f"# Transplant experiment: `{st['target']}` <- `{st['donor']}` on `{st['task']}`", "",
             f"Regenerate: `{doc['command']}`", "",
             f"- {st['arch']}, {st['compatible_modules']} compatible modules; K swept over "
             f"{sorted({r['k'] for r in doc['rows']})}; decoding lengths (max new tokens) {L_all}",
             f"- questions: dev {st['splits']['dev']}, test {st['splits']['test']} (disjoint); selectors profile "
             f"{st['splits']['probe']} probe prompts ({st['splits']['probe_source']}), never the dev/test questions",
             "- retention tasks: " + (", ".join(f"`{k}` ({v} test questions, {st['retain_dev'][k]} dev)"
                                              for k, v in st["retain"].items()) or "none")
             + "; always scored at the longest decoding length (the length is the task's budget, not theirs)",
             f"- random control: {st['random_draws']} draws per K; intervals: 95% paired percentile bootstrap, "
             f"{st['bootstrap_resamples']} resamples of the questions",
             f"- target restored bitwise after every transplant: {st['target_restored_bitwise']}; "
             f"{st['model_states_evaluated']} model states evaluated in {doc['timings_s']['total']:.0f} s",
             "- non-linear parameters that differ (what the `+x` methods copy too): "
             + (", ".join(f"`{x['key']}`" for x in st.get("extras", [])) if st.get("extras")
                else "none, so every `+x` row equals its base method's"),
             *[f"- note: {n}" for n in st["dropped_ks"]], "",
             "Methods:", *[f"- `{k}`: {v}" for k, v in st["method_descriptions"].items()],
             "- `random`: K compatible modules drawn uniformly (mean over draws)", ""]
    for L in L_all:
        lines += _section(doc, L, plots)
    lines += _verdicts(doc)
    v = doc["versions"]
    lines += ["", "## Reproduce", "", "```", doc["command"], "```", "",
              f"Versions: transplant {v['transplant']}, torch {v['torch']}, transformers {v['transformers']}, "
              f"Python {v['python']}, {v.get('torch_threads', '?')} torch threads. Timings (s): "
              + ", ".join(f"{k} {x}" for k, x in doc["timings_s"].items())
              + ". Selector seconds: " + ", ".join(f"{k} {x}" for k, x in doc["selector_seconds"].items()) + ".", ""]
    return "\n".join(lines)


def _section(doc: dict, L: int, plots: dict) -> list[str]:
    b = doc["baselines"][str(L)]
    rows = [r for r in doc["rows"] if r["L"] == L]
    methods = ["lae", "random", "dw"] + [m for m in doc["setting"]["methods"] if m not in ("lae", "dw")]
    out = [f"## Max new tokens {L}", "", "### Baselines", ""]
    out += _table(["model", "dev", "test", "full"],
                  [[f"target `{doc['setting']['target']}`"] + [fmt(b["target"][s]) for s in ("dev", "test", "full")],
                   [f"donor `{doc['setting']['donor']}`"] + [fmt(b["donor"][s]) for s in ("dev", "test", "full")],
                   ["donor - target"] + [fmt(b["donor_minus_target"][s]) for s in ("dev", "test", "full")]])
    if b["retain_target"]:
        out += ["", "Retention tasks (accuracy before any transplant):", ""]
        out += _table(["task", "target", "donor"],
                      [[f"`{t}`", fmt(b["retain_target"][t]), fmt(b["retain_donor"][t])] for t in b["retain_target"]])
    if b["warning"]:
        out += ["", f"**Warning:** {b['warning']}."]
    out += ["", "### Best K chosen on dev, reported on test (held out)", ""]
    best = {x["method"]: x for x in doc["best_k"] if x["L"] == L}
    out += _table(["method", "K", "accuracy", "TIR", "Recovery", "minus random at that K", "retention min (mean)"],
                  [[f"`{m}`", str(best[m]["held_out"]["k"]), fmt(best[m]["held_out"]["accuracy"]),
                    fmt(best[m]["held_out"]["tir"]), fmt(best[m]["held_out"]["recovery"], pct=True),
                    fmt(best[m]["held_out"]["vs"].get("random")) if m != "random" else "",
                    f"{_num(best[m]['held_out']['retention']['min'])} ({_num(best[m]['held_out']['retention']['mean'])})"]
                   for m in methods if m in best])
    if doc["setting"]["retain"]:
        out += ["", "### Best K among those that keep >= 95% on every other task (both chosen on dev), "
                    "reported on test", ""]
        out += _table(["method", "K", "accuracy", "TIR", "Recovery", "retention min (mean)"],
                      [[f"`{m}`"] + (["no K qualifies", "", "", "", ""] if best[m]["held_out_safe"] is None else
                                     [str(h["k"]), fmt(h["accuracy"]), fmt(h["tir"]), fmt(h["recovery"], pct=True),
                                      f"{_num(h['retention']['min'])} ({_num(h['retention']['mean'])})"])
                       for m in methods if m in best for h in [best[m]["held_out_safe"]]])
    out += ["", "### Best K on the full set (in-sample, as the paper chooses it)", ""]
    out += _table(["method", "Acc_target", "Acc_donor", "Acc_after", "best K", "TIR", "Recovery"],
                  [[f"`{m}`", _num(b["target"]["full"]["value"]), _num(b["donor"]["full"]["value"]),
                    _num(best[m]["in_sample"]["accuracy"]["value"]), str(best[m]["in_sample"]["k"]),
                    _num(best[m]["in_sample"]["tir"]["value"]),
                    _num(best[m]["in_sample"]["recovery"]["value"], ".1f")] for m in methods if m in best])
    out += ["", "### Accuracy averaged over the K sweep (test split), and the smallest K reaching 80% Recovery", ""]
    summ = {x["method"]: x for x in doc["summary"] if x["L"] == L}
    out += _table(["method", "mean accuracy over K", "minus random", "minus lae", "minus dw", "K for Recovery >= 80%"],
                  [[f"`{m}`", fmt(summ[m]["mean_over_k"]["test"]["accuracy"])]
                   + [fmt(summ[m]["mean_over_k"]["test"]["vs"].get(o)) if o != m else "" for o in ("random", "lae", "dw")]
                   + [str(summ[m]["k80"]) if summ[m]["k80"] is not None else "not reached"] for m in methods if m in summ])
    out += ["", "### Sweep over K (full set: dev + test)", ""]
    key = ["lae", "random", "dw"]
    hi = best_selector(doc, L)
    if hi:
        key.append(hi)
        out += [f"Shown: the references and `{hi}`, the other selector with the highest dev accuracy averaged "
                "over K (chosen on dev, so its test numbers stay held out).", ""]
    out += _sweep_table(rows, key, with_retention=True)
    others = [m for m in methods if m not in key]
    if others:
        out += ["", "<details><summary>Every other selector</summary>", ""]
        out += _sweep_table(rows, others, with_retention=True)
        out += ["", "</details>"]
    if doc["setting"]["retain"]:
        out += ["", "### Retention on each other task (accuracy after / before; test split of each task)", ""]
        out += _retention_table(rows, key, list(doc["setting"]["retain"]))
    if doc["setting"]["retain"]:
        out += ["", "### Recovery against retention: the front", ""]
        out += [f"Each K as a point (test Recovery, worst retention over {', '.join(doc['setting']['retain'])}); the "
                "front is the K no other K of the same method beats on both. The last column is what a plan with "
                "`--retention-floor 0.95` would take along that front (descriptive: chosen on test numbers; the "
                "held-out choice is the table of retention-safe K above).", ""]
        out += _table(["method", "front: K (Recovery, retention min)", "largest Recovery with retention >= 0.95"],
                      [[f"`{m}`", ", ".join(f"{p.k} ({_num(p.recovery, '.1f')}%, {_num(p.retention, '.2f')})"
                                            for p in pts if p.on_front), _floor_cell(pts, 0.95)]
                       for m in methods for pts in [front_rows(doc["rows"], m, L)] if pts])
    out += ["", "### Composition of the top-K (attention / FFN modules)", ""]
    ks = sorted({r["k"] for r in rows})
    comp = {(r["method"], r["k"]): r["composition"] for r in rows if r["composition"]}
    sel_methods = [m for m in methods if m != "random" and m.removesuffix(EXTRAS) not in UNITS
                   and not m.endswith(EXTRAS)]
    out += _table(["K"] + [f"`{m}`" for m in sel_methods],
                  [[str(k)] + [f"{comp[(m, k)]['attention']} / {comp[(m, k)]['ffn']}" for m in sel_methods] for k in ks])
    lae_top = next((r for r in rows if r["method"] == "lae" and r["k"] == ks[min(len(ks) - 1, 2)]), None)
    if lae_top:
        out += ["", f"LAE's top {lae_top['k']}: " + ", ".join(f"`{x}`" for x in lae_top["modules"])]
    out += ["", "### Plots", ""]
    for name in ("curves", "selectors", "retention", "front", "scores", "selector_scores"):
        p = plots.get(f"{name}_L{L}")
        if p:
            out += [f"![{name}, max new tokens {L}]({p})", ""]
    return out


def _sweep_table(rows: list[dict], methods: list[str], with_retention: bool) -> list[str]:
    body = []
    ks = sorted({r["k"] for r in rows})
    for k in ks:
        for m in methods:
            r = next((x for x in rows if x["method"] == m and x["k"] == k), None)
            if r is None:
                continue
            f = r["split"]["full"]
            acc = fmt(f["accuracy"])
            if m == "random":
                acc += f"; draws {_spread(r['draws']['full']['accuracy'])}"
            ret = r["retention_summary"]
            label = f"`{m}`" + (f" (rank {r['rank']})" if r.get("rank") else "")
            body.append([str(k), label, acc, fmt(f["tir"]), fmt(f["recovery"], pct=True),
                         fmt(f["vs"].get("random")) if m != "random" else "",
                         f"{_num(ret['min'])} ({_num(ret['mean'])})"])
    return _table(["K", "method", "accuracy", "TIR", "Recovery", "minus random", "retention min (mean)"], body)


def _retention_table(rows: list[dict], methods: list[str], tasks: list[str]) -> list[str]:
    body = []
    for k in sorted({r["k"] for r in rows}):
        for m in methods:
            r = next((x for x in rows if x["method"] == m and x["k"] == k), None)
            if r is not None:
                body.append([str(k), f"`{m}`"] + [fmt(r["retention"][t]["retention"]) for t in tasks])
    return _table(["K", "method"] + [f"`{t}`" for t in tasks], body)


def _verdicts(doc: dict) -> list[str]:
    v = doc["verdicts"]
    q = doc["setting"]["compatible_modules"] // 4
    out = ["## What was hoped for, as measured", "",
           "- LAE beats random by more than the interval (paired difference on the full set excludes 0) at: "
           + (", ".join(v["lae_beats_random_beyond_interval"]) or "no K"),
           "- LAE is below random beyond the interval at: " + (", ".join(v["lae_below_random_beyond_interval"]) or "no K"),
           "", f"Recovery >= 80% with at most a quarter of the modules (K <= {q}); retention >= 95% on every other "
           "task; and all three at once, with K chosen on dev among the retention-safe K and checked on test:", ""]
    rows, dagger = [], False
    for key, k80 in v["smallest_k_recovery_80_full"].items():
        method = key.split("@")[0]
        unit = method.removesuffix(EXTRAS) in UNITS
        dagger |= unit
        safe = v["retention_safe_k"].get(key)
        rows.append([f"`{method}`{' †' if unit else ''}", key.split("@L")[1],
                     f"{k80 if k80 is not None else 'never'} ({'yes' if v['recovery_80_within_quarter'][key] else 'no'})",
                     f"{_num(v['min_retention_at_best_k_test'].get(key))} "
                     f"({'yes' if v['retention_95'].get(key) else 'no'})"]
                    + ([f"K={safe['k']}: Recovery {_num(safe['recovery_test'], '.1f')}%, retention "
                        f"{_num(safe['retention_min_test'])} ({'yes' if safe['all_three'] else 'no'})"]
                       if safe and safe["k"] is not None else ["no K is retention-safe (no)" if safe else ""]))
    out += _table(["method", "max new tokens", "smallest K with Recovery >= 80%, full set (K <= quarter?)",
                   "retention min at the dev-chosen K, test (>= 95%?)", "retention-safe K (all three?)"], rows)
    if dagger:
        out += ["", "† K is a budget, not a module count: the method touches every module, with as many numbers "
                "as K average modules hold."]
    return out


# ---- plots ------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows, method, metric, split="full"):
    pts = [(r["k"], r["split"][split][metric]) for r in rows if r["method"] == method]
    pts.sort(key=lambda x: x[0])
    k = [p[0] for p in pts if p[1]["value"] is not None]
    v = [p[1]["value"] for p in pts if p[1]["value"] is not None]
    lo = [p[1]["ci95"][0] if p[1]["ci95"] else p[1]["value"] for p in pts if p[1]["value"] is not None]
    hi = [p[1]["ci95"][1] if p[1]["ci95"] else p[1]["value"] for p in pts if p[1]["value"] is not None]
    return k, v, lo, hi


def _yerr(v, lo, hi):
    # a percentile interval of a ratio need not contain the point value: clip, never negative
    return [[max(0.0, a - b) for a, b in zip(v, lo)], [max(0.0, b - a) for a, b in zip(v, hi)]]


def _draw(ax, rows, method, metric, thin=False, band=False):
    k, v, lo, hi = _series(rows, method, metric)
    if not k:
        return
    c, ls = _style(method)
    if band:
        ax.fill_between(k, lo, hi, color=c, alpha=0.25, label=f"{method} 95% CI")
        ax.plot(k, v, "o--", color=c, label=f"{method} (mean of draws)")
    else:
        ax.errorbar(k, v, yerr=_yerr(v, lo, hi), fmt="o", ls=ls, color=c, capsize=3, lw=1 if thin else 2,
                    ms=3 if thin else 5, label=method, alpha=0.8 if thin else 1)


def curves_plot(doc, L, path: Path, methods, title_extra="") -> Path:
    plt = _plt()
    rows = [r for r in doc["rows"] if r["L"] == L]
    ks = sorted({r["k"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric, ylab in zip(axes, ("accuracy", "tir", "recovery"), ("accuracy after (full set)", "TIR", "Recovery (%)")):
        for m in methods:
            _draw(ax, rows, m, metric, thin=m not in ("lae", "dw"), band=m == "random")
        if not any(r["split"]["full"][metric]["value"] is not None for r in rows):
            ax.text(0.5, 0.5, f"{metric.upper()} undefined\n(" + ("target accuracy is 0" if metric == "tir"
                    else "target and donor tie") + ")", ha="center", va="center", transform=ax.transAxes)
        b = doc["baselines"][str(L)]
        if metric == "accuracy":
            ax.axhline(b["target"]["full"]["value"], color="k", ls=":", lw=1, label="target")
            ax.axhline(b["donor"]["full"]["value"], color="k", ls="--", lw=1, label="donor")
        if metric == "recovery":
            ax.axhline(100, color="k", ls="--", lw=1)
            ax.axhline(80, color="k", ls=":", lw=1)
        if metric == "tir":
            ax.axhline(1, color="k", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (modules transplanted)")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    st = doc["setting"]
    fig.suptitle(f"{st['target']} <- {st['donor']} on {st['task']}, max new tokens {L}{title_extra}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def retention_plot(doc, L, path: Path, methods) -> Path | None:
    plt = _plt()
    rows = [r for r in doc["rows"] if r["L"] == L]
    tasks = list(doc["setting"]["retain"])
    if not tasks:
        return None
    ks = sorted({r["k"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for m in methods:
            pts = sorted((r["k"], r["retention"][t]["retention"]) for r in rows if r["method"] == m)
            pts = [(k, s) for k, s in pts if s["value"] is not None]
            if not pts:
                continue
            k = [p[0] for p in pts]
            v = [p[1]["value"] for p in pts]
            lo = [p[1]["ci95"][0] if p[1]["ci95"] else p[1]["value"] for p in pts]
            hi = [p[1]["ci95"][1] if p[1]["ci95"] else p[1]["value"] for p in pts]
            if m == "random":
                ax.fill_between(k, lo, hi, color=COLORS["random"], alpha=0.25)
                ax.plot(k, v, "o--", color=COLORS["random"], label=m, ms=3)
            else:
                c, ls = _style(m)
                ax.errorbar(k, v, yerr=_yerr(v, lo, hi), fmt="o", ls=ls, capsize=2, color=c, label=m, ms=3)
        ax.axhline(0.95, color="k", ls=":", lw=1)
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
        b = doc["baselines"][str(L)]
        before, donor = b["retain_target"][t]["value"], b["retain_donor"][t]["value"]
        if before:   # where transplanting everything would land: the donor's own level
            ax.axhline(donor / before, color="tab:red", ls="-.", lw=1, label="donor level")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(f"retention on {t}")
        ax.set_xlabel("K")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy after / before")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _floor_cell(pts, floor: float) -> str:
    best, _ = choose([type(p)(**{**p.to_dict(), "chosen": False}) for p in pts], floor)
    return "no K" if best is None else f"K={best.k}: {_num(best.recovery, '.1f')}%, retention {_num(best.retention, '.2f')}"


def front_plot(doc, L, path: Path, methods) -> Path | None:
    """Recovery (test) against retention (worst other task) for every K, one line per
    method through its front, the other K as faint points."""
    if not doc["setting"]["retain"]:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in methods:
        pts = [p for p in front_rows(doc["rows"], m, L) if p.recovery is not None and p.retention is not None]
        if not pts:
            continue
        c, ls = _style(m)
        ax.plot([p.retention for p in pts], [p.recovery for p in pts], "o", color=c, ms=2.5, alpha=0.35)
        fr = sorted((p for p in pts if p.on_front), key=lambda p: p.retention)
        ax.plot([p.retention for p in fr], [p.recovery for p in fr], "o", ls=ls or "-", color=c, ms=4, label=m)
        for p in fr:
            ax.annotate(str(p.k), (p.retention, p.recovery), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.axvline(0.95, color="k", ls=":", lw=1)
    ax.set_xlabel("retention, worst other task (test)")
    ax.set_ylabel("Recovery % (test)")
    st = doc["setting"]
    ax.set_title(f"{st['target']} <- {st['donor']} on {st['task']}, max new tokens {L}: front per method "
                 "(labels: K)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def selector_scores_plot(doc, L, path: Path) -> Path:
    """Rank of every module under every selector (1 = transplanted first)."""
    plt = _plt()
    import numpy as np

    methods = [m for m in doc["setting"]["methods"] if m in doc["scores"]]
    refs = [ModuleRef.parse(s) for s in doc["setting"]["modules"]]
    layers = sorted({r.layer for r in refs})
    kinds = sorted({r.kind for r in refs}, key=lambda k: (ModuleRef(0, k).group, k))
    fig, axes = plt.subplots(1, len(methods), figsize=(2.2 * len(methods) + 1, 0.4 * len(layers) + 2.2), squeeze=False)
    for ax, m in zip(axes[0], methods):
        sc = {ModuleRef.parse(k): v for k, v in doc["scores"][m][str(L)].items()}
        order = sorted(sc, key=lambda r: (-sc[r], r))
        grid = np.full((len(layers), len(kinds)), np.nan)
        for i, r in enumerate(order, 1):
            grid[layers.index(r.layer), kinds.index(r.kind)] = i
        im = ax.imshow(grid, cmap="viridis_r", aspect="auto", vmin=1, vmax=len(refs))
        ax.set_xticks(range(len(kinds)), kinds, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
        ax.set_title(m, fontsize=9)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="rank (1 = first)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write(doc: dict, out: Path) -> dict[str, str]:
    """Write results.json, report.md and the plots into `out`; returns {name: file name}."""
    from ..plot import score_heatmap

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    st = doc["setting"]
    for L in st["lengths"]:
        sel = best_selector(doc, L)
        key = ["random", "lae", "dw"] + ([sel] if sel else [])
        plots[f"curves_L{L}"] = curves_plot(doc, L, out / f"curves_L{L}.png", ["random", "lae", "dw"]).name
        if len(st["methods"]) > 2:
            plots[f"selectors_L{L}"] = curves_plot(doc, L, out / f"selectors_L{L}.png", ["random"] + st["methods"],
                                                   ", every selector").name
        p = retention_plot(doc, L, out / f"retention_L{L}.png", key)
        if p:
            plots[f"retention_L{L}"] = p.name
        p = front_plot(doc, L, out / f"front_L{L}.png", [m for m in ["random"] + st["methods"]
                                                          if not m.endswith(EXTRAS)])
        if p:
            plots[f"front_L{L}"] = p.name
        lae_scores = {ModuleRef.parse(k): v for k, v in doc["scores"]["lae"][str(L)].items()}
        plots[f"scores_L{L}"] = score_heatmap(lae_scores, out / f"scores_L{L}.png",
                                              f"LAE scores, {st['donor']} vs {st['target']} on {st['task']}, L={L}").name
        plots[f"selector_scores_L{L}"] = selector_scores_plot(doc, L, out / f"selector_scores_L{L}.png").name
    doc = dict(doc, files=dict(plots, report="report.md", results="results.json"))
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "report.md").write_text(report_markdown(doc, plots))
    return doc["files"]


# ---- several settings -------------------------------------------------------------------

def headline_rows(name: str, doc: dict) -> list[list[str]]:
    """Per decoding length: LAE, dW, the best other selector and random, each at its
    dev-chosen K, reported on test; random also at LAE's K."""
    out = []
    for L in doc["setting"]["lengths"]:
        b = doc["baselines"][str(L)]
        best = {x["method"]: x["held_out"] for x in doc["best_k"] if x["L"] == L}
        rand = {r["k"]: r for r in doc["rows"] if r["method"] == "random" and r["L"] == L}
        tops = [best_selector(doc, L, modules_only=True), best_selector(doc, L)]
        for m in dict.fromkeys(["lae", "dw"] + [t for t in tops if t] + ["random"]):
            h = best[m]
            r = rand[h["k"]]["split"]["test"]
            out.append([name, str(L), f"{b['target']['test']['value']:.3f} / {b['donor']['test']['value']:.3f}",
                        f"`{m}`", str(h["k"]), fmt(h["accuracy"]), fmt(h["tir"]), fmt(h["recovery"], pct=True),
                        _num(h["retention"]["min"]),
                        "" if m == "random" else f"{r['accuracy']['value']:.3f} / {fmt(r['recovery'], pct=True)}"])
    return out


def baselines_markdown(main: dict[str, dict], base: dict[str, dict], refs=("lae", "greedy", "lowrank"),
                       split: str = "test") -> str:
    """The literature's baselines (run into `base`) beside reference methods of the main
    runs (`main`, the same setting, flags and questions): accuracy averaged over K minus
    random, Recovery at K = 7 (a quarter), the smallest K reaching 80% Recovery, and the
    largest Recovery whose retention stays >= 0.95 along the method's front."""
    body = []
    for name, bdoc in base.items():
        mdoc = main.get(name)
        for L in bdoc["setting"]["lengths"]:
            sources = [(m, mdoc) for m in refs if mdoc and m in mdoc["setting"]["methods"]]
            sources += [(m, bdoc) for m in bdoc["setting"]["methods"] if m not in REFS_ALWAYS] + [("random", bdoc)]
            for m, doc in sources:
                summ = next((s for s in doc["summary"] if s["method"] == m and s["L"] == L), None)
                row7 = next((r for r in doc["rows"] if r["method"] == m and r["L"] == L and r["k"] == 7), None)
                mean = "(the reference)" if m == "random" else "" if summ is None else \
                    fmt(summ["mean_over_k"][split]["vs"].get("random"))
                k80 = "" if summ is None else (str(summ["k80"]) if summ["k80"] is not None else "never")
                body.append([f"[{name}](baselines/{name}/report.md)", str(L),
                             f"`{m}`" + ("" if doc is bdoc else " (main run)"), mean,
                             fmt(row7["split"][split]["recovery"], pct=True) if row7 else "", k80,
                             _floor_cell(front_rows(doc["rows"], m, L), 0.95)])
    return "\n".join(_table(["setting", "max new tokens", "method", "mean accuracy over K minus random (test)",
                             "Recovery at K = 7 (test)", "K for Recovery >= 80% (full set)",
                             "largest Recovery with retention >= 0.95 (front, test)"], body)) + "\n"


REFS_ALWAYS = ("lae", "dw")


def _over_seeds(vals: list, pct: bool = False) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "undefined"
    import statistics

    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    f, u = (".1f", "%") if pct else (".3f", "")
    return f"{mean:{f}}{u} (sd {sd:{f}}; {min(vals):{f}} to {max(vals):{f}})"


def seeds_markdown(runs: dict[str, list[tuple[str, dict]]], methods=("lae", "dw", "greedy", "lowrank"),
                   split: str = "test") -> str:
    """Per setting and length, each method's headline numbers on every training seed of
    the setting's fine-tune (one row per seed, intervals over questions) and over the
    seeds (mean, sd, range): accuracy averaged over K minus random, Recovery at K = 7,
    and the test accuracy at the K chosen on dev."""
    body = []
    for name, seeds in runs.items():
        lengths = seeds[0][1]["setting"]["lengths"]
        for L in lengths:
            for m in methods:
                per = []
                for seed, doc in seeds:
                    summ = next((s for s in doc["summary"] if s["method"] == m and s["L"] == L), None)
                    row7 = next((r for r in doc["rows"] if r["method"] == m and r["L"] == L and r["k"] == 7), None)
                    best = next((b["held_out"] for b in doc["best_k"] if b["method"] == m and b["L"] == L), None)
                    if summ is None:
                        continue
                    per.append((seed, summ["mean_over_k"][split]["vs"].get("random"),
                                row7["split"][split]["recovery"] if row7 else None, best))
                if not per:
                    continue
                for seed, vs, rec, best in per:
                    body.append([name, str(L), f"`{m}`", seed, fmt(vs), fmt(rec, pct=True),
                                 f"K={best['k']}: {fmt(best['accuracy'])}" if best else ""])
                body.append([name, str(L), f"`{m}`", f"**over {len(per)} seeds**",
                             _over_seeds([vs["value"] if vs else None for _, vs, _, _ in per]),
                             _over_seeds([rec["value"] if rec else None for _, _, rec, _ in per], pct=True),
                             _over_seeds([b["accuracy"]["value"] if b else None for *_, b in per])])
    return "\n".join(_table(["setting", "max new tokens", "method", "training seed",
                             "mean accuracy over K minus random (test)", "Recovery at K = 7 (test)",
                             "test accuracy at the dev-chosen K"], body)) + "\n"


def summary_markdown(docs: dict[str, dict]) -> str:
    head = ["setting", "max new tokens", "target / donor (test)", "method", "K (chosen on dev)", "test accuracy",
            "TIR", "Recovery", "retention min", "random at that K: accuracy / Recovery"]
    rows = [r for name, doc in docs.items() for r in headline_rows(name, doc)]
    lines = _table(head, rows)
    lines += ["", "Accuracy averaged over the K sweep (test split), each selector minus the reference, "
                  "with paired 95% intervals:", ""]
    body = []
    for name, doc in docs.items():
        for s in doc["summary"]:
            if s["method"] == "random" or (s["method"].endswith(EXTRAS) and not doc["setting"].get("extras")):
                continue
            t = s["mean_over_k"]["test"]
            body.append([name, str(s["L"]), f"`{s['method']}`", fmt(t["accuracy"])]
                        + [fmt(t["vs"].get(o)) if o != s["method"] else "" for o in ("random", "lae", "dw")]
                        + [str(s["k80"]) if s["k80"] is not None else "never"])
    lines += _table(["setting", "max new tokens", "method", "mean accuracy over K", "minus random", "minus lae",
                     "minus dw", "K for Recovery >= 80% (full set)"], body)
    lines += ["", "`+x` rows are left out where no non-linear parameter differs (they equal their base method)."]
    lines += ["", "Recovery against retention (worst other task), test split: the largest Recovery whose retention "
                  "stays >= 0.95 along each method's front (what `--retention-floor 0.95` takes; descriptive, chosen "
                  "on test), and the front's K:", ""]
    body = []
    for name, doc in docs.items():
        if not doc["setting"]["retain"]:
            continue
        for L in doc["setting"]["lengths"]:
            for m in ["random"] + [x for x in doc["setting"]["methods"] if not x.endswith(EXTRAS)]:
                pts = front_rows(doc["rows"], m, L)
                if pts:
                    body.append([name, str(L), f"`{m}`", _floor_cell(pts, 0.95),
                                 ", ".join(str(p.k) for p in pts if p.on_front)])
    lines += _table(["setting", "max new tokens", "method", "largest Recovery with retention >= 0.95", "front K"],
                    body)
    return "\n".join(lines) + "\n"
