"""Routed experts of a sparse MoE: the per-token reference and a Triton path for small token counts."""

from hla.ops.moe.decode import MOE_DECODE_MAX_PAIRS, moe_experts_decode
from hla.ops.moe.reference import moe_experts_reference

__all__ = ["MOE_DECODE_MAX_PAIRS", "moe_experts_decode", "moe_experts_reference"]
