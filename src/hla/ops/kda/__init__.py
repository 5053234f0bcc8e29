"""Kimi Delta Attention: gated delta rule with a per-channel decay and an fp32 K x V state."""

from hla.ops.kda.api import kda, kda_decode
from hla.ops.kda.gate import kda_gate, l2norm
from hla.ops.kda.reference import kda_reference

__all__ = ["kda", "kda_decode", "kda_gate", "kda_reference", "l2norm"]
