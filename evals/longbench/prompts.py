"""LongBench v1 protocol tables: prompt templates, generation lengths, chat policy, subsets and categories.

The templates and lengths are the official ``config/dataset2prompt.json`` and ``config/dataset2maxlen.json`` of
THUDM/LongBench (v1); the chat, stop and first-line rules are those of its ``pred.py`` and ``eval.py``.
"""
from __future__ import annotations

_MULTI_DOC_QA = ("Answer the question based on the given passages. Only give me the answer and do not output any other "
                 "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
                 "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")

_QASPER_RULES = ("as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
                 "answered based on the information in the article, write \"unanswerable\". If the question is a "
                 "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.")

PROMPT_TEMPLATES: dict[str, str] = {
    # "asconcisely" is a typo in the official template; kept so prompts match published numbers.
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                   "question asconcisely as you can, using a single phrase if possible. Do not provide any "
                   "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as "
                   "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: "
                   "{input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question " + _QASPER_RULES
              + "\n\nArticle: {context}\n\n Answer the question based on the above article " + _QASPER_RULES
              + "\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
                       "based on the above text, only give me the answer and do not output any other words.\n\n"
                       "Question: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，"
                       "不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": _MULTI_DOC_QA,
    "2wikimqa": _MULTI_DOC_QA,
    "musique": _MULTI_DOC_QA,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
                  "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
             "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
             "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
                  "Now, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
            "{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
                "words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
              "{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
                     "carefully read these paragraphs and determine how many unique paragraphs there are after "
                     "removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n"
                     "{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The "
                     "output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer "
                     "is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
                            "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}"
                            "\n\nPlease enter the number of the paragraph that the abstract is from. The answer format "
                            "must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n"
                            "下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式"
                            "\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "vcsum": 512,
    "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64,
    "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
    "lcc": 64, "repobench-p": 64,
}

ENGLISH_SUBSETS: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
    "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
CHINESE_SUBSETS: tuple[str, ...] = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
# The subsets official pred.py evaluates with --e (LongBench-E files are named <subset>_e).
LONGBENCH_E_SUBSETS: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)

VARIANTS: dict[str, tuple[str, ...]] = {
    "standard": ENGLISH_SUBSETS + CHINESE_SUBSETS,
    "e": LONGBENCH_E_SUBSETS,
}
DEFAULT_SUBSETS: dict[str, tuple[str, ...]] = {"standard": ENGLISH_SUBSETS, "e": LONGBENCH_E_SUBSETS}

# Official pred.py: "chat models are better off without build prompts on these tasks".
NO_CHAT_TEMPLATE: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# Official pred.py adds the newline token to eos for samsum (the model otherwise keeps writing "\nDialogue: ...").
STOP_STRINGS: dict[str, list[str]] = {"samsum": ["\n"]}
# Official eval.py scores only the first line of the prediction for these subsets.
FIRST_LINE_SUBSETS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})

# English categories of the LongBench paper; Chinese subsets are reported per task only.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "Single-doc QA": ("narrativeqa", "qasper", "multifieldqa_en"),
    "Multi-doc QA": ("hotpotqa", "2wikimqa", "musique"),
    "Summarization": ("gov_report", "qmsum", "multi_news"),
    "Few-shot": ("trec", "triviaqa", "samsum"),
    "Synthetic": ("passage_count", "passage_retrieval_en"),
    "Code": ("lcc", "repobench-p"),
}
# RocketKV's "LongBench average" leaves out passage_count (15 English tasks).
LB_AVG_EXCLUDED: frozenset[str] = frozenset({"passage_count"})

# Official eval.py buckets LongBench-E samples by the row's ``length`` field (words; characters for Chinese).
LENGTH_BUCKETS: tuple[tuple[str, int, float], ...] = (("0-4k", 0, 4000), ("4-8k", 4000, 8000),
                                                      ("8k+", 8000, float("inf")))


def length_bucket(length: int) -> str:
    for name, low, high in LENGTH_BUCKETS:
        if low <= length < high:
            return name
    raise ValueError(f"length {length} is negative")


def build_prompt(subset: str, context: str, question: str) -> str:
    return PROMPT_TEMPLATES[subset].format(context=context, input=question)


def question_part(subset: str, question: str) -> str:
    """The end of the subset's prompt after ``{context}``: the question (every template puts ``{input}`` after the
    context), or for subsets without one (summaries, passage_count, lcc) the instruction after the context."""
    return PROMPT_TEMPLATES[subset].split("{context}", 1)[1].format(input=question)


def first_line(prediction: str) -> str:
    return prediction.lstrip("\n").split("\n")[0]
