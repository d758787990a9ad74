"""`transplant admin ...`: a client for a running server (gRPC, bearer token)."""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _connection_flags(p, defaults: bool) -> None:
    """How to reach the server. Given to `admin` itself (with the defaults) and again to
    every action with SUPPRESS defaults, so `admin --address X status` and `admin status
    --address X` both work and an action's copy only overrides what was given to it."""
    def d(value):
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--address", default=d(DEFAULT_ADDRESS), help=f"server HOST:PORT (default {DEFAULT_ADDRESS})")
    p.add_argument("--token", default=d(None), help="admin bearer token (default: read --token-file)")
    p.add_argument("--token-file", default=d(None),
                   help="file holding the admin token (default: admin_token in the server's default state dir)")
    p.add_argument("--tls-ca", default=d(None), help="CA certificate (PEM): connect with TLS")
    p.add_argument("--timeout", type=float, default=d(600.0), help="seconds per call (default 600)")


def register(sub) -> None:
    p = sub.add_parser("admin", help="operate a running server",
                       description="A client for a running `transplant serve`. The connection options may come "
                                   "before or after the action.")
    _connection_flags(p, defaults=True)
    a = p.add_subparsers(dest="admin_command", required=True, metavar="ACTION")

    def action(name, help_, fn):
        q = a.add_parser(name, help=help_, description=help_)
        q.add_argument("--json", action="store_true", help="one JSON document on stdout")
        _connection_flags(q, defaults=False)
        q.set_defaults(fn=fn)
        return q

    action("status", "live generation, health, queue", _status)
    action("donors", "registered donors and their compatibility", _donors)
    q = action("register-donor", "register a checkpoint inside a donor root", _register)
    q.add_argument("path", help="checkpoint directory inside one of the server's donor roots")
    q.add_argument("--name", default="", help="donor name (default: the directory name)")
    for name, fn, help_ in (("plan", _plan, "dry run: compatibility, ranking, bytes; changes nothing"),
                            ("transplant", _transplant, "make a new generation from a donor")):
        q = action(name, help_, fn)
        q.add_argument("--donor", required=True, help="name of a registered donor")
        q.add_argument("--modules", help="names or globs, comma separated (instead of --task/--k)")
        q.add_argument("--task", default="", help="zoo:NAME or a JSONL file in a task root: rank modules on it (LAE)")
        q.add_argument("--k", type=int, default=0, help="number of top-ranked modules to select with --task")
        q.add_argument("--alpha", type=float, help="blend factor in [0, 1]; 1 = full copy (default 1)")
        q.add_argument("--alignment", default="free", choices=("free", "teacher_forced"),
                       help="step alignment of the analysis (default free)")
        from .common import SELECTOR_CHOICES

        q.add_argument("--selector", default="", choices=SELECTOR_CHOICES if name == "plan" else SELECTOR_CHOICES[:-1],
                       help="how a task + K selection ranks modules (default lae, the paper's)"
                            + ("; all: compare the selectors on the probe prompts, say which wins and why"
                               if name == "plan" else ""))
        if name == "transplant":     # a dry run measures nothing
            q.add_argument("--eval", default="", help="tasks to measure before/after, comma separated")
            q.add_argument("--n", type=int, default=0, help="examples per quality measurement (default: the server's)")
        q.add_argument("--reason", default="", help="free text recorded with the generation")
        if name == "transplant":
            _key_flag(q)
        q.add_argument("--cast", action="store_true",
                       help="convert donor values stored in another dtype to the live model's (the rounding error "
                            "is reported and journaled); without it such modules are refused")
        from .common import lowrank_flags

        lowrank_flags(q, "live")
        q.add_argument("--retention-floor", type=float, default=0.0, metavar="F",
                       help="with --task/--k: measure Recovery and retention of the top-K for K up to --k and take "
                            "the largest Recovery whose retention (worst retained task) stays >= F, e.g. 0.95")
        q.add_argument("--retain", default="", help="tasks whose retention --retention-floor measures, comma "
                                                    "separated (default: the server's probe tasks)")
        q.add_argument("--retention-statistic", default="", choices=["", "accuracy", "likelihood", "kl"],
                       help="what retention measures: accuracy after / before (default), likelihood "
                            "(exp(-rise of the answers' NLL per token)) or kl (exp(-KL from the live model))")
    q = action("revert", "make an earlier generation live again (default: the parent)", _revert)
    q.add_argument("--to", type=int, help="generation id to make live again (default: the live one's parent)")
    q.add_argument("--reason", default="", help="free text recorded with the generation")
    q.add_argument("--eval", default="", help="tasks to measure before/after, comma separated")
    _key_flag(q)
    action("history", "every generation", _history)
    q = action("eval", "task accuracy on the live generation", _eval)
    q.add_argument("--task", required=True, help="zoo:NAME or a JSONL file in a task root")
    q.add_argument("--n", type=int, default=0, help="first N examples only (default: the server's)")
    action("fleet", "the fleet: which replica serves which generation, the rollout's progress", _fleet)
    q = action("watch", "live terminal view: generations, quality, swaps", _watch)
    q.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    q.add_argument("--once", action="store_true", help="print one screen and exit")


class Client:
    def __init__(self, args):
        import grpc

        from ..config import default_state_dir
        from ..rpc import admin_pb2_grpc

        token = args.token
        if not token:
            path = Path(args.token_file) if args.token_file else default_state_dir() / "admin_token"
            if not path.is_file():
                from transplant_core.errors import InvalidArgument

                raise InvalidArgument(f"no admin token: {path} does not exist; pass --token or --token-file "
                                      "(the server prints where its token is)")
            token = path.read_text().strip()
        if args.tls_ca:
            creds = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
            self.channel = grpc.secure_channel(args.address, creds)
        else:
            self.channel = grpc.insecure_channel(args.address)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)
        self.md = [("authorization", f"Bearer {token}"), ("x-requested-by", "transplant-admin-cli")]
        self.timeout = args.timeout

    def __getattr__(self, name):
        method = getattr(self.stub, name)
        return lambda req: method(req, metadata=self.md, timeout=self.timeout)


PENDING, UNKNOWN = 3, 4          # exit codes: appended but not live here; the outcome is not known


def _key_flag(q) -> None:
    q.add_argument("--idempotency-key", default="", metavar="KEY",
                   help="a key for this change (default: a new one per run, printed if the outcome is unknown); "
                        "the same command again with the same key returns the first outcome, never a second "
                        "generation")


def _send_keyed(args, call, req) -> int:
    """Send a transplant or revert with an idempotency key; an outcome the server could not
    learn (exit 4) says which key resolves it."""
    import grpc

    req.idempotency_key = args.idempotency_key or f"cli-{uuid.uuid4().hex}"
    try:
        reply = call(req)
    except grpc.RpcError as e:
        # UNKNOWN: the server could not learn the outcome; a deadline or a cancel: we could not
        if e.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            raise
        print(f"error: outcome unknown: {e.code().name}: {e.details()}\n  to learn it, run the same command "
              f"again with --idempotency-key {req.idempotency_key}", file=sys.stderr)
        return UNKNOWN
    d = _doc(reply)
    if args.json:
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
    else:
        _swap_human(d)
    return 0 if (d.get("rollout") or {}).get("live_here", True) else PENDING


def _doc(msg) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _out(args, msg, human) -> int:
    d = _doc(msg)
    if args.json:
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
    else:
        human(d)
    return 0


def _status(args) -> int:
    from ..rpc import admin_pb2 as A

    return _out(args, Client(args).GetStatus(A.GetStatusRequest()), lambda d: print(
        f"{d['model']} ({d['arch']}): generation {d['live_generation']} live of {d['generations']}, "
        f"{d['health']}, {d['donors']} donors, queue {d['queue_depth']}, batch <= {d['max_batch_size']}, "
        f"up {float(d['uptime_seconds']):.0f} s"
        + (f"; replica {d['replica']} of fleet {d['fleet']}" if d.get("fleet") else "")
        + "".join(f"\n  {q['task']}: accuracy {q['accuracy']:.3f} (n={q['n']}, {q['phase']})" + _likelihood(q)
                  for q in d.get("quality", []))))


def _fleet(args) -> int:
    from ..rpc import admin_pb2 as A

    def human(d):
        if not d["enabled"]:
            print("this server is standalone (no fleet: start it with --fleet etcd://HOST:PORT --fleet-name NAME "
                  "--fleet-store DIR)")
            return
        reach = "reachable" if d["etcd_reachable"] else f"UNREACHABLE ({d['etcd_error']})"
        print(f"fleet {d['name']}: etcd {d['etcd']} {reach}; head generation {d['head']} (answered by {d['replica']})")
        if d.get("fatal"):
            print(f"  this replica cannot join: {d['fatal']}")
        if d.get("fenced"):
            print(f"  this replica does not serve: {d['fenced']}")
        r = d.get("rollout")
        if r:
            can = f", canaries {', '.join(r['canaries'])}" if r["canaries"] else ""
            print(f"  rollout of {r['generation']} ({r['kind']}): {r['phase']}{can}; {r['progress']}")
        print(f"  {'replica':<16} {'live':>5} {'health':<12} {'grpc':<22} error")
        for rep in d["replicas"]:
            err = f"generation {rep['error_generation']}: {rep['error']}" if rep["error"] else ""
            notes = (["STALE: not heard from recently"] if rep.get("stale") else []) + \
                ([f"{rep['behind']} behind the head"] if int(rep.get("behind") or 0) else [])
            err = "; ".join(notes + ([err] if err else []))
            print(f"  {rep['name']:<16} {rep['live_generation']:>5} {rep['health']:<12} {rep['grpc']:<22} {err}")

    return _out(args, Client(args).GetFleet(A.GetFleetRequest()), human)


def _donors(args) -> int:
    from ..rpc import admin_pb2 as A

    def human(d):
        for x in d["donors"]:
            ok = "compatible" if x["compatible"] else f"{x['compatible_modules']} compatible modules"
            print(f"{x['name']:<12}{ok:<26}{x['origin']:<8}{x['path']}")
            for m in x["mismatches"][:5]:
                print(f"    mismatch: {m}")
    return _out(args, Client(args).ListDonors(A.ListDonorsRequest()), human)


def _register(args) -> int:
    from ..rpc import admin_pb2 as A

    return _out(args, Client(args).RegisterDonor(A.RegisterDonorRequest(name=args.name, path=args.path)),
                lambda d: print(f"registered {d['name']} ({d['path']}): {d['compatible_modules']} compatible modules"))


def _treq(args):
    from ..rpc import admin_pb2 as A

    evals = getattr(args, "eval", "")          # `plan` has no --eval/--n: a dry run measures nothing
    req = A.TransplantRequest(donor=args.donor, task=args.task, k=args.k, alignment=args.alignment,
                              eval_tasks=[t for t in evals.split(",") if t], eval_examples=getattr(args, "n", 0),
                              reason=args.reason, selector=args.selector, cast=args.cast)
    if args.rank < 0 or args.budget < 0:
        raise SystemExit("transplant admin: error: --rank and --budget must be >= 0")
    req.rank, req.param_budget = args.rank, args.budget
    req.retention_floor = args.retention_floor
    req.retention_statistic = args.retention_statistic
    req.retain.extend(t.strip() for t in args.retain.split(",") if t.strip())
    if args.modules:
        req.modules.extend(m.strip() for m in args.modules.split(",") if m.strip())
    if args.alpha is not None:
        req.alpha = args.alpha
    return req


def _plan(args) -> int:
    def human(d):
        if d.get("selectors"):
            from .offline import _print_comparison

            _print_comparison({"k": args.k, "baseline_loss": d["baseline_loss"], "chosen": d["selector"],
                               "why": d["why"], "selectors": d["selectors"]})
        print(f"plan from {d['donor']} on generation {d['base_generation']}: {len(d['selected'])} modules, "
              f"{d['bytes']} bytes, alpha {d['alpha']}{', selector ' + d['selector'] if d['selector'] else ''}; "
              "nothing changed")
        for m in d["mismatches"]:
            print(f"  mismatch: {m}")
        for i, m in enumerate(d["ranked"][:max(args.k, 10)], 1):
            mark = "*" if m["name"] in d["selected"] else " "
            print(f" {mark}{i:>3}  {m['name']:<24}{float(m['score']):.6f}")
        if not d["ranked"]:
            print("  selected: " + ", ".join(d["selected"]))
        for c in d.get("casts", []):
            print(f"  cast {c['module']} {c['from_dtype']} -> {c['to_dtype']}: largest error "
                  f"{float(c['max_abs_error']):.3g} ({float(c['max_rel_error']):.3g} of the largest value)")
        if d.get("front"):
            print(f"  Recovery vs retention ({d['front_why']}):")
            for p in d["front"]:
                rec, ret = p.get("recovery"), p.get("retention")
                print(f"   {'*' if p['chosen'] else ' '} K={p['k']:<4}Recovery "
                      f"{'undefined' if rec is None else format(float(rec), '.1f') + '%':>9}  retention "
                      f"{'-' if ret is None else format(float(ret), '.3f'):>6}{'  (front)' if p['on_front'] else ''}")
        if d.get("unit") == "lowrank":
            print(f"  low-rank: {d['stored_bytes']} bytes of factors and biases for {d['bytes']} bytes of modules")
            for r in d.get("ranks", []):
                print(f"    {r['module']:<24}rank {r['rank']:>4}  holds {float(r.get('energy', 0)):.1%} of the "
                      f"difference  {r['factor_bytes']} of {r['bytes']} bytes")
    return _out(args, Client(args).PlanTransplant(_treq(args)), human)


def _likelihood(q: dict) -> str:
    """A probe's answer NLL and KL from the parent, where it was measured with them."""
    out = f" nll {q['answer_nll']:.3f}" if "answer_nll" in q else ""
    return out + (f" kl {q['kl']:.3f}" if "kl" in q else "")


def _quality_lines(d) -> None:
    after = {q["task"]: q for q in d["after"]}
    for b in d["before"]:
        a = after.get(b["task"])
        print(f"  {b['task']}: {b['accuracy']:.3f} -> {a['accuracy']:.3f} (n={a['n']})" if a else "")


def _swap_human(d) -> None:
    g, r = d["generation"], d.get("rollout") or {}
    if g["kind"] == "revert":
        what = f"revert to generation {g.get('reverted_to', '?')}"
    else:
        what = f"{g['kind']} from {g['donor'] or 'snapshot'}"
    ranks = g.get("ranks") or {}
    lowrank = f", low-rank (ranks {', '.join(f'{m} {r}' for m, r in sorted(ranks.items()))}; " \
              f"{g.get('stored_bytes', 0)} bytes stored)" if ranks else ""
    again = "(replayed: this key's earlier call made it) " if d.get("replayed") else ""
    fleet = r.get("phase", "") != "" or int(r.get("replicas") or 1) > 1
    where = f"live on {len(r.get('serving', []))} of {r.get('replicas')} replicas" if fleet else ""
    if r and not r.get("live_here"):
        print(f"{again}generation {g['id']} ({what}) is NOT live on this server: {r.get('progress') or 'pending'}"
              + (f"; {where} ({', '.join(r['serving']) or 'none'})" if fleet else "")
              + (f"; rollout phase {r['phase']}" if r.get("phase") not in ("", "none") else ""))
        return
    print(f"{again}generation {g['id']} ({what}) is live (parent {g.get('parent')}, "
          f"{len(g['modules'])} modules{lowrank}, swap {float(d['swap_seconds']) * 1e3:.1f} ms)"
          + (f"; {where}" + (f": {r['progress']}" if r.get("progress") else "") if fleet else ""))
    chose = json.loads(g.get("selection_json") or "{}").get("front", {}).get("why")
    if chose:
        print(f"  {chose}")
    _quality_lines(d)


def _transplant(args) -> int:
    return _send_keyed(args, Client(args).Transplant, _treq(args))


def _revert(args) -> int:
    from ..rpc import admin_pb2 as A

    req = A.RevertRequest(reason=args.reason, eval_tasks=[t for t in args.eval.split(",") if t])
    if args.to is not None:
        req.to_generation = args.to
    return _send_keyed(args, Client(args).Revert, req)


def _history_lines(d) -> list[str]:
    lines = []
    for g in d["generations"]:
        when = time.strftime("%H:%M:%S", time.localtime(float(g["created_unix"])))
        mark = "*" if g["live"] else " "
        low = " low-rank" if g.get("ranks") else ""
        what = {"load": "as loaded", "transplant": f"from {g['donor']}: {len(g['modules'])}{low} modules",
                "revert": f"revert to {g.get('reverted_to')}"}.get(g["kind"], g["kind"])
        q = ", ".join(f"{x['task']} {x['accuracy']:.2f}" + _likelihood(x) for x in g["quality"][-3:])
        reason = json.loads(g["selection_json"] or "{}").get("why") or g["reason"]
        lines.append(f"{mark}{g['id']:>4} {when} parent {str(g.get('parent', '-')):>4}  {what:<34}"
                     f"{('[' + reason + '] ') if reason else ''}{q}")
    return lines


def _history(args) -> int:
    from ..rpc import admin_pb2 as A

    return _out(args, Client(args).ListGenerations(A.ListGenerationsRequest()),
                lambda d: print("\n".join(_history_lines(d))))


def _eval(args) -> int:
    from ..rpc import admin_pb2 as A

    return _out(args, Client(args).Evaluate(A.EvaluateRequest(task=args.task, n=args.n)), lambda d: print(
        f"generation {d['generation']} on {d['task']}: accuracy {d['accuracy']:.3f} ({d['correct']}/{d['n']}), "
        f"95% CI [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"))


def _watch(args) -> int:
    from ..rpc import admin_pb2 as A

    c = Client(args)
    while True:
        st, gens = _doc(c.GetStatus(A.GetStatusRequest())), _doc(c.ListGenerations(A.ListGenerationsRequest()))
        screen = [f"transplant watch - {st['model']} - generation {st['live_generation']} live - {st['health']} - "
                  f"queue {st['queue_depth']} - {time.strftime('%H:%M:%S')}", ""]
        screen += _history_lines({"generations": gens["generations"][-20:]})
        if args.json:
            sys.stdout.write(json.dumps({"status": st, "generations": gens["generations"]}) + "\n")
        else:
            sys.stdout.write(("" if args.once else "\x1b[2J\x1b[H") + "\n".join(screen) + "\n")
        sys.stdout.flush()
        if args.once:
            return 0
        time.sleep(args.interval)
