import torch

from hla.data.text import EOS, build_text_data, load_tokenizer, split_texts, train_tokenizer

TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20,
    "ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n" * 20,
]


def test_tokenizer_is_reproducible_and_round_trips(tmp_path):
    a = train_tokenizer(TEXTS, vocab_size=300, path=tmp_path / "a" / "tokenizer.json")
    b = train_tokenizer(TEXTS, vocab_size=300)
    assert a.get_vocab() == b.get_vocab()
    loaded = load_tokenizer(tmp_path / "a" / "tokenizer.json")
    s = "But soft, what light? Zounds! é"
    assert loaded.decode(loaded.encode(s).ids) == s  # byte-level: unseen characters survive
    assert loaded.token_to_id(EOS) is not None


def test_split_and_batches(tmp_path):
    train, held = split_texts(TEXTS, held_out_frac=0.1)
    for t, tr, h in zip(TEXTS, train, held, strict=True):
        assert tr + h == t and 0 < len(h) < 0.2 * len(t) and tr.endswith("\n")
    tok = train_tokenizer(train, vocab_size=300)
    data = build_text_data(TEXTS, tok, held_out_frac=0.1)
    assert data.vocab_size == tok.get_vocab_size() and data.held_out.numel() > 0
    x, y = data.batch(3, 4, 32, seed=0)
    assert x.shape == (4, 32) and torch.equal(x, y)
    assert torch.equal(x, data.batch(3, 4, 32, seed=0)[0])
    # every window is a contiguous slice of the train stream
    n = data.train.numel()
    for row in x:
        hits = [s for s in range(n - 31) if torch.equal(data.train[s:s + 32], row)]
        assert hits
