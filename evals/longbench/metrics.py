"""LongBench v1 metrics, with the signatures of the official ``metrics.py``: ``fn(prediction, ground_truth, **kwargs)``.

Each returns a float in [0, 1] for one (prediction, reference) pair; the task takes the max over references.
The Chinese metrics need ``jieba``, imported only when one of them is called.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable


CHINESE_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟"
                       "〰〾〿–—‘’‛“”„‟…‧﹏.")
_PUNCTUATION = frozenset(string.punctuation)
_ZH_PUNCTUATION = frozenset(string.punctuation + CHINESE_PUNCTUATION)

JIEBA_MISSING = "the Chinese LongBench metrics need jieba, which is not installed: pip install jieba"


def _jieba():
    try:
        import jieba
    except ImportError:
        raise ImportError(JIEBA_MISSING) from None
    return jieba


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, the articles a/an/the and extra whitespace (SQuAD normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def token_f1(prediction_tokens: list[str], ground_truth_tokens: list[str]) -> float:
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    jieba = _jieba()

    def tokens(text: str) -> list[str]:
        normalized = (normalize_zh_answer(t) for t in jieba.cut(text, cut_all=False))
        return [t for t in normalized if t]

    return token_f1(tokens(prediction), tokens(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F of the ``rouge`` package; 0 when it refuses the input (empty hypothesis, recursion depth ...)."""
    from rouge import Rouge  # imported when scoring: a run refused before it needs no metric library

    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # the official code uses a bare except here: any failure scores 0
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    jieba = _jieba()
    prediction = " ".join(jieba.cut(prediction, cut_all=False))
    ground_truth = " ".join(jieba.cut(ground_truth, cut_all=False))
    return rouge_score(prediction, ground_truth)


def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """1/len(matches) when the ground truth is among the class names found in the prediction.

    A class name that is a strict substring of the ground truth is dropped (e.g. "abbreviation" inside
    "abbreviation expansion" would otherwise count twice).  The loop removes from the list it iterates over, as
    the official code does, so a candidate right after a removed one is not examined; kept for identical scores.
    """
    matches = [name for name in kwargs["all_classes"] if name in prediction]
    for name in matches:
        if name in ground_truth and name != ground_truth:
            matches.remove(name)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_of_numbers_equal_to(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == target for n in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _share_of_numbers_equal_to(prediction, str(ground_truth))


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _share_of_numbers_equal_to(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _share_of_numbers_equal_to(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def fuzzywuzzy_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` (the official code's scorer) computed with rapidfuzz.

    fuzzywuzzy returns ``int(round(100 * r))`` with r the python-Levenshtein ratio 2*LCS/(len(a)+len(b)) (the InDel
    similarity); rapidfuzz's ``fuzz.ratio`` is the same r times 100 as an unrounded float, so Python's ``round``
    (half to even, like fuzzywuzzy's ``int(round(...))``) gives the official integer.  Both give 100 for two equal
    strings (two empty ones included) and 0 when only one is empty.
    """
    from rapidfuzz import fuzz

    return int(round(fuzz.ratio(a, b)))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Similarity of the first prediction line that is not a comment or a markdown fence to the reference line."""
    first_code_line = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first_code_line = line
            break
    return fuzzywuzzy_ratio(first_code_line, ground_truth) / 100


Metric = Callable[..., float]

SUBSET_METRICS: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_count": count_score,
    "passage_retrieval_en": retrieval_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

METRICS_NEEDING_JIEBA: frozenset[Metric] = frozenset({qa_f1_zh_score, rouge_zh_score})
