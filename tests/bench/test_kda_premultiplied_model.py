"""benchmarks/kda_premultiplied_model.py: without rounding both walk forms are the exact recurrence (the
premultiplication is an identity), and its bf16 roundings move the output by bf16 amounts."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import kda_premultiplied_model as pm  # noqa: E402


def _inputs(gate="kimi", T=128, HV=2, D=16):
    torch.manual_seed(0)
    return pm.make_inputs(1, T, HV, HV, D, D, gate, torch.device("cpu"), dtype=torch.float64)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("gate", ["kimi", "safe"])
def test_both_forms_are_the_recurrence_without_rounding(gate, monkeypatch):
    monkeypatch.setattr(pm, "bf16", lambda x: x)
    x = _inputs(gate)
    _, o_ref, s_ref = pm.run_ref(x)
    for _, form, z_out, z_state in pm.VARIANTS:
        o, s = pm.walk(x, form, z_out, z_state)
        assert _rel(o, o_ref) < 1e-10 and _rel(s, s_ref) < 1e-10, form


def test_the_roundings_move_the_output_by_bf16_amounts():
    x = _inputs()
    _, o_ref, s_ref = pm.run_ref(x)
    for _, form, z_out, z_state in pm.VARIANTS:
        o, s = pm.walk(x, form, z_out, z_state)
        assert 1e-4 < _rel(o, o_ref) < 1e-2 and 1e-4 < _rel(s, s_ref) < 1e-2, form
    assert pm.main(["--gates", "safe", "--draws", "1", "--T", "128", "--dim", "16"]) == 0
