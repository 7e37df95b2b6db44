"""Question answering (RULER ``qa.py``): the gold document(s) of a SQuAD or HotpotQA question among distractor
documents, as many as fit; questions are taken in dataset order."""
from __future__ import annotations

import random

from evals.ruler.generation import Draft
from evals.ruler.qa_sources import QuestionSet
from evals.ruler.templates import FAMILIES

DOCUMENT = "Document {i}:\n{document}"


class QaGenerator:
    def __init__(self, questions: QuestionSet, length: int):
        self.set = questions
        self.family = FAMILIES["qa"]
        self.min_units = 1
        self.max_units = len(questions.docs)

    def draft(self, rng: random.Random, units: int, index: int) -> Draft:
        question = self.set.questions[index]
        gold, related = question["gold"], question["related"]
        chosen = list(gold)
        if units > len(gold):
            if units - len(gold) <= len(related):
                chosen += rng.sample(related, units - len(gold))
            else:
                taken = set(gold) | set(related)
                others = [i for i in range(len(self.set.docs)) if i not in taken]
                chosen += related + rng.sample(others, min(len(others), units - len(gold) - len(related)))
        rng.shuffle(chosen)
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=self.set.docs[d]) for i, d in enumerate(chosen))
        prompt = self.family.template.format(context=context, query=question["query"])
        meta = {"haystack_units": len(chosen), "question_index": index, "source": self.set.origin,
                "gold_documents": [chosen.index(d) + 1 for d in gold]}
        return Draft(prompt, self.family.answer_prefix, list(question["answers"]), meta)
