"""Offline stand-ins for the paper models' tokenizers (the real ones cannot be downloaded here).

Each maps every byte to one token (a byte-level BPE without merges), so the ids of an ASCII text are known in
advance (``byte_ids``) and decoding any slice gives its text back; each has its model's special tokens, BOS rule
(the tokenizer adds BOS when ``add_special_tokens=True``, as Llama-3's and Llama-2-style tokenizers do) and a chat
template of the same shape: Llama-3.1's with its system block, Mistral's ``[INST]``, none for LongChat.
"""
from __future__ import annotations

from functools import lru_cache

LLAMA3_TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n<|eot_id|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
    "<|end_header_id|>\n\n{% endif %}")
MISTRAL_TEMPLATE = "<s>{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"

SPECIALS = {
    "llama3.1-8b-instruct": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"],
                             LLAMA3_TEMPLATE),
    "mistral-7b-instruct-v0.2": ("<s>", "</s>", [], MISTRAL_TEMPLATE),
    "longchat-7b-v1.5-32k": ("<s>", "</s>", [], None),
}


@lru_cache(maxsize=None)
def standin_tokenizer(model: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos, extra, template = SPECIALS[model]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = [bos, eos, *extra]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({ch: len(specials) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = template
    return fast


def byte_ids(tokenizer, text: str) -> list[int]:
    """The ids of an ASCII ``text`` without special tokens: one per byte, written out without the tokenizer."""
    table = dict(zip(range(256), _byte_chars()))
    return [tokenizer.convert_tokens_to_ids(table[b]) for b in text.encode("ascii")]


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet, in byte order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars
