"""Variable tracking (RULER ``variable_tracking.py``): a chain "VAR A = 12345", "VAR B = VAR A", ... hidden in
noise; the question asks for every variable that ends up holding the value.  A worked example (three-letter
variables, its answer given) precedes the question, as in RULER."""
from __future__ import annotations

import random
import string
from typing import Any

from evals.ruler.generation import Draft
from evals.ruler.haystack import NOISE
from evals.ruler.templates import FAMILIES

NOISE_BLOCK = NOISE + "\n"


def icl_noise_blocks(length: int) -> int:
    """Noise blocks in the worked example.  RULER sizes it to ~500 tokens (about 15 blocks); short targets
    get a proportionally smaller one so the question keeps most of the budget."""
    return min(15, max(1, length // 256))


def random_chains(rng: random.Random, num_chains: int, num_hops: int, name_len: int) -> tuple[list, list]:
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in names:
            names.append(name)
    variables, chains = [], []
    for c in range(num_chains):
        chain_vars = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        statements = [f"VAR {chain_vars[0]} = {rng.randint(10000, 99999)}"]
        statements += [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} " for j in range(num_hops)]
        variables.append(chain_vars)
        chains.append(statements)
    return variables, chains


def chain_context(rng: random.Random, chains: list[list[str]], num_noise: int) -> str:
    sentences = [NOISE_BLOCK] * num_noise
    if len(sentences) <= len(chains[0]):
        # Too few blocks to spread the chain: split them into single sentences (RULER does the same).
        sentences = [s + "." if s.strip() else s for block in sentences for s in block.split(".")]
        if len(sentences) <= len(chains[0]):
            chains = [chain[:len(sentences) - 1] for chain in chains]
    for chain in chains:
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for offset, (position, statement) in enumerate(zip(positions, chain)):
            sentences.insert(position + offset, statement)
    return " ".join(sentences).replace(". \n", ".\n")


class VariableTrackingGenerator:
    def __init__(self, params: dict[str, Any], length: int):
        self.num_chains = params["num_chains"]
        self.num_hops = params["num_hops"]
        self.icl_blocks = icl_noise_blocks(length)
        self.min_units = 1
        self.max_units = max(1, length)
        self.family = FAMILIES["variable_tracking"]

    def _question(self, rng: random.Random, num_noise: int, name_len: int, num_hops: int) -> tuple[str, str, list]:
        variables, chains = random_chains(rng, self.num_chains, num_hops, name_len)
        context = chain_context(rng, chains, num_noise)
        value = chains[0][0].split("=")[-1].strip()
        prompt = self.family.template.format(context=context, query=value)
        prefix = self.family.answer_prefix.format(num_v=num_hops + 1, query=value)
        return prompt, prefix, variables[0]

    def draft(self, rng: random.Random, units: int, index: int) -> Draft:
        icl_prompt, icl_prefix, icl_answer = self._question(rng, self.icl_blocks, 3, min(10, self.num_hops))
        example = icl_prompt + icl_prefix + " ".join(icl_answer)
        prompt, prefix, answer = self._question(rng, units, 5, self.num_hops)
        return Draft(example + "\n\n" + prompt, prefix, list(answer), {"haystack_units": units})
