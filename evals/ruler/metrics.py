"""RULER's two string-match metrics (``scripts/eval/synthetic/constants.py``), per prediction, 0-100."""
from __future__ import annotations

import re

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: control characters become newlines, outer whitespace goes."""
    return _CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Share of the references found (case-insensitive substring) in the prediction."""
    if not references:
        return 0.0
    pred = postprocess(prediction).lower()
    return 100.0 * sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """100 when any one reference is found (case-insensitive substring) in the prediction."""
    pred = postprocess(prediction).lower()
    return 100.0 * float(any(ref.lower() in pred for ref in references))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}
