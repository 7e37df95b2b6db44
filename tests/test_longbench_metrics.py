"""LongBench metrics against hand-computed values (the arithmetic is in the comments)."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest
from rapidfuzz import fuzz

from evals.longbench.metrics import (classification_score, code_sim_score, count_score, fuzzywuzzy_ratio,
                                     normalize_answer, qa_f1_score, qa_f1_zh_score, retrieval_score,
                                     retrieval_zh_score, rouge_score, rouge_zh_score)

HAS_JIEBA = importlib.util.find_spec("jieba") is not None


# ---------------------------------------------------------------- qa_f1_score
def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Eiffel-Tower, an icon!  ") == "eiffeltower icon"


def test_qa_f1_identical_after_normalisation():
    # "The Eiffel Tower!" -> "eiffel tower" on both sides: F1 = 1
    assert qa_f1_score("The Eiffel Tower!", "eiffel tower") == 1.0


def test_qa_f1_partial_overlap():
    # prediction tokens [red, apple, and, pear] (the articles go), reference [red, apple]:
    # common 2, P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert qa_f1_score("a red apple and a pear", "red apple") == pytest.approx(2 / 3)


def test_qa_f1_counts_repeated_tokens_once_per_match():
    # [yes, yes] vs [yes]: common 1, P = 1/2, R = 1, F1 = 2/3
    assert qa_f1_score("yes yes", "yes") == pytest.approx(2 / 3)


def test_qa_f1_no_overlap_and_empty():
    assert qa_f1_score("London", "Paris") == 0.0
    assert qa_f1_score("", "Paris") == 0.0
    # a reference made only of an article normalises to nothing: no common tokens, 0
    assert qa_f1_score("the answer", "the") == 0.0


# ---------------------------------------------------------------- rouge_score
def test_rouge_identical_is_one():
    # P = R = 1; the rouge package's F = 2PR / (P + R + 1e-8) = 1 - 5e-9
    assert rouge_score("the cat sat on a mat", "the cat sat on a mat") == pytest.approx(1.0, abs=1e-7)


def test_rouge_l_prefix():
    # LCS of [the, cat, sat] and [the, cat, sat, on, a, mat] is 3: P = 3/3, R = 3/6, F = 2 * 0.5 / 1.5 = 2/3
    assert rouge_score("the cat sat", "the cat sat on a mat") == pytest.approx(2 / 3, rel=1e-6)


def test_rouge_is_case_sensitive_like_the_official_scorer():
    # the rouge package does not lower-case: [The, Cat] shares no token with [the, cat]
    assert rouge_score("The Cat", "the cat") == 0.0


def test_rouge_empty_or_refused_input_scores_zero():
    assert rouge_score("", "the cat") == 0.0  # rouge raises "Hypothesis is empty"
    assert rouge_score("...", "the cat") == 0.0  # only sentence separators: empty as well
    assert rouge_score("the cat", "") == 0.0


# ---------------------------------------------------------------- classification_score
CLASSES = ["Date", "Date range", "Animal", "City"]


def test_classification_single_match():
    assert classification_score("City", "City", all_classes=CLASSES) == 1.0


def test_classification_drops_class_contained_in_the_ground_truth():
    # found: [Date, Date range]; "Date" is inside the ground truth "Date range" and differs from it -> dropped;
    # one match left, the ground truth: 1/1
    assert classification_score("Date range", "Date range", all_classes=CLASSES) == 1.0


def test_classification_several_matches_share_the_credit():
    # found: [Date, Date range, Animal]; none is a strict substring of "Animal": 3 matches, 1/3
    assert classification_score("Animal or Date range", "Animal", all_classes=CLASSES) == pytest.approx(1 / 3)


def test_classification_ground_truth_not_found():
    assert classification_score("Animal", "City", all_classes=CLASSES) == 0.0
    assert classification_score("", "City", all_classes=CLASSES) == 0.0


def test_classification_keeps_the_official_remove_while_iterating_behaviour():
    # found: [Date, Dat, Date range]; removing "Date" (index 0) shifts "Dat" to index 0, which the loop has
    # passed, so "Dat" stays: matches [Dat, Date range] -> 1/2 (the official scorer gives 0.5 too)
    classes = ["Date", "Dat", "Date range"]
    assert classification_score("Date range", "Date range", all_classes=classes) == 0.5


# ---------------------------------------------------------------- retrieval / count
def test_retrieval_score():
    assert retrieval_score("Paragraph 4", "Paragraph 4") == 1.0
    # numbers [4, 12], one equals 4: 1/2
    assert retrieval_score("Paragraph 4 or Paragraph 12", "Paragraph 4") == 0.5
    assert retrieval_score("Paragraph 14", "Paragraph 4") == 0.0  # whole numbers, not substrings
    assert retrieval_score("I do not know", "Paragraph 4") == 0.0


def test_retrieval_zh_score():
    assert retrieval_zh_score("段落3", "段落3") == 1.0
    # numbers [3, 13]: 1/2
    assert retrieval_zh_score("答案是段落3，不是段落13", "段落3") == 0.5


def test_count_score():
    assert count_score("3", "3") == 1.0
    # numbers [3, 5]: 1/2
    assert count_score("There are 3 unique paragraphs out of 5", "3") == 0.5
    assert count_score("three", "3") == 0.0


# ---------------------------------------------------------------- code_sim_score / fuzzywuzzy ratio
@pytest.mark.parametrize("a, b, lcs, expected", [
    # fuzzywuzzy: int(round(100 * 2*LCS / (len(a) + len(b)))), Python's round (half to even)
    ("abcd", "abce", 3, 75),          # 2*3/8 = 0.75 -> 75
    ("abc", "abd", 2, 67),            # 2*2/6 = 66.67 -> 67
    ("kitten", "sitting", 4, 62),     # LCS "ittn": 2*4/13 = 61.54 -> 62
    ("abcdefgh", "abcdexyz", 5, 62),  # 2*5/16 = 62.5 exactly -> 62 (half to even)
    ("abcdefgh", "abcdefgz", 7, 88),  # 2*7/16 = 87.5 exactly -> 88 (half to even)
])
def test_fuzzywuzzy_ratio_hand_checked(a, b, lcs, expected):
    # rapidfuzz's unrounded float is the python-Levenshtein ratio fuzzywuzzy rounds
    assert fuzz.ratio(a, b) == pytest.approx(100 * 2 * lcs / (len(a) + len(b)))
    assert fuzzywuzzy_ratio(a, b) == expected


def test_fuzzywuzzy_ratio_empty_strings():
    # fuzzywuzzy: equal strings give 100 (checked before emptiness), one empty string gives 0
    assert fuzzywuzzy_ratio("", "") == 100
    assert fuzzywuzzy_ratio("", "abc") == 0
    assert fuzzywuzzy_ratio("abc", "") == 0


def test_code_sim_takes_first_line_that_is_not_a_comment_or_fence():
    prediction = "\n```python\n# add one\n    return x + 1\nprint(x)\n```"
    assert code_sim_score(prediction, "    return x + 1") == 1.0
    assert code_sim_score("// js comment\nlet x = 1;", "let x = 1;") == 1.0


def test_code_sim_partial_and_empty():
    # "abcd" vs "abce": ratio 75 -> 0.75
    assert code_sim_score("abcd\nmore", "abce") == 0.75
    # only comment lines: the candidate line is "", ratio 0
    assert code_sim_score("# only a comment", "x = 1") == 0.0
    assert code_sim_score("", "x = 1") == 0.0


# ---------------------------------------------------------------- Chinese metrics (jieba)
@pytest.mark.skipif(HAS_JIEBA, reason="jieba is installed; this checks the message shown without it")
def test_zh_metrics_without_jieba_say_how_to_install_it():
    with pytest.raises(ImportError, match="pip install jieba"):
        qa_f1_zh_score("北京", "北京")
    with pytest.raises(ImportError, match="pip install jieba"):
        rouge_zh_score("北京", "北京")


@pytest.fixture
def character_jieba(monkeypatch):
    """A stand-in jieba that cuts into single characters, so the arithmetic around it can be checked by hand."""
    fake = types.ModuleType("jieba")
    fake.cut = lambda text, cut_all=False: iter(list(text))
    monkeypatch.setitem(sys.modules, "jieba", fake)


def test_qa_f1_zh_score_with_character_cut(character_jieba):
    # prediction [北, 京, 大, 学, 。] -> punctuation token removed -> [北, 京, 大, 学]; reference [北, 京]:
    # common 2, P = 2/4, R = 2/2, F1 = 2/3
    assert qa_f1_zh_score("北京大学。", "北京") == pytest.approx(2 / 3)
    assert qa_f1_zh_score("上海", "北京") == 0.0


def test_rouge_zh_score_with_character_cut(character_jieba):
    # "北 京 大 学" vs "北 京": LCS 2, P = 2/4, R = 2/2, F = 2 * 0.5 / 1.5 = 2/3
    assert rouge_zh_score("北京大学", "北京") == pytest.approx(2 / 3, rel=1e-6)
    assert rouge_zh_score("", "北京") == 0.0


@pytest.mark.skipif(not HAS_JIEBA, reason="jieba is not installed (pip install jieba)")
def test_zh_metrics_with_real_jieba():
    assert qa_f1_zh_score("北京", "北京") == 1.0
    assert rouge_zh_score("我爱北京", "我爱北京") == pytest.approx(1.0, abs=1e-7)
