"""Absorbed MLA decode attention: the float64-capable reference and a Triton flash-decoding path."""

from hla.ops.mla.decode_triton import mla_decode
from hla.ops.mla.reference import mla_decode_reference

__all__ = ["mla_decode", "mla_decode_reference"]
