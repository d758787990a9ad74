"""Rewrite the generated summary table of docs/experiments/README.md from the
settings' results.json (between the BEGIN/END markers; the prose is hand-written).
With --render, also re-render each setting's report.md and plots from its
results.json (no model is run)."""
import json
import re
import sys
from pathlib import Path

from transplant_core.experiment.report import baselines_markdown, seeds_markdown, summary_markdown, write

HERE = Path(__file__).parent
SETTINGS = ("cross_generation", "base_vs_tuned", "adapter")
BEGIN, END = "<!-- BEGIN generated summary -->", "<!-- END generated summary -->"
B_BEGIN, B_END = "<!-- BEGIN generated baselines -->", "<!-- END generated baselines -->"
S_BEGIN, S_END = "<!-- BEGIN generated seeds -->", "<!-- END generated seeds -->"
DEFAULT_SEEDS = {"cross_generation": 6, "base_vs_tuned": 4, "adapter": 5}   # the zoo's own fine-tune seeds

docs = {s: json.loads((HERE / s / "results.json").read_text()) for s in SETTINGS if (HERE / s / "results.json").is_file()}
base = {s: json.loads((HERE / "baselines" / s / "results.json").read_text()) for s in SETTINGS
        if (HERE / "baselines" / s / "results.json").is_file()}
if "--render" in sys.argv:
    for s, doc in docs.items():
        write(doc, HERE / s)
    for s, doc in base.items():
        write(doc, HERE / "baselines" / s)
table = summary_markdown({f"[{s}]({s}/report.md)": d for s, d in docs.items()})
readme = HERE / "README.md"
text = readme.read_text() if readme.is_file() else f"{BEGIN}\n{END}\n"
text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{table}{END}", text, flags=re.S)
if base:
    btable = baselines_markdown(docs, base)
    text = re.sub(re.escape(B_BEGIN) + ".*?" + re.escape(B_END), lambda _: f"{B_BEGIN}\n{btable}{B_END}", text,
                  flags=re.S)
seeds = {}
for s in SETTINGS:
    extra = sorted((HERE / "seeds").glob(f"{s}-seed*/results.json"))
    if s in docs and extra:
        seeds[s] = [(f"{DEFAULT_SEEDS[s]} (the zoo's)", docs[s])] + [
            (p.parent.name.rsplit("-seed", 1)[1], json.loads(p.read_text())) for p in extra]
if seeds:
    if "--render" in sys.argv:
        for s in seeds:
            for p in sorted((HERE / "seeds").glob(f"{s}-seed*/results.json")):
                write(json.loads(p.read_text()), p.parent)
    stable = seeds_markdown(seeds)
    text = re.sub(re.escape(S_BEGIN) + ".*?" + re.escape(S_END), lambda _: f"{S_BEGIN}\n{stable}{S_END}", text,
                  flags=re.S)
readme.write_text(text)
print(f"updated {readme} from {', '.join(docs)}")
