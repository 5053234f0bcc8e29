"""hla: hybrid linear attention (Kimi Linear) from kernels to models.

The public surface is small on purpose; everything else is internal and may change.
"""

__version__ = "0.1.0"

from hla.models import KimiLinearConfig, KimiLinearForCausalLM, load_model  # noqa: E402
from hla.ops.kda import kda  # noqa: E402

__all__ = ["KimiLinearConfig", "KimiLinearForCausalLM", "__version__", "kda", "load_model"]
