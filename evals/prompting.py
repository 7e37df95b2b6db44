"""From a task's ``Sample`` to the token ids the model sees: chat format, BOS, middle truncation, answer prefix.

Two truncation rules (``PromptFormat.max_prompt_len``):

- ``None`` (default): LongBench's official ``pred.py``: the raw prompt is cut in the middle to leave room for the
  generated tokens and the template, then wrapped in the chat format.
- an int ``N``: RocketKV's official harness: the whole prompt (chat format, BOS and answer prefix included) is
  tokenised; when it is longer than ``N`` tokens, its first ``N // 2`` and last ``N // 2`` tokens are decoded (special
  tokens skipped) and the joined text is tokenised again with the same BOS rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evals.base import Sample

# FastChat's "vicuna" conversation (vicuna_v1.1): system prompt, "USER: <prompt> ASSISTANT:" (sep " ").
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions.")
# RULER's literal "llama3" template (its data/template.py): no system block, unlike Llama-3.1's own chat template.
LLAMA3_TEMPLATE = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")

PROMPT_FORMATS = ("chat_template", "llama3", "vicuna", "raw")
BOS_RULES = ("auto", "true", "false")


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt that asks for the chat template (``Sample.chat_template``) is built, and the truncation cap.

    ``format``: ``chat_template`` (the tokenizer's own), ``llama3`` (RULER's Llama-3 text), ``vicuna`` (FastChat's
    vicuna conversation), ``raw`` (the prompt text unchanged).  ``add_bos``: whether the tokenizer adds its special
    tokens (BOS) in front of such a prompt: ``auto`` (not for ``chat_template``, whose text carries its own; yes for
    the others), ``true`` or ``false``.  Prompts of tasks that use no template always get the tokenizer's BOS.
    ``max_prompt_len``: the cap of the templated prompt (module docstring), or None.
    """

    format: str = "chat_template"
    add_bos: str = "auto"
    max_prompt_len: int | None = None

    def __post_init__(self):
        if self.format not in PROMPT_FORMATS:
            raise ValueError(f"model.prompt_format={self.format!r} is not valid; use one of "
                             f"{', '.join(PROMPT_FORMATS)}")
        add_bos = ("true" if self.add_bos else "false") if isinstance(self.add_bos, bool) else str(self.add_bos)
        if add_bos not in BOS_RULES:
            raise ValueError(f"model.add_bos={self.add_bos!r} is not valid; use auto, true or false")
        object.__setattr__(self, "add_bos", add_bos)
        cap = self.max_prompt_len
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 2):
            raise ValueError(f"model.max_prompt_len={cap!r} is not valid; give a positive number of tokens (>= 2), "
                             "or null for no cap")

    def bos(self, chat: bool) -> bool:
        """Whether the tokenizer adds its special tokens to a prompt (``chat``: built in this format)."""
        if not chat or self.add_bos == "auto":
            return not (chat and self.format == "chat_template")
        return self.add_bos == "true"


DEFAULT_FORMAT = PromptFormat()


def truncate_middle(ids: list[int], max_len: int) -> list[int]:
    """Keep the first and last halves (in tokens) when ``ids`` is longer than ``max_len``."""
    if max_len <= 0:
        raise ValueError(f"max prompt length must be positive, got {max_len}")
    if len(ids) <= max_len:
        return list(ids)
    half = max_len // 2
    return list(ids[:half]) + list(ids[len(ids) - (max_len - half):])


def uses_chat_template(tokenizer: Any, sample: Sample, model_chat: bool, fmt: PromptFormat = DEFAULT_FORMAT) -> bool:
    """The sample is built in the model's chat format: the task and the model use one (and the tokenizer has a
    template, for ``chat_template``)."""
    if not (sample.chat_template and model_chat):
        return False
    return fmt.format != "chat_template" or bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, text: str, chat: bool, fmt: PromptFormat) -> str:
    """The prompt text in the chat format (``text`` itself when ``chat`` is false or the format is ``raw``)."""
    if not chat or fmt.format == "raw":
        return text
    if fmt.format == "vicuna":
        return f"{VICUNA_SYSTEM} USER: {text} ASSISTANT:"
    if fmt.format == "llama3":
        return LLAMA3_TEMPLATE.format(prompt=text)
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_token_ids(tokenizer: Any, sample: Sample, model_chat: bool, model_max_len: int,
                     fmt: PromptFormat = DEFAULT_FORMAT) -> list[int]:
    """Token ids of the final prompt.

    Without ``fmt.max_prompt_len`` (LongBench's official protocol) the raw prompt is truncated in the middle to leave
    room for the generated tokens and the template, then wrapped in the chat format (when both the task and the
    model use one), then followed by the task's answer prefix.  With it, the whole prompt is truncated to the cap
    (module docstring).  A sample with ``prompt_ids`` is used as it is; it must leave room for ``max_new_tokens``.
    """
    if sample.prompt_ids is not None:
        ids = [int(i) for i in sample.prompt_ids]
        _check_fits(sample, len(ids), model_max_len)
        return ids
    chat = uses_chat_template(tokenizer, sample, model_chat, fmt)
    bos = fmt.bos(chat)
    if fmt.max_prompt_len is not None:
        return _capped(tokenizer, sample, chat, bos, fmt, model_max_len)
    raw = tokenizer(sample.prompt, add_special_tokens=False).input_ids
    overhead = len(_encode(tokenizer, render(tokenizer, "", chat, fmt) + sample.answer_prefix, bos))
    kept = truncate_middle(raw, model_max_len - sample.max_new_tokens - overhead)
    text = sample.prompt if len(kept) == len(raw) else tokenizer.decode(kept, skip_special_tokens=True)
    return _encode(tokenizer, render(tokenizer, text, chat, fmt) + sample.answer_prefix, bos)


def _capped(tokenizer: Any, sample: Sample, chat: bool, bos: bool, fmt: PromptFormat, model_max_len: int) -> list[int]:
    cap = fmt.max_prompt_len
    if cap + sample.max_new_tokens > model_max_len:
        raise ValueError(f"model.max_prompt_len={cap} plus {sample.max_new_tokens} new tokens (sample "
                         f"{sample.id!r}) exceed the model's max length {model_max_len}; use max_prompt_len <= "
                         f"{model_max_len - sample.max_new_tokens}")
    ids = _encode(tokenizer, render(tokenizer, sample.prompt, chat, fmt) + sample.answer_prefix, bos)
    if len(ids) <= cap:
        return ids
    half = cap // 2
    text = (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True))
    return _encode(tokenizer, text, bos)


def _encode(tokenizer: Any, text: str, bos: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=bos).input_ids)


def _check_fits(sample: Sample, prompt_tokens: int, model_max_len: int) -> None:
    """Ids given as they are (``prompt_ids``) must leave room for the sample's new tokens."""
    if prompt_tokens + sample.max_new_tokens > model_max_len:
        raise ValueError(f"sample {sample.id!r}: {prompt_tokens} prompt tokens plus {sample.max_new_tokens} new tokens "
                         f"exceed the model's max length {model_max_len}")


def prompt_rows(tokenizer: Any, sample: Sample, model_chat: bool, model_max_len: int,
                fmt: PromptFormat = DEFAULT_FORMAT) -> list[list[int]]:
    """The token ids of every row of the sample: one row, or ``prompt_ids``' rows for a batch of equal-length
    prompts (``task=efficiency``)."""
    ids = sample.prompt_ids
    if ids and isinstance(ids[0], (list, tuple)):
        rows = [[int(i) for i in row] for row in ids]
        if len({len(row) for row in rows}) != 1:
            raise ValueError(f"sample {sample.id!r}: the rows of a batch must have equal lengths, got "
                             f"{sorted({len(row) for row in rows})}")
        _check_fits(sample, len(rows[0]), model_max_len)
        return rows
    return [prompt_token_ids(tokenizer, sample, model_chat, model_max_len, fmt)]


def context_length(tokenizer: Any, ids: list[int], sample: Sample) -> int:
    """How many of the prompt's ``ids`` come before its question (``sample.question``, the end of its text): the
    largest ``k`` whose suffix ``ids[k:]`` still decodes to text holding the whole question.  The split is made on
    the final ids (template, BOS and truncation included), so both modes feed exactly the same tokens."""
    wanted = sample.question.strip()
    decode = lambda k: tokenizer.decode(ids[k:], skip_special_tokens=False,  # noqa: E731
                                        clean_up_tokenization_spaces=False)
    if not wanted or wanted not in decode(0):
        raise ValueError(f"sample {sample.id!r}: its prompt has no question part the query-agnostic mode can split "
                         "off (task.query_aware=false); its task gives none, or truncation cut it")
    low, high = 0, len(ids)  # decode(low) holds the question, decode(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if wanted in decode(mid) else (low, mid)
    if low < 1:
        raise ValueError(f"sample {sample.id!r}: its prompt is all question; the query-agnostic mode needs a context")
    return low


def conversation_token_ids(tokenizer: Any, sample: Sample, model_max_len: int,
                           context_alone: bool = False) -> list[list[int]]:
    """Token ids of each turn of a conversation: the first holds the context and the first turn's text, the
    others their turn's text only (each is fed after the previous answer).  Raw text, no chat template.  The
    context is truncated in the middle so that every turn and every answer (``max_new_tokens`` each) fits.
    ``context_alone`` (the query-agnostic mode): the context is a row of its own, before the first turn's."""
    turns = [tokenizer(t.prompt, add_special_tokens=False).input_ids for t in sample.turns]
    context = tokenizer(sample.prompt, add_special_tokens=True).input_ids
    room = model_max_len - sum(len(t) for t in turns) - len(turns) * sample.max_new_tokens
    if room < 1:
        raise ValueError(f"sample {sample.id!r}: its {len(turns)} turns and their answers do not fit the model's max "
                         f"length {model_max_len}")
    if context_alone:
        return [truncate_middle(context, room), *turns]
    return [truncate_middle(context, room) + turns[0], *turns[1:]]
