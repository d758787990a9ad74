"""`transplant`: the one console script. Offline subcommands call transplant_core;
`serve` and `admin` talk gRPC (imported only when used).

Every reporting subcommand takes --json: one JSON document on stdout and nothing
else there; progress and errors go to stderr. Exit status: 0 ok, 1 a check failed
(e.g. `compat` found mismatches), 2 bad input or a refused operation.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads spin by default; on a shared or CPU-limited host that made decoding
# 3-7x slower (bench/throughput: single-client server / serial generate 0.31 -> 1.04).
# Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .common import SELECTOR_CHOICES, _common, lowrank_flags
from .offline import (cmd_analyze, cmd_apply, cmd_compat, cmd_eval, cmd_inspect, cmd_zoo_build, cmd_zoo_deep,
                      cmd_zoo_export_task, cmd_zoo_list, cmd_zoo_variant)


# ---- parser --------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """Every parser of the CLI: no abbreviated options (`admin revert --to 1` must not be
    read as an ambiguous prefix of --token/--token-file). Subparsers inherit the class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _pair(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="model spec: checkpoint dir or zoo:NAME")
    p.add_argument("--donor", required=True, help="model spec: checkpoint dir or zoo:NAME")


def _analysis_flags(p: argparse.ArgumentParser, task_required: bool) -> None:
    p.add_argument("--task", required=task_required, help="zoo:NAME or a JSONL file")
    p.add_argument("--k", type=int, help="number of modules to select (top-K by score)")
    p.add_argument("--n", type=int, default=64, help="diagnostic prompts used for the analysis (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="decoding steps analysed (default 16)")
    p.add_argument("--alignment", choices=("free", "teacher_forced"), default="free",
                   help="step alignment between the two models (default free: paper-exact)")
    p.add_argument("--selector", default="lae", choices=SELECTOR_CHOICES,
                   help="how modules are ranked (default lae, the paper's; see docs/experiments); all: compare "
                        "them on the probe prompts at --k and use the best")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="transplant", description="Hot-swap transplant of linear modules between checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    z = sub.add_parser("zoo", help="the embedded model family").add_subparsers(dest="zoo_command", required=True)
    p = z.add_parser("build", help="train and cache the embedded family")
    p.add_argument("--out", help="directory (default $TRANSPLANT_ZOO_DIR or ~/.cache/transplant/zoo)")
    p.add_argument("--force", action="store_true", help="rebuild even if built")
    _common(p, pickle=False)
    p.set_defaults(fn=cmd_zoo_build)
    p = z.add_parser("variant", help="train a setting's fine-tune again with another seed (for intervals over "
                                     "training seeds); prints its checkpoint directory")
    p.add_argument("stage", choices=("v2", "tuned", "lora"), help="the fine-tune to train again")
    p.add_argument("--seed", type=int, required=True, help="data and torch seed (the default build's are 6, 4, 5)")
    p.add_argument("--out", help="directory (default <zoo>/variants/<stage>-seed<seed>)")
    _common(p, pickle=False)
    p.set_defaults(fn=cmd_zoo_variant)
    p = z.add_parser("deep", help="train the cross-generation lineage (trunk, v1, v2) on a model twice as deep "
                                  "(8 layers; about 20 minutes on 2 CPU cores); prints its directory")
    p.add_argument("--out", help="directory (default <zoo>/deep)")
    _common(p, pickle=False)
    p.set_defaults(fn=cmd_zoo_deep)
    p = z.add_parser("list", help="models, tasks and settings of the family")
    _common(p, quiet=False, pickle=False)
    p.set_defaults(fn=cmd_zoo_list)
    p = z.add_parser("export-task", help="write a zoo task as a JSONL task file")
    p.add_argument("task", help="zoo task name (add, rev, ...; the zoo: prefix is optional)")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--n", type=int, help="first N examples only (default: the whole split)")
    p.add_argument("--split", default="eval", choices=("eval", "dev", "test", "probe"), help="which split (default eval)")
    _common(p, json_flag=False, quiet=False, pickle=False)
    p.set_defaults(fn=cmd_zoo_export_task)

    p = sub.add_parser("inspect", help="list a model's transplantable modules")
    p.add_argument("model", help="model spec: checkpoint dir or zoo:NAME")
    _common(p, quiet=False)
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("compat", help="pairwise compatibility, every mismatch listed (exit 1 if any)")
    p.add_argument("target", help="model spec: checkpoint dir or zoo:NAME")
    p.add_argument("donor", help="model spec: checkpoint dir or zoo:NAME")
    _common(p, quiet=False)
    p.set_defaults(fn=cmd_compat)

    p = sub.add_parser("analyze", help="rank modules by activation difference (LAE)")
    _pair(p)
    _analysis_flags(p, task_required=True)
    p.add_argument("--plot", help="write a PNG heatmap of the scores")
    _common(p)
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("eval", help="accuracy of a model on a task")
    p.add_argument("model", help="model spec: checkpoint dir or zoo:NAME")
    p.add_argument("--task", required=True, help="zoo:NAME or a JSONL file")
    p.add_argument("--n", type=int, help="first N examples only")
    p.add_argument("--split", default="eval", choices=("eval", "dev", "test", "probe"),
                   help="split of a zoo task (default eval; ignored for a JSONL file)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="decoding steps per answer (default 32)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="compute in this dtype (default: the dtype the weights are stored in)")
    _common(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("apply", help="write a transplanted checkpoint with a manifest")
    _pair(p)
    _analysis_flags(p, task_required=False)
    p.add_argument("--modules", help="explicit names or globs, comma separated (instead of --task/--k)")
    p.add_argument("--alpha", type=float, default=1.0, help="blend factor in [0, 1]; 1 = full copy (paper)")
    lowrank_flags(p, "target")
    p.add_argument("--out", required=True, help="directory to write the checkpoint into (must be empty or new)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--cast", action="store_true",
                   help="convert donor values stored in another dtype to the target's (the manifest records the "
                        "largest rounding error per module); without it such modules are refused")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="compute the --task analysis in this dtype (default: as stored; the output keeps the "
                        "target's stored dtypes)")
    _common(p)
    p.set_defaults(fn=cmd_apply)

    for extra in _extra_commands():
        extra(sub)
    return ap


def _extra_commands():
    """Subcommands that live in other modules (experiment, serve, admin, generate); each
    imports its heavy dependencies only when it runs, so `transplant --help` stays fast."""
    out = []
    for mod in ("server.cli.experiment", "server.cli.serve", "server.cli.admin", "server.cli.generate"):
        try:
            out.append(__import__(mod, fromlist=["register"]).register)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return out


def _rpc_error(args, e: Exception) -> str:
    """One line for a failed RPC; an unreachable server says where it looked and what to do."""
    code = getattr(e, "code", lambda: None)()
    details = getattr(e, "details", lambda: str(e))()
    name = getattr(code, "name", code)
    unreachable = any(w in str(details).lower() for w in ("failed to connect", "connection refused",
                                                            "dns resolution failed", "name resolution"))
    fleet = "etcd" in str(details)                     # the server answered: its etcd is down
    if name == "UNAVAILABLE" and unreachable and not fleet and getattr(args, "address", None):   # not NotReady
        return (f"error: cannot reach a transplant server at {args.address} ({details}); start one with "
                f"`transplant serve` or pass --address HOST:PORT of a running one")
    return f"error: {name}: {details}"


def _stdout_gone() -> int:
    """The reader of stdout left (`transplant inspect ... | head -1`): not an error. Point
    stdout at /dev/null so the flush at interpreter exit cannot fail again (as the Python
    docs on SIGPIPE recommend), and exit 141 like a process killed by SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):    # stdout is not a file (e.g. captured in-process)
        sys.stdout = open(os.devnull, "w")
    return 141


def main(argv: list[str] | None = None) -> int:
    from transplant_core.errors import TransplantError

    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args) or 0
        sys.stdout.flush()           # a closed pipe fails here, not in the interpreter's exit
        return code
    except BrokenPipeError:          # before `Exception`, which would catch it as well
        return _stdout_gone()
    except TransplantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if type(e).__module__.startswith("grpc"):      # an RPC the server refused, or no server
            print(_rpc_error(args, e), file=sys.stderr)
            return 2
        raise
