"""The self-check behind `hla demo`: every row passes, and a broken path is caught."""

import torch

import hla.ops.kda.api as api
from hla.ops.kda.selfcheck import run_selfcheck


def test_run_selfcheck_rows_pass():
    rows = run_selfcheck(dtypes=(torch.float32,))
    assert len(rows) == 6
    assert all(r.ok for r in rows), [(r.name, r.rel_error) for r in rows if not r.ok]


def test_run_selfcheck_catches_a_wrong_path(monkeypatch):
    real = api.chunk_kda_torch

    def off_by_a_bit(*args, **kwargs):
        o, s = real(*args, **kwargs)
        return o * 1.001, s

    monkeypatch.setattr(api, "chunk_kda_torch", off_by_a_bit)
    rows = run_selfcheck(dtypes=(torch.float32,))
    assert not next(r for r in rows if r.name == "torch chunked o").ok
