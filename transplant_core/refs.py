"""ModuleRef: the one small immutable type that names a transplantable module.

Names are normalised across architectures, `layers.<i>.<kind>`, where kind is one of
KINDS (e.g. `layers.3.mlp.down`), so that a Phi-3 `qkv_proj` and a GPT-2 `c_attn`
both read `attn.qkv`. Architectures without a table entry keep their own relative
module path as the kind (`layers.0.block.ff_in`), which still pairs one to one
between donor and target of that architecture.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidArgument

ATTENTION_KINDS = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv")
FFN_KINDS = ("mlp.gate", "mlp.up", "mlp.down", "mlp.gate_up")
KINDS = ATTENTION_KINDS + FFN_KINDS

_PATTERN = re.compile(r"^layers\.(\d+)\.([A-Za-z_][\w.]*)$")


@dataclass(frozen=True, order=True)
class ModuleRef:
    layer: int
    kind: str

    @classmethod
    def parse(cls, text: str) -> "ModuleRef":
        m = _PATTERN.match(text.strip())
        if not m:
            raise InvalidArgument(
                f"module name {text!r} is not of the form 'layers.<index>.<kind>' "
                f"(for example 'layers.0.mlp.down'); `transplant inspect MODEL` lists valid names"
            )
        return cls(int(m.group(1)), m.group(2))

    def __str__(self) -> str:
        return f"layers.{self.layer}.{self.kind}"

    @property
    def group(self) -> str:
        """'attention', 'ffn' or 'other' (for kinds found by the generic fallback)."""
        k = self.kind.lower()
        if k in ATTENTION_KINDS or "attn" in k or "attention" in k:
            return "attention"
        if k in FFN_KINDS or any(w in k for w in ("mlp", "fc", "ffn", "feed_forward", "dense_h", "dense_4h")):
            return "ffn"
        return "other"


def parse_refs(texts: str | list[str]) -> list[ModuleRef]:
    """Parse 'a,b,c' or a list of names; duplicates are an error, order is kept."""
    items = texts.split(",") if isinstance(texts, str) else list(texts)
    refs = [ModuleRef.parse(t) for t in items if t.strip()]
    if not refs:
        raise InvalidArgument("no module names given; pass e.g. --modules layers.0.mlp.down,layers.1.attn.q")
    dup = sorted({str(r) for r in refs if refs.count(r) > 1})
    if dup:
        raise InvalidArgument(f"module names repeated: {', '.join(dup)}")
    return refs
