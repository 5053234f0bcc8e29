import pytest
import torch

from hla.data.tasks import IGNORE_INDEX, MQAR, Palindrome, Stack, batch_at, make_task


def _scored(labels):
    return labels != IGNORE_INDEX


@pytest.mark.parametrize("random_fill", [True, False], ids=["random-fill", "zero-fill"])
def test_mqar_decoded_examples_answer_the_queries(random_fill):
    task = MQAR(vocab_size=64, num_kv_pairs=6, random_non_queries=random_fill)
    x, y = batch_at(task, 0, 16, 64, seed=3)
    n, half = 6, 32
    assert x.shape == y.shape == (16, 64) and x.dtype == y.dtype == torch.long
    for row in range(16):
        keys, vals = x[row, 0:2 * n:2], x[row, 1:2 * n:2]
        assert (keys >= 1).all() and (keys < half).all() and keys.unique().numel() == n
        assert (vals >= half).all() and (vals < 64).all() and vals.unique().numel() == n
        binding = dict(zip(keys.tolist(), vals.tolist(), strict=True))
        pos = _scored(y[row]).nonzero().flatten()
        assert pos.numel() == n and (pos > 2 * n).all()
        queried = x[row, pos - 1].tolist()
        assert sorted(queried) == sorted(binding)  # every key is asked exactly once
        for p, k in zip(pos.tolist(), queried, strict=True):
            assert y[row, p] == binding[k] == x[row, p]
        if not random_fill:
            filler = torch.ones(64, dtype=torch.bool)
            filler[:2 * n] = False
            filler[pos] = False
            filler[pos - 1] = False
            assert (x[row, filler] == 0).all()


def test_mqar_gaps_follow_a_decreasing_power_law():
    task = MQAR(vocab_size=256, num_kv_pairs=4, random_non_queries=False)
    _, y = batch_at(task, 0, 512, 128, seed=0)
    pos = _scored(y).nonzero()[:, 1]
    slot = (pos - 1 - 8) // 2  # answer position -> query slot index
    counts = torch.bincount(slot, minlength=60).float()
    # p(g) ~ g^-0.99: early slots far more often than late ones, but every region is reachable
    assert counts[:10].sum() > 2 * counts[-30:].sum() > 0


def test_palindrome_second_half_is_the_reverse():
    task = Palindrome(vocab_size=20)
    x, y = batch_at(task, 5, 8, 33, seed=1)
    n = 16
    assert (x[:, n] == task.SEP).all()
    assert torch.equal(x[:, n + 1:], x[:, :n].flip(1))
    assert torch.equal(y[:, n + 1:], x[:, :n].flip(1)) and (y[:, :n + 1] == IGNORE_INDEX).all()
    assert (x[:, :n] >= 2).all()
    x2, y2 = batch_at(task, 5, 8, 34, seed=1)  # even length: one trailing PAD, not scored
    assert x2[0, -1] == task.PAD and y2[0, -1] == IGNORE_INDEX


def test_stack_pops_return_the_last_pushed_value():
    task = Stack(vocab_size=200, num_stacks=64)
    x, y = batch_at(task, 0, 4, 512, seed=2)
    S = 64
    n_pops = 0
    for row in range(4):
        stacks = [[] for _ in range(S)]
        for i in range(0, 512, 2):
            op, v = int(x[row, i]), int(x[row, i + 1])
            assert v >= task.first_value
            if 1 <= op <= S:
                stacks[op - 1].append(v)
                assert y[row, i + 1] == IGNORE_INDEX
            else:
                assert S + 1 <= op <= 2 * S
                assert stacks[op - S - 1], "popped an empty stack"
                assert stacks[op - S - 1].pop() == v == int(y[row, i + 1])
                n_pops += 1
            assert y[row, i] == IGNORE_INDEX
    assert n_pops > 300  # about half the ops pop


@pytest.mark.parametrize("name", ["mqar", "palindrome", "stack"])
def test_tasks_are_reproducible_from_the_seed(name):
    task = make_task(name, vocab_size=160) if name != "stack" else make_task(name, vocab_size=160, num_stacks=8)
    a = batch_at(task, 7, 4, 64, seed=11)
    b = batch_at(task, 7, 4, 64, seed=11)
    c = batch_at(task, 8, 4, 64, seed=11)
    d = batch_at(task, 7, 4, 64, seed=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="seq_len"):
        batch_at(MQAR(vocab_size=64, num_kv_pairs=8), 0, 2, 16, seed=0)
    with pytest.raises(ValueError, match="vocab_size"):
        Stack(vocab_size=100, num_stacks=64)
    with pytest.raises(ValueError, match="task"):
        make_task("copying")
