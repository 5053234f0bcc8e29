"""Synthetic recall tasks from Zoology and the Kimi Linear report, as seeded batch generators.

Every task returns ``(input_ids, labels)``, both ``[B, T]`` int64, with labels aligned to the inputs
(``labels[:, t] == input_ids[:, t]`` where scored, -100 elsewhere): the model shifts them inside, so position
``t - 1`` is trained to predict the answer token at ``t``. Only answer tokens are scored.

Batches are a pure function of ``(seed, index)`` (see :func:`batch_at`), so a resumed or data-parallel run sees
exactly the batches an uninterrupted single-process run sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


def step_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for batch ``index`` of the stream ``seed``; SeedSequence mixes the two so nearby
    (seed, index) pairs give unrelated streams."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    mixed = int(np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32).astype(np.uint64) @
                np.array([1 << 32, 1], dtype=np.uint64)) & ((1 << 63) - 1)
    return torch.Generator().manual_seed(mixed)


def _check_batch(batch_size: int, seq_len: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if seq_len <= 1:
        raise ValueError(f"seq_len must be > 1, got {seq_len}")


@dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall (Arora, Eyuboglu et al., "Zoology", arXiv 2312.04927).

    Layout of one example of length T with n = num_kv_pairs::

        k1 v1 k2 v2 ... kn vn | x x kq vq x x ... kq' vq' x ...
        keys in [1, V/2), values in [V/2, V), all keys distinct; every key is queried exactly once.

    Query i sits at slot ``gap_i`` of the (T - 2n) // 2 two-token slots after the context, the gaps drawn without
    replacement from the power law p(g) ~ a * g^(a-1) (a = ``power_a``; small gaps are likelier, as repeated
    bigrams are in real text). The answer (the value bound to that key) follows the query and is the only scored
    token. Filler positions get uniform random tokens when ``random_non_queries`` (Zoology's default), else 0.
    """

    vocab_size: int = 8192
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = True
    name: str = "mqar"

    def __post_init__(self) -> None:
        if self.vocab_size < 2 * self.num_kv_pairs + 2:
            raise ValueError(f"vocab_size must be >= 2*num_kv_pairs+2, got {self.vocab_size} for "
                             f"num_kv_pairs={self.num_kv_pairs}")
        if self.num_kv_pairs <= 0:
            raise ValueError(f"num_kv_pairs must be > 0, got {self.num_kv_pairs}")
        if not 0.0 < self.power_a <= 1.0:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        _check_batch(batch_size, seq_len)
        n, V, B, T = self.num_kv_pairs, self.vocab_size, batch_size, seq_len
        if T < 4 * n:
            raise ValueError(f"seq_len must be >= 4*num_kv_pairs = {4 * n} for MQAR, got {T}")
        half = V // 2
        # distinct keys and values per row: the first n of a random permutation
        keys = torch.rand(B, half - 1, generator=generator).argsort(dim=1)[:, :n] + 1
        values = torch.rand(B, V - half, generator=generator).argsort(dim=1)[:, :n] + half

        slots = (T - 2 * n) // 2
        a = self.power_a
        logp = torch.log(a * torch.arange(1, slots + 1, dtype=torch.float64) ** (a - 1))
        # sampling without replacement from p == top-n of log p + Gumbel noise (Plackett-Luce)
        u = torch.rand(B, slots, generator=generator, dtype=torch.float64).clamp_min(1e-300)
        gaps = (logp - torch.log(-torch.log(u))).topk(n, dim=1).indices  # [B, n]

        if self.random_non_queries:
            input_ids = torch.randint(0, V, (B, T), generator=generator)
        else:
            input_ids = torch.zeros(B, T, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        input_ids[:, 0:2 * n:2] = keys
        input_ids[:, 1:2 * n:2] = values
        q_pos = 2 * n + 2 * gaps
        input_ids.scatter_(1, q_pos, keys)
        input_ids.scatter_(1, q_pos + 1, values)
        labels.scatter_(1, q_pos + 1, values)
        return input_ids, labels


@dataclass(frozen=True)
class Palindrome:
    """Reproduce a random sequence in reverse (Kimi Linear report, arXiv 2510.26692, synthetic tests).

    ``x1 .. xn SEP xn .. x1 [PAD]`` with n = (T - 1) // 2, symbols in [2, V), SEP = 1, PAD = 0; the reversed half
    is scored. Reversal needs the whole sequence in memory at once: the hardest case for a fixed-size state.
    """

    vocab_size: int = 64
    name: str = "palindrome"
    SEP: int = 1
    PAD: int = 0

    def __post_init__(self) -> None:
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4, got {self.vocab_size}")

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        _check_batch(batch_size, seq_len)
        if seq_len < 3:
            raise ValueError(f"seq_len must be >= 3 for Palindrome, got {seq_len}")
        B, T = batch_size, seq_len
        n = (T - 1) // 2
        x = torch.randint(2, self.vocab_size, (B, n), generator=generator)
        input_ids = torch.full((B, T), self.PAD, dtype=torch.long)
        input_ids[:, :n] = x
        input_ids[:, n] = self.SEP
        input_ids[:, n + 1:2 * n + 1] = x.flip(1)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        labels[:, n + 1:2 * n + 1] = x.flip(1)
        return input_ids, labels


@dataclass(frozen=True)
class Stack:
    """Track many independent stacks (Kimi Linear report, arXiv 2510.26692, synthetic tests).

    A sequence of two-token operations over ``num_stacks`` stacks: ``PUSH_s v`` pushes value v on stack s,
    ``POP_s v`` pops stack s and v (the popped value) is the scored answer. Token ids: 0 PAD, 1..S PUSH_s,
    S+1..2S POP_s, values in [2S+1, V). Each op pops a uniformly chosen non-empty stack with probability
    ``pop_prob`` (when any stack is non-empty), else pushes a fresh random value on a uniformly chosen stack.
    """

    vocab_size: int = 256
    num_stacks: int = 64
    pop_prob: float = 0.5
    name: str = "stack"

    def __post_init__(self) -> None:
        if self.num_stacks <= 0:
            raise ValueError(f"num_stacks must be > 0, got {self.num_stacks}")
        if self.vocab_size < 2 * self.num_stacks + 3:
            raise ValueError(f"vocab_size must be >= 2*num_stacks+3 = {2 * self.num_stacks + 3}, "
                             f"got {self.vocab_size}")
        if not 0.0 <= self.pop_prob < 1.0:
            raise ValueError(f"pop_prob must be in [0, 1), got {self.pop_prob}")

    @property
    def first_value(self) -> int:
        return 2 * self.num_stacks + 1

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        _check_batch(batch_size, seq_len)
        B, S, T = batch_size, self.num_stacks, seq_len
        n_ops = T // 2
        rows = torch.arange(B)
        stacks = torch.zeros(B, S, n_ops + 1, dtype=torch.long)
        depth = torch.zeros(B, S, dtype=torch.long)
        input_ids = torch.zeros(B, T, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for i in range(n_ops):
            nonempty = depth > 0
            want_pop = torch.rand(B, generator=generator) < self.pop_prob
            # uniform choice among non-empty stacks: argmax of noise with empty stacks masked out
            pick = torch.rand(B, S, generator=generator).masked_fill(~nonempty, -1.0).argmax(dim=1)
            do_pop = want_pop & nonempty.any(dim=1)
            push_s = torch.randint(0, S, (B,), generator=generator)
            push_v = torch.randint(self.first_value, self.vocab_size, (B,), generator=generator)
            s = torch.where(do_pop, pick, push_s)
            d = depth[rows, s]
            popped = stacks[rows, s, (d - 1).clamp_min(0)]
            stacks[rows, s, d] = torch.where(do_pop, stacks[rows, s, d], push_v)
            depth[rows, s] = d + torch.where(do_pop, -1, 1)
            input_ids[:, 2 * i] = torch.where(do_pop, S + 1 + s, 1 + s)
            value = torch.where(do_pop, popped, push_v)
            input_ids[:, 2 * i + 1] = value
            labels[:, 2 * i + 1] = torch.where(do_pop, value, IGNORE_INDEX)
        return input_ids, labels


TASKS = {"mqar": MQAR, "palindrome": Palindrome, "stack": Stack}


def make_task(name: str, **kwargs: object) -> MQAR | Palindrome | Stack:
    """Build a synthetic task by name with its dataclass fields as keyword arguments."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](**kwargs)


def batch_at(task, index: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch number ``index`` of the stream ``seed`` (deterministic; any task with ``.sample``)."""
    return task.sample(batch_size, seq_len, step_generator(seed, index))
