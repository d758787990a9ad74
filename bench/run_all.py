"""Every benchmark, each in its own process, then the closing table: each figure, its
target, the measured ratio (median, min, max) and the command that measured it.

    python -m bench.run_all               # the defaults (~25 min on 2 busy cores, plus continuous: 45-90 min, fleet ~6)
    python -m bench.run_all --quick       # tiny settings, ~2 min
    python -m bench.run_all --only swap,memory --out results/
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCHES = ("swap", "throughput", "swap_load", "lae_cost", "memory", "soak", "continuous", "fleet", "apply", "logprobs", "vs_vllm", "plugin")
ROOT = Path(__file__).resolve().parent.parent


def run_one(name: str, extra: list[str], out: Path) -> dict | None:
    path = out / f"{name}.json"
    cmd = [sys.executable, "-m", f"bench.{name}", *extra, "--json", str(path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0 or not path.exists():
        print(f"bench.{name} failed (exit {rc})", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def table(results: list[dict]) -> str:
    def f(v):
        return "nan" if v != v else f"{v:.3g}"

    lines = ["| figure | target | median | min | max | met | command |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for fig in r["figures"]:
            met = {True: "yes", False: "**no**", None: "-"}[fig["met"]]
            lines.append(f"| {r['bench']}: {fig['figure'].strip()} | {fig['target']} | {f(fig['median'])} | "
                         f"{f(fig['min'])} | {f(fig['max'])} | {met} | `{r['command'].split(' --json')[0]}` |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(BENCHES))
    ap.add_argument("--out", help="folder for each benchmark's JSON and table.md (default: a temp folder)")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-"))
    out.mkdir(parents=True, exist_ok=True)
    results = [r for n in names if (r := run_one(n, ["--quick"] if args.quick else [], out))]
    md = table(results)
    (out / "table.md").write_text(md + "\n")
    print("\n" + md + f"\n\n(results in {out})")
    if len(results) < len(names):
        sys.exit(1)


if __name__ == "__main__":
    main()
