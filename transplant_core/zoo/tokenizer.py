"""A character-level tokenizer that plain `AutoTokenizer.from_pretrained(dir)` loads.

Every character of ALPHABET is one token; anything else maps to <unk>. The
vocabulary is fixed so every model of the embedded family (and every tiny test
model) shares token ids, which is what makes their modules transplantable.
"""
from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:       # imported in build_tokenizer: ALPHABET and VOCAB_SIZE load without them
    from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " :=+-,.?"


def vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIALS + tuple(ALPHABET))}


# The family's chat template: the messages' texts joined by a space, nothing added (the
# alphabet has no newline or markup), so a one-message chat is the plain prompt:
# [{"role": "user", "content": "add:12+30="}] renders as "add:12+30=".
CHAT_TEMPLATE = "{% for m in messages %}{% if not loop.first %} {% endif %}{{ m['content'] }}{% endfor %}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab(), unk_token="<unk>"))
    # one token per character, spaces included; decoding just concatenates
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


VOCAB_SIZE = len(SPECIALS) + len(ALPHABET)
