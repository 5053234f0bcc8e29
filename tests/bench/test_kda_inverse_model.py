"""benchmarks/kda_inverse_model.py: with exact products both ways of forming M are the inverse, and the script runs."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import kda_inverse_model as im  # noqa: E402


def test_both_forms_are_the_inverse_with_exact_products(monkeypatch):
    monkeypatch.setattr(im, "bf16x3", lambda a, b: a @ b)
    monkeypatch.setattr(im, "fp32", lambda x: x)
    torch.manual_seed(0)
    N = torch.tril(torch.randn(3, 64, 64, dtype=torch.float64) * 0.2, diagonal=-1)
    eye = torch.eye(64, dtype=torch.float64)
    exact = torch.linalg.inv(eye + N)
    for fn in (im.inverse_blocks, im.inverse_product_form):
        assert ((fn(N) - exact).norm() / exact.norm()).item() < 1e-12


def test_rounded_products_stay_near_the_inverse_and_the_script_runs():
    torch.manual_seed(0)
    N = torch.tril(torch.randn(2, 64, 64, dtype=torch.float64) * 0.05, diagonal=-1)
    exact = torch.linalg.inv(torch.eye(64, dtype=torch.float64) + N)
    for fn in (im.inverse_blocks, im.inverse_product_form):
        err = ((fn(N) - exact).norm() / exact.norm()).item()
        assert 1e-9 < err < 1e-4
    assert im.main(["--gates", "safe", "--T", "128", "--dim", "16", "--key-directions", "2"]) == 0
