"""Inference: the hybrid cache, sampling, batched generation with a CUDA-graph decode step."""

from hla.generation.generate import TokenStream, generate, prefill, stream
from hla.generation.graph import DecodeRunner
from hla.generation.sampling import SamplingParams, sample

__all__ = ["DecodeRunner", "SamplingParams", "TokenStream", "generate", "prefill", "sample", "stream"]
