import math

import pytest

from hla.training.schedule import lr_multiplier, warmup_cosine, wsd


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 100, 10, min_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    mid = 10 + (89 // 2)
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (mid - 10) / 89)))


def test_wsd_shape():
    lrs = [wsd(s, 100, 10, decay_frac=0.2) for s in range(100)]
    assert lrs[9] == 1.0 and all(v == 1.0 for v in lrs[10:82])
    assert lrs[-1] == pytest.approx(0.0) and all(a > b for a, b in zip(lrs[82:], lrs[83:], strict=False))


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="schedule"):
        lr_multiplier("linear", 0, 10, 1)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, 10, 20)
