"""From a task's ``Sample`` to the token ids the model sees: middle truncation, chat template, answer prefix."""
from __future__ import annotations

from typing import Any

from evals.base import Sample


def truncate_middle(ids: list[int], max_len: int) -> list[int]:
    """Keep the first and last halves (in tokens) when ``ids`` is longer than ``max_len``."""
    if max_len <= 0:
        raise ValueError(f"max prompt length must be positive, got {max_len}")
    if len(ids) <= max_len:
        return list(ids)
    half = max_len // 2
    return list(ids[:half]) + list(ids[len(ids) - (max_len - half):])


def uses_chat_template(tokenizer: Any, sample: Sample, model_chat: bool) -> bool:
    return bool(sample.chat_template and model_chat and getattr(tokenizer, "chat_template", None))


def prompt_token_ids(tokenizer: Any, sample: Sample, model_chat: bool, model_max_len: int) -> list[int]:
    """Token ids of the final prompt.

    As in LongBench's official protocol, the raw prompt is truncated in the middle to leave room for the
    generated tokens and the template, then wrapped in the chat template (when both the task and the model use
    one), then followed by the task's answer prefix.  A sample with ``prompt_ids`` is used as it is; it must
    leave room for ``max_new_tokens``.
    """
    if sample.prompt_ids is not None:
        ids = [int(i) for i in sample.prompt_ids]
        if len(ids) + sample.max_new_tokens > model_max_len:
            raise ValueError(f"sample {sample.id!r}: {len(ids)} prompt tokens plus {sample.max_new_tokens} new tokens "
                             f"exceed the model's max length {model_max_len}")
        return ids
    raw = tokenizer(sample.prompt, add_special_tokens=False).input_ids
    chat = uses_chat_template(tokenizer, sample, model_chat)
    overhead = len(_wrap(tokenizer, "", chat, sample.answer_prefix))
    kept = truncate_middle(raw, model_max_len - sample.max_new_tokens - overhead)
    text = sample.prompt if len(kept) == len(raw) else tokenizer.decode(kept, skip_special_tokens=True)
    return _wrap(tokenizer, text, chat, sample.answer_prefix)


def prompt_rows(tokenizer: Any, sample: Sample, model_chat: bool, model_max_len: int) -> list[list[int]]:
    """The token ids of every row of the sample: one row, or ``prompt_ids``' rows for a batch of equal-length
    prompts (``task=efficiency``)."""
    ids = sample.prompt_ids
    if ids and isinstance(ids[0], (list, tuple)):
        rows = [[int(i) for i in row] for row in ids]
        if len({len(row) for row in rows}) != 1:
            raise ValueError(f"sample {sample.id!r}: the rows of a batch must have equal lengths, got "
                             f"{sorted({len(row) for row in rows})}")
        if len(rows[0]) + sample.max_new_tokens > model_max_len:
            raise ValueError(f"sample {sample.id!r}: {len(rows[0])} prompt tokens plus {sample.max_new_tokens} new "
                             f"tokens exceed the model's max length {model_max_len}")
        return rows
    return [prompt_token_ids(tokenizer, sample, model_chat, model_max_len)]


def _wrap(tokenizer: Any, text: str, chat: bool, answer_prefix: str) -> list[int]:
    if chat:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return tokenizer(rendered + answer_prefix, add_special_tokens=False).input_ids
    return tokenizer(text + answer_prefix, add_special_tokens=True).input_ids


def conversation_token_ids(tokenizer: Any, sample: Sample, model_max_len: int) -> list[list[int]]:
    """Token ids of each turn of a conversation: the first holds the context and the first turn's text, the
    others their turn's text only (each is fed after the previous answer).  Raw text, no chat template.  The
    context is truncated in the middle so that every turn and every answer (``max_new_tokens`` each) fits."""
    turns = [tokenizer(t.prompt, add_special_tokens=False).input_ids for t in sample.turns]
    context = tokenizer(sample.prompt, add_special_tokens=True).input_ids
    room = model_max_len - sum(len(t) for t in turns) - len(turns) * sample.max_new_tokens
    if room < 1:
        raise ValueError(f"sample {sample.id!r}: its {len(turns)} turns and their answers do not fit the model's max "
                         f"length {model_max_len}")
    return [truncate_middle(context, room) + turns[0], *turns[1:]]
