"""Needle in a haystack (RULER ``niah.py``): needles "One of the special magic numbers for <key> is: <value>."
hidden in a noise, essay or needle haystack; the question asks for the values of one or more keys."""
from __future__ import annotations

import random
import uuid
from typing import Any

from evals.ruler.generation import Draft
from evals.ruler.haystack import NOISE, essay_prefix, split_sentences
from evals.ruler.templates import FAMILIES, NIAH_NEEDLE
from evals.ruler.words import num_word_keys, word_key

# RULER: np.round(np.linspace(0, 100, 40)) -- the depths (percent of the essay) needles are placed at.
DEPTHS = [int(round(i * 100 / 39)) for i in range(40)]


def random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        return word_key(rng.randrange(num_word_keys()))
    raise ValueError(f"unknown needle type {kind!r}")


def distinct_values(rng: random.Random, kind: str, count: int, exclude: frozenset[str] | set[str] = frozenset()
                    ) -> list[str]:
    """``count`` values of ``kind``, none in ``exclude``, all distinct while ``kind`` has enough of them."""
    if kind == "words":
        total = num_word_keys()
        if count + len(exclude) <= total:
            picked = (word_key(i) for i in rng.sample(range(total), count + len(exclude)))
            return [w for w in picked if w not in exclude][:count]
        # More distractor needles than word keys (very long needle haystacks): keys repeat among distractors.
        picked = []
        while len(picked) < count:
            word = word_key(rng.randrange(total))
            if word not in exclude:
                picked.append(word)
        return picked
    seen, picked = set(exclude), []
    while len(picked) < count:
        value = random_value(rng, kind)
        if value not in seen:
            seen.add(value)
            picked.append(value)
    return picked


def niah_template(single_answer: bool) -> tuple[str, str]:
    """Template and answer prefix; RULER rewrites them into the singular when exactly one value is asked for."""
    family = FAMILIES["niah"]
    template, prefix = family.template, family.answer_prefix
    if single_answer:
        for plural, singular in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(plural, singular), prefix.replace(plural, singular)
    return template, prefix


class NiahGenerator:
    def __init__(self, params: dict[str, Any], length: int):
        self.haystack = params["haystack"]
        self.key_type = params["key_type"]
        self.value_type = params["value_type"]
        self.num_keys = params["num_keys"]
        self.num_values = params["num_values"]
        self.num_queries = params["num_queries"]
        num_needles = self.num_keys * self.num_values
        # units: words of essay, or noise sentences, or distractor needles
        self.min_units = num_needles if self.haystack != "essay" else 1
        self.max_units = max(self.min_units, length)
        single = self.num_queries * self.num_values == 1
        self.template, self.answer_prefix = niah_template(single)
        self.type_needle_v = self.value_type[:-1] if single else self.value_type

    def draft(self, rng: random.Random, units: int, index: int) -> Draft:
        keys = distinct_values(rng, self.key_type, self.num_keys)
        values = [distinct_values(rng, self.value_type, self.num_values) for _ in keys]
        needles = [(k, NIAH_NEEDLE.format(type_needle_v=self.value_type, key=key, value=value))
                   for k, key in enumerate(keys) for value in values[k]]
        rng.shuffle(needles)
        queried = rng.sample(range(self.num_keys), self.num_queries)

        context, depths = self._context(rng, units, [text for _, text in needles], set(keys))
        queries = [keys[i] for i in queried]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        prompt = self.template.format(type_needle_v=self.type_needle_v, context=context, query=query)
        prefix = self.answer_prefix.format(type_needle_v=self.type_needle_v, query=query)
        answer_depths = [d for (k, _), d in zip(needles, depths) if k in queried]
        meta = {"haystack_units": units, "needle_depths": depths, "answer_depths": answer_depths}
        if len(answer_depths) == 1:
            meta["depth"] = answer_depths[0]
        return Draft(prompt, prefix, [v for i in queried for v in values[i]], meta)

    def _context(self, rng: random.Random, units: int, needles: list[str], keys: set[str]) -> tuple[str, list]:
        """The haystack with the needles inserted, and each needle's depth in percent."""
        if self.haystack == "essay":
            sentences = split_sentences(essay_prefix(units))
            depths = sorted(rng.sample(DEPTHS, len(needles)))
            cuts = [0] + [int(len(sentences) * d / 100) for d in depths] + [len(sentences)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            return " ".join(p for p in parts if p), depths

        if self.haystack == "noise":
            sentences = [NOISE] * units
        elif self.haystack == "needle":
            other_keys = distinct_values(rng, self.key_type, units, exclude=keys)
            sentences = [NIAH_NEEDLE.format(type_needle_v=self.value_type, key=key,
                                            value=random_value(rng, self.value_type)) for key in other_keys]
        else:
            raise ValueError(f"unknown haystack {self.haystack!r}")
        positions = sorted(rng.sample(range(units), len(needles)))
        # Insert from the back so earlier positions stay valid (RULER's order).
        for position, needle in sorted(zip(positions, needles), reverse=True):
            sentences.insert(position, needle)
        depths = [round(100 * p / units) for p in positions]
        return "\n".join(sentences), depths
