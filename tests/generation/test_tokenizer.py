import json

import pytest

from hla.generation.tokenizer import ByteTokenizer, HFTokenizer, TextStreamer, load_tokenizer


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.bos_token_id and max(ids[1:]) < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<|bos|>" + text
    assert tok.decode([104, 105, 10_000]) == "hi\ufffd"


def test_load_tokenizer_falls_back_to_bytes(tmp_path):
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    with pytest.raises(ValueError, match="directory"):
        load_tokenizer(tmp_path / "missing")


def _train_bpe(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(path / "tokenizer.json"))


def test_load_tokenizer_reads_tokenizer_json(tmp_path):
    _train_bpe(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1 and tok.special_ids == {0, 1}
    ids = tok.encode("the lazy fox", add_bos=True)
    assert ids[0] == 0 and len(ids) < 1 + len("the lazy fox")
    assert tok.decode(ids) == "the lazy fox"


def test_text_streamer_never_splits_characters():
    tok = ByteTokenizer()
    text = "añb ✓ 日本"
    s = TextStreamer(tok)
    pieces = [s.push(i) for i in tok.encode(text)]
    assert "".join(pieces) + s.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_text_streamer_with_bpe_keeps_spaces(tmp_path):
    _train_bpe(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "the quick brown dog jumps"
    s = TextStreamer(tok)
    assert "".join(s.push(i) for i in tok.encode(text)) + s.flush() == text
