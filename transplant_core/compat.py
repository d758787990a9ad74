"""Pre-transplant diagnosis: which module pairs can be exchanged, and every reason
the others cannot, listed at once."""
from __future__ import annotations

from dataclasses import dataclass, field

from .arch import ModuleTable
from .refs import ModuleRef


@dataclass(frozen=True)
class CompatReport:
    target_arch: str
    donor_arch: str
    compatible: tuple[ModuleRef, ...]
    mismatches: tuple[str, ...] = field(default=())
    model_mismatches: tuple[str, ...] = field(default=())   # whole-model problems (architecture, vocabulary)

    @property
    def ok(self) -> bool:
        """True when nothing at all differs: every module pairs with its twin."""
        return not self.mismatches and not self.model_mismatches

    @property
    def usable(self) -> bool:
        """True when at least some modules can be transplanted."""
        return not self.model_mismatches and bool(self.compatible)

    def to_dict(self) -> dict:
        return {
            "target_arch": self.target_arch, "donor_arch": self.donor_arch, "ok": self.ok,
            "usable": self.usable, "compatible": [str(r) for r in self.compatible],
            "mismatches": list(self.model_mismatches + self.mismatches),
        }


def check(target: ModuleTable, donor: ModuleTable) -> CompatReport:
    model_problems: list[str] = []
    if target.arch != donor.arch:
        model_problems.append(f"architecture: target is {target.arch!r}, donor is {donor.arch!r}")
    if target.vocab_size != donor.vocab_size:
        model_problems.append(f"vocabulary size: target {target.vocab_size}, donor {donor.vocab_size}")
    problems: list[str] = []
    ok: list[ModuleRef] = []
    for ref in sorted(set(target.modules) | set(donor.modules)):
        if ref not in donor.modules:
            problems.append(f"{ref}: only in the target")
            continue
        if ref not in target.modules:
            problems.append(f"{ref}: only in the donor")
            continue
        here = _pair_problems(ref, target.modules[ref], donor.modules[ref])
        problems.extend(here)
        t, d = target.modules[ref], donor.modules[ref]
        if t.dtype != d.dtype:       # listed, but the module stays transplantable: with an explicit cast
            problems.append(f"{ref}: dtype target {t.dtype} vs donor {d.dtype} (transplantable with --cast, "
                            "which converts the donor's values and reports the rounding error)")
        if not here and not model_problems:
            ok.append(ref)
    return CompatReport(target.arch, donor.arch, tuple(ok), tuple(problems), tuple(model_problems))


def _pair_problems(ref, t, d) -> list[str]:
    out = []
    if t.weight_shape != d.weight_shape:
        out.append(f"{ref}: weight shape target {list(t.weight_shape)} vs donor {list(d.weight_shape)}")
    if (t.bias_shape is None) != (d.bias_shape is None):
        has = "target" if t.bias_shape else "donor"
        out.append(f"{ref}: bias only in the {has}")
    elif t.bias_shape != d.bias_shape:
        out.append(f"{ref}: bias shape target {list(t.bias_shape)} vs donor {list(d.bias_shape)}")
    return out
