"""KDA in Triton: the chunked prefill (forward and backward) and the fused decode step.

Imported lazily by ``hla.ops.kda.api``; an ImportError here means "no triton backend".
"""

from hla.ops.kda.triton.chunk import kda_chunk_triton
from hla.ops.kda.triton.decode import kda_decode_triton

__all__ = ["kda_chunk_triton", "kda_decode_triton"]
