"""Data: synthetic recall tasks (tasks.py) and Shakespeare text with a local BPE tokenizer (text.py)."""

from hla.data.tasks import MQAR, Palindrome, Stack, batch_at, make_task

__all__ = ["MQAR", "Palindrome", "Stack", "batch_at", "make_task"]
