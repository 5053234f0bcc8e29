import pytest
import torch

from hla.generation.cache import HybridCache
from hla.layers.mla import MultiheadLatentAttention
from hla.models.config import KimiLinearConfig


@pytest.mark.parametrize("T", [1, 2])
def test_layer_triton_path_equals_einsum_path(T):
    """MultiheadLatentAttention with the Triton kernel forced (interpreter on the CPU) = einsum path."""
    cfg = KimiLinearConfig.preset("tiny")
    idx = next(i for i in range(cfg.num_hidden_layers) if cfg.is_mla_layer(i))
    layer = MultiheadLatentAttention(cfg, idx)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    B, max_len, lengths = 3, 40, [4, 17, 9]
    outs = []
    x = torch.randn(B, T, cfg.hidden_size)
    for forced in (False, True):
        torch.manual_seed(1)
        cache = HybridCache.allocate(cfg, B, max_len, dtype=torch.float32)
        lc = cache.mla[idx]
        lc.latent.normal_()
        lc.k_pe.normal_()
        for b, n in enumerate(lengths):
            # Stale garbage past each row's length. Finite: the einsum path computes 0 * slot for
            # masked slots, so NaN there would break the reference (the kernel itself is tested
            # with NaN in test_mla_decode.py).
            lc.latent[b, n:] = 1e4
            lc.k_pe[b, n:] = 1e4
        cache.lengths.copy_(torch.tensor(lengths))
        cache._host_max_length = max(lengths)
        layer.triton_decode = forced
        try:
            with torch.no_grad():
                outs.append(layer(x, cache))
        finally:
            layer.triton_decode = None
    assert torch.isfinite(outs[1]).all()
    rel = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    assert rel < 1e-5, rel
