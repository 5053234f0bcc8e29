"""Tokenizers: a model directory's ``tokenizer.json`` (HF ``tokenizers``) or a byte-level fallback.

Both expose the same small surface: ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``vocab_size``, ``bos_token_id``, ``eos_token_id`` and ``special_ids``. ``TextStreamer`` turns a
stream of ids into text pieces without splitting multi-byte characters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the special tokens.

    Ids a model may produce beyond this vocabulary (a randomly initialised model's, say) decode
    to U+FFFD so that the output stays printable.
    """

    special_tokens = ("<|bos|>", "<|eos|>", "<|pad|>")

    def __init__(self) -> None:
        self.bos_token_id = 256
        self.eos_token_id = 257
        self.pad_token_id = 258
        self.vocab_size = 256 + len(self.special_tokens)
        self.special_ids = frozenset(range(256, self.vocab_size))

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if i in self.special_ids:
                if not skip_special_tokens:
                    parts.append(self.special_tokens[i - 256])
            else:
                parts.append("\ufffd")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from ``tokenizer.json``, with bos/eos from the directory's configs."""

    def __init__(self, path: str | os.PathLike, *, bos_token: str | None = None, eos_token: str | None = None):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._tok.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = self._tok.token_to_id(eos_token) if eos_token else None
        self.special_ids = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if getattr(t, "special", False)
        )

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _token_name(value) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(model_dir: str | os.PathLike | None) -> HFTokenizer | ByteTokenizer:
    """The tokenizer of ``model_dir``: its ``tokenizer.json`` if present, else ``ByteTokenizer``.

    bos/eos names come from ``tokenizer_config.json`` (``bos_token``/``eos_token``) when present.
    ``None`` gives the byte-level tokenizer (for randomly initialised models).
    """
    if model_dir is None:
        return ByteTokenizer()
    d = Path(model_dir)
    if not d.is_dir():
        raise ValueError(f"model_dir must be a directory, got {str(d)!r}")
    path = d / "tokenizer.json"
    if not path.is_file():
        return ByteTokenizer()
    bos = eos = None
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        meta = json.loads(cfg.read_text())
        bos, eos = _token_name(meta.get("bos_token")), _token_name(meta.get("eos_token"))
    return HFTokenizer(path, bos_token=bos, eos_token=eos)


class TextStreamer:
    """Turns token ids, one at a time, into printable text pieces.

    Decoding each id alone would split multi-byte characters and lose the spaces some
    tokenizers attach to the next token, so it decodes a short window: the text of
    ``ids[prefix:]`` minus that of ``ids[prefix:read]``, and holds back output that ends in an
    incomplete character (U+FFFD) until the next id completes it.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return now[len(before) :]
