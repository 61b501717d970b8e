"""The zoo tokenizer is a normal HF tokenizer with single-token digits and toy words."""

from __future__ import annotations

from transformers import AutoTokenizer

from evomerge.zoo.skills import DIGIT_WORDS, TOY_WORDS
from evomerge.zoo.tokenizer import save_tokenizer


def test_saved_tokenizer_loads_with_autotokenizer(tmp_path):
    save_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer_config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "calc:KaMi+Bolu=12+34=46 rev:abc"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    tokens = tok.convert_ids_to_tokens(ids[1:])
    assert tokens[5:9] == ["Ka", "Mi", "+", "Bolu"]                  # toy words are one token each
    assert [t for t in tokens if t.isdigit()] == list("123446")       # digits are one token each
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.unk_token_id not in ids
    assert len({tok.convert_tokens_to_ids(w) for w in TOY_WORDS}) == len(TOY_WORDS)
    assert tok.pad_token_id != tok.eos_token_id
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in DIGIT_WORDS)
