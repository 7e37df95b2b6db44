"""RocketKV's official passkey prompts (``eval/passkey_utils`` of NVlabs/RocketKV), lengths counted in words.

The haystack is a text read from a file (or the ``.txt`` files of a folder, in name order), repeated until it has
enough words and cut to exactly ``length`` words; the needle goes in after ``int(length * depth)`` words.  The prompt
is ``INSTRUCTION + content + QUESTION`` with ``content = " ".join([before, needle, after, ""])``, fed raw (no
template), and the model completes "The pass key is ".  A word is a run of non-space characters with the
whitespace after it, as in the official code.
"""
from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache
from pathlib import Path

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is "
WORD = re.compile(r"[^\s]+[\s]*")


def haystack_path(value) -> Path:
    """The user's haystack file or folder; a clear error when it is not given or does not exist."""
    if value in (None, ""):
        raise ValueError("task.haystack=file needs haystack_file=<text file or folder of .txt files> (or "
                         "task.haystack_file=...), e.g. Paul Graham's essays (see docs/protocol.md)")
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise ValueError(f"task.haystack_file={str(value)!r} does not exist; give a text file or a folder of .txt "
                         "files")
    if path.is_dir() and not any(path.glob("*.txt")):
        raise ValueError(f"task.haystack_file={str(value)!r} is a folder without .txt files")
    return path


def haystack_texts(path: str) -> tuple[tuple[str, int], ...]:
    """The haystack's texts (a folder's .txt files in name order) with their word counts."""
    p = Path(path)
    files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    return _read(tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))


@lru_cache(maxsize=4)
def _read(files: tuple[tuple[str, int, int], ...]) -> tuple[tuple[str, int], ...]:
    texts = [Path(f).read_text(encoding="utf-8") for f, _, _ in files]
    return tuple((t, len(WORD.findall(t))) for t in texts)


def haystack_sha256(path: str) -> str:
    h = hashlib.sha256()
    for text, _ in haystack_texts(path):
        h.update(text.encode())
    return h.hexdigest()


def cut_words(text: str, start: int, end: int) -> str:
    """Words ``[start, end)`` of ``text``, stripped (official ``truncate_string_by_word_count``)."""
    return "".join(WORD.findall(text)[start:end]).strip() if start < end else ""


def background(texts: tuple[tuple[str, int], ...], length: int) -> str:
    """The texts appended in order, cycling, until they hold ``length`` words, then cut to ``length`` words."""
    if not any(n for _, n in texts):
        raise ValueError("the haystack file has no words")
    parts, count = [], 0
    while count < length:
        for text, n in texts:
            parts.append(text)
            count += n
            if count >= length:
                break
    return cut_words("".join(parts), 0, length)


def passkey_prompt(texts: tuple[tuple[str, int], ...], length: int, depth: float, key: str) -> str:
    hay = background(texts, length)
    n = len(WORD.findall(hay))
    cut = int(n * depth)
    content = " ".join([cut_words(hay, 0, cut), NEEDLE.format(key=key), cut_words(hay, cut, n), ""])
    return INSTRUCTION + content + QUESTION


def passkey(rng: random.Random, digits: int) -> str:
    """``digits`` random decimal digits (a leading 0 allowed), as the official ``make_raw_answer``."""
    return "".join(rng.choice("0123456789") for _ in range(digits))
