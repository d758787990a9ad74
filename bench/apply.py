"""`transplant apply` on a sharded checkpoint: its peak memory against the largest
shard, and its time against what it replaced, loading the whole target with
`from_pretrained` and writing it with `save_pretrained`.

    python -m bench.apply                # 300M Llama saved in ~100 MB shards, K=8, 3 repeats
    python -m bench.apply --quick        # tiny model (shards of 40 KB), seconds

The preset's target is re-saved once in shards (`--shard-mb`, cached beside it). Each
side runs in a fresh process, the order alternating: apply is `python -m server.cli
apply --modules` (K modules spread over the layers, cycling kinds); the baseline loads
the target (`from_pretrained`), copies the same modules' tensors from the donor into it
and saves it (`save_pretrained`, same shard size). Memory: the process's VmHWM minus its
VmRSS just before the command (after importing torch and transformers), over the largest
shard's bytes; the files are in the page cache for both sides. Target: apply's peak at
most 2x the largest shard.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import common as C
from . import setup as bench_setup

PROG = "apply"
ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import torch, transformers, safetensors
from server import cli

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

args = json.loads(sys.argv[1])
base = status("VmRSS:")
t0 = time.perf_counter()
if args["mode"] == "apply":
    code = cli.main(["apply", "--target", args["target"], "--donor", args["donor"], "--modules",
                     ",".join(args["modules"]), "--out", args["out"], "--quiet", "--json"])
    assert code == 0
else:
    from transformers import AutoModelForCausalLM
    from safetensors import safe_open
    model = AutoModelForCausalLM.from_pretrained(args["target"], dtype="auto")
    params = dict(model.named_parameters())
    with safe_open(args["donor_file"], "pt") as d, torch.no_grad():
        for k in args["keys"]:
            params[k].copy_(d.get_tensor(k))
    model.save_pretrained(args["out"], max_shard_size=args["shard"])
seconds = time.perf_counter() - t0
print("RESULT " + json.dumps({"seconds": seconds, "peak_above_base": status("VmHWM:") - base}))
"""


def sharded(m: C.Models, shard: str) -> Path:
    """The preset target re-saved in shards (once)."""
    out = Path(m.target).parent / f"{Path(m.target).name}-sharded-{shard}"
    if (out / "model.safetensors.index.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".sharded-", dir=out.parent))
    AutoModelForCausalLM.from_pretrained(m.target, dtype="auto").save_pretrained(tmp, max_shard_size=shard)
    AutoTokenizer.from_pretrained(m.target).save_pretrained(tmp)
    tmp.rename(out)
    return out


def child(args: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"{args['mode']} failed: {r.stderr[-2000:]}")
    return json.loads(line[7:])


def run(args) -> C.Result:
    m = C.models(args)
    shard = "40KB" if args.quick else f"{args.shard_mb}MB"
    target = sharded(m, shard)
    from transplant_core.checkpoint import Checkpoint, weight_files
    from transplant_core.refs import ModuleRef

    table = Checkpoint.open(str(target)).table
    modules = C.pick_modules(table, args.k)
    keys = [k for n in modules for k in table[ModuleRef.parse(n)].keys]
    largest = max(f.stat().st_size for f in weight_files(target))
    donor_file = weight_files(Path(m.donor))
    if len(donor_file) != 1:
        raise SystemExit("the baseline reads the donor from one safetensors file")
    res = C.Result(PROG, C.command_line(PROG), f"{m.label}, {len(weight_files(target))} shards, largest "
                                               f"{largest / 1e6:.1f} MB, K={args.k} modules")
    work = Path(tempfile.mkdtemp(prefix="apply-", dir=bench_setup.bench_root()))
    mem, ratio, peaks, times = [], [], {"apply": [], "save": []}, {"apply": [], "save": []}
    try:
        for rep in range(args.repeats):
            got = {}
            for mode in (("apply", "save") if rep % 2 == 0 else ("save", "apply")):
                out = work / f"{mode}-{rep}"
                got[mode] = child({"mode": mode, "target": str(target), "donor": m.donor, "modules": modules,
                                   "keys": keys, "donor_file": str(donor_file[0]), "shard": shard, "out": str(out)})
                shutil.rmtree(out, ignore_errors=True)
                peaks[mode].append(got[mode]["peak_above_base"])
                times[mode].append(got[mode]["seconds"])
            mem.append(got["apply"]["peak_above_base"] / largest)
            ratio.append(got["apply"]["seconds"] / got["save"]["seconds"])
            print(f"  repeat {rep + 1}/{args.repeats}: apply {got['apply']['seconds']:.2f} s, peak +"
                  f"{got['apply']['peak_above_base'] / 1e6:.0f} MB; from_pretrained + save_pretrained "
                  f"{got['save']['seconds']:.2f} s, peak +{got['save']['peak_above_base'] / 1e6:.0f} MB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res.add("apply peak memory / largest shard", "<= 2", mem)
    res.add("apply time / (from_pretrained + save_pretrained)", "report", ratio)
    res.details.update({"largest_shard_bytes": largest, "apply_peak_above_base_bytes": peaks["apply"],
                        "save_peak_above_base_bytes": peaks["save"], "apply_s": [round(t, 3) for t in times["apply"]],
                        "save_s": [round(t, 3) for t in times["save"]], "modules": modules})
    return C.emit(res, args)


def main(argv=None) -> C.Result:
    ap = C.parser(PROG, __doc__)
    ap.set_defaults(repeats=3)
    ap.add_argument("--k", type=int, default=8, help="modules (default 8)")
    ap.add_argument("--shard-mb", type=int, default=100, help="shard size of the target (default 100 MB)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    return run(args)


if __name__ == "__main__":
    main()
