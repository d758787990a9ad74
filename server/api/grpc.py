"""gRPC servicers: translate protos to runtime calls and back. No logic lives here."""
from __future__ import annotations

import json
import queue
import time

from .errors import rpc, rpc_stream
from ..generations import Record
from ..rpc import admin_pb2 as A
from ..rpc import admin_pb2_grpc
from ..rpc import inference_pb2 as I
from ..rpc import inference_pb2_grpc
from ..runtime import Runtime, TransplantArgs

FINISH = {"eos": I.FINISH_REASON_EOS, "stop": I.FINISH_REASON_STOP, "length": I.FINISH_REASON_LENGTH}


def _deadline(context) -> float | None:
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    def _submit(self, req, context, stream=None):
        return self.rt.request(req.prompt, req.max_new_tokens, req.temperature, req.top_p,
                               req.seed if req.HasField("seed") else None, list(req.stop),
                               _deadline(context), context.is_active, stream,
                               messages=[{"role": m.role, "content": m.content} for m in req.messages],
                               model=req.model, generation=req.generation if req.HasField("generation") else None)

    @rpc
    def Generate(self, request, context):
        r = self._submit(request, context)
        r.done.wait()      # the scheduler always finishes a request: result, error or cancellation
        c = r.outcome()
        return I.GenerateResponse(text=c.text, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                                  finish_reason=FINISH.get(c.finish_reason, 0), generation=r.generation,
                                  spans=_spans(c))

    @rpc_stream
    def GenerateStream(self, request, context):
        q: queue.SimpleQueue = queue.SimpleQueue()
        r = self._submit(request, context, stream=q)
        while True:
            delta = q.get()
            if delta is None:
                break
            yield I.GenerateChunk(text=delta, generation=r.generation)
        c = r.outcome()
        yield I.GenerateChunk(text="", generation=r.generation, finish_reason=FINISH.get(c.finish_reason, 0),
                              prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens, spans=_spans(c))


def _spans(c) -> list:
    return [I.GenerationSpan(generation=g, start=a, end=b) for g, a, b in (c.spans or [])]


def _quality(q: dict) -> A.Quality:
    return A.Quality(**q)


def _generation(rec: Record, live: int) -> A.Generation:
    return A.Generation(id=rec.id, parent=rec.parent, kind=rec.kind, donor=rec.donor, modules=rec.modules,
                        alpha=rec.alpha, selection_json=json.dumps(rec.selection, sort_keys=True),
                        checksums=rec.checksums, quality=[_quality(q) for q in rec.quality],
                        requested_by=rec.requested_by, reason=rec.reason, created_unix=rec.created,
                        reverted_to=rec.reverted_to, bytes=rec.bytes, live=rec.id == live, ranks=rec.ranks,
                        stored_bytes=rec.stored_bytes, idempotency_key=(rec.idempotency or {}).get("key", ""))


def _rollout(r: dict | None) -> A.Rollout | None:
    if r is None:
        return None
    return A.Rollout(generation=r["generation"], kind=r["kind"], phase=r["phase"], canaries=r["canaries"],
                     serving=r["serving"], progress=r["progress"], live_here=r.get("live_here", False),
                     replicas=r.get("replicas", 0))


def _donor(d) -> A.Donor:
    c = d.compat
    return A.Donor(name=d.name, path=str(d.path), origin=d.origin, compatible=c.ok,
                   compatible_modules=len(c.compatible), mismatches=list(c.model_mismatches + c.mismatches),
                   weight_bytes=d.checkpoint.weight_bytes)


def _args(req) -> TransplantArgs:
    return TransplantArgs(req.donor, list(req.modules), req.task, req.k,
                          req.alpha if req.HasField("alpha") else 1.0, req.probe_prompts, req.max_new_tokens,
                          req.alignment, list(req.eval_tasks), req.eval_examples, req.reason, req.selector,
                          req.cast, req.rank, req.param_budget, req.retention_floor, list(req.retain),
                          req.idempotency_key, req.retention_statistic)


def _ranks(p) -> list:
    return [A.ModuleRank(module=str(m.ref), rank=p.ranks[str(m.ref)], energy=p.energy[str(m.ref)],
                         factor_bytes=sum(t.numel() * t.element_size() for t in p.factors[m.weight_key]),
                         bytes=m.nbytes) for m in p.modules if m.weight_key in p.factors]


def _comparison(c) -> dict:
    if c is None:
        return {}
    return {"selectors": [A.SelectorResult(**row) for row in c.rows], "baseline_loss": c.baseline_loss,
            "why": c.why}


def _who(context) -> str:
    md = dict(context.invocation_metadata() or ())
    return md.get("x-requested-by") or context.peer()


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    @rpc
    def GetStatus(self, request, context):
        return A.Status(version=__import__("transplant_core").__version__, **self.rt.status(),
                        quality=[_quality(q) for q in self.rt.probe_quality()])

    @rpc
    def ListDonors(self, request, context):
        return A.ListDonorsResponse(donors=[_donor(d) for d in self.rt.donors.list()])

    @rpc
    def RegisterDonor(self, request, context):
        return _donor(self.rt.register_donor(request.name, request.path))

    @rpc
    def PlanTransplant(self, request, context):
        pr = self.rt.plan(_args(request))
        c = pr.donor.compat
        return A.Plan(donor=pr.donor.name, base_generation=pr.base_generation, compatible=c.ok,
                      compatible_modules=[str(r) for r in c.compatible],
                      mismatches=list(c.model_mismatches + c.mismatches),
                      ranked=[A.ModuleScore(name=n, score=s, bytes=b) for n, s, b in pr.ranked],
                      selected=[str(r) for r in pr.plan.refs], bytes=pr.plan.nbytes, alpha=pr.plan.alpha,
                      selector=pr.selector, **_comparison(pr.comparison),
                      casts=[A.CastError(module=m, from_dtype=c["from"], to_dtype=c["to"],
                                         max_abs_error=c["max_abs_error"], max_rel_error=c["max_rel_error"])
                             for m, c in pr.plan.casts.items()],
                      unit=pr.plan.unit, ranks=_ranks(pr.plan), stored_bytes=pr.plan.stored_bytes,
                      front=[A.FrontPoint(**p.to_dict()) for p in pr.front], front_why=pr.front_why)

    def _swap_reply(self, res) -> A.TransplantResponse:
        return A.TransplantResponse(generation=_generation(res.record, self.rt.gens.live.id),
                                    before=[_quality(q) for q in res.before], after=[_quality(q) for q in res.after],
                                    swap_seconds=res.seconds, rollout=_rollout(res.rollout), replayed=res.replayed)

    @rpc
    def Transplant(self, request, context):
        return self._swap_reply(self.rt.transplant(_args(request), _who(context)))

    @rpc
    def Revert(self, request, context):
        to = request.to_generation if request.HasField("to_generation") else None
        return self._swap_reply(self.rt.revert(to, request.reason, _who(context), list(request.eval_tasks),
                                               request.eval_examples, idempotency_key=request.idempotency_key))

    @rpc
    def ListGenerations(self, request, context):
        live = self.rt.gens.live.id
        return A.ListGenerationsResponse(generations=[_generation(r, live) for r in self.rt.gens.history()], live=live)

    @rpc
    def GetFleet(self, request, context):
        if self.rt.fleet is None:
            return A.Fleet(enabled=False)
        v = self.rt.fleet.view()
        reps = [A.Replica(name=n, live_generation=s.get("live") or 0, health=s.get("health", ""),
                          grpc=s.get("grpc", ""), http=s.get("http", ""),
                          error=(s.get("error") or {}).get("message", "") or s.get("fatal") or "",
                          error_generation=(s.get("error") or {}).get("generation", 0),
                          updated_unix=s.get("updated", 0.0), servable=s.get("servable", []),
                          stale=s.get("stale", False), behind=s.get("behind", 0))
                for n, s in sorted(v["replicas"].items())]
        r = v["rollout"]
        return A.Fleet(enabled=True, name=v["name"], etcd=v["etcd"], replica=v["replica"],
                       etcd_reachable=v["reachable"], etcd_error=v["etcd_error"], head=max(v["head"], 0),
                       replicas=reps, fatal=v["fatal"], fenced=v.get("fenced", ""),
                       rollout=_rollout(r))

    @rpc
    def Evaluate(self, request, context):
        return _quality(self.rt.evaluate_live(request.task, request.n, request.max_new_tokens))
