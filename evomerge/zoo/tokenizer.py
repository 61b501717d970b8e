"""The zoo's tokenizer: one token per character, plus one per toy-language word.

Digits are single tokens (arithmetic stays learnable for a tiny model) and every toy word
is one token (translation is a lookup). Built with the ``tokenizers`` library and saved as
a normal Hugging Face fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``), so
``AutoTokenizer`` and vLLM load it like any other.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from evomerge.zoo.skills import TOY_WORDS

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]


def build_tokenizer() -> Tokenizer:
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + TOY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Longest toy words first so "Bolu" is never split; anything else is one character.
    words = sorted(TOY_WORDS, key=len, reverse=True)
    pattern = "|".join(re.escape(w) for w in words) + "|."
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(SPECIALS)
    return tok


def save_tokenizer(out_dir: str | Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) to out_dir."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(), bos_token=BOS, eos_token=EOS, pad_token=PAD,
        unk_token=UNK, model_max_length=128, clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
