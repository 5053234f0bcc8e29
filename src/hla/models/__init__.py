"""Models: configuration, the Kimi Linear model, checkpoint I/O."""

from hla.models.config import KimiLinearConfig
from hla.models.kimi_linear import CausalLMOutput, KimiLinearForCausalLM


def load_model(path, *, device=None, dtype=None, **kwargs):
    """Load a Kimi Linear checkpoint directory; see ``hla.models.checkpoint.load_model``."""
    from hla.models.checkpoint import load_model as _load

    return _load(path, device=device, dtype=dtype, **kwargs)


__all__ = ["CausalLMOutput", "KimiLinearConfig", "KimiLinearForCausalLM", "load_model"]
