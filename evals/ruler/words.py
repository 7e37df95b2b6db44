"""Word lists: "adjective-noun" needle keys and the common-words (cwe) vocabulary.

RULER draws both from the ``wonderwords`` package, which is not installed here.  Instead:

* needle keys are "adjective-noun" pairs (RULER's format, e.g. "quiet-harbor") from the two short lists below,
  written for this repository (about 19k pairs);
* the cwe vocabulary is every distinct lowercase alphabetic word of four or more letters in the shipped haystack
  prose (``evals/data/haystack_prose.txt``), plus the two lists below, sorted.  Long contexts need more distinct
  words than that; they are topped up with made-up six-letter consonant-vowel words ("bakemo"), all of one
  length, so none is a substring of another.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache

from evals.ruler.haystack import prose_text

ADJECTIVES = tuple("""
able agile ancient angry arctic autumn bitter blazing bold brave breezy bright brisk broken bronze busy calm
careful cheerful chilly clever cloudy coastal cosmic crimson crisp curious dapper daring dark dazzling dusty eager
early electric elegant empty fancy fearless festive fierce fluffy foggy fragile frosty gentle giant gilded glossy
golden graceful grand grumpy happy hasty hidden hollow humble icy idle jolly keen kind lively lonely loud lucky
lunar magic mellow merry mighty misty modest muddy narrow nimble noble odd olive orange patient plain playful
polite proud purple quick quiet rapid rare rocky rosy royal rusty sandy scarlet secret shiny silent silver
sleepy slender smooth snowy solar sparkling spicy steady stormy sturdy sunny swift tall tender tidy tiny tranquil
velvet vivid wandering warm wild windy wise witty wooden young zealous
""".split())

NOUNS = tuple("""
acorn anchor apple arrow badge bakery balloon banjo barn basket beacon beetle bell bicycle blanket boat bottle
bracelet bridge broom bucket button cabin cactus camera candle canoe canyon carpet castle cathedral cello chair
cherry chimney circus cliff clock cloud comet compass cookie copper cottage crayon crown cup curtain daisy desert
diamond dolphin door dragon drum eagle easel elephant engine falcon feather fern fiddle flag flute forest fountain
fox garden giraffe glacier globe goat harbor harp hammer helmet heron hill honey horizon island jacket jungle
kettle kite ladder lagoon lantern lemon library lighthouse lily magnet mango maple meadow mirror mitten monkey
mountain mushroom needle nest notebook oak ocean orchard otter owl paddle palace panda parrot pebble pencil
pepper piano pillow pine planet pocket pond pumpkin puzzle quilt rabbit raccoon radio rainbow raven ribbon river
robin rocket saddle sailboat sandal scarf seashell shadow shovel sparrow spoon squirrel statue stone strawberry
sunflower swan teapot telescope tiger tornado tower tractor trumpet tulip turtle umbrella valley vase violin
volcano wagon walnut waterfall whale whistle willow window wizard wolf zebra
""".split())


def word_key(index: int) -> str:
    """The ``index``-th "adjective-noun" key, ``0 <= index < num_word_keys()``."""
    adjective, noun = divmod(index, len(NOUNS))
    return f"{ADJECTIVES[adjective]}-{NOUNS[noun]}"


def num_word_keys() -> int:
    return len(ADJECTIVES) * len(NOUNS)


@lru_cache(maxsize=1)
def common_words_base() -> tuple[str, ...]:
    prose = set(re.findall(r"\b[a-z]{4,}\b", prose_text()))
    return tuple(sorted(prose | set(ADJECTIVES) | set(NOUNS)))


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def made_up_words(count: int) -> list[str]:
    """``count`` distinct six-letter consonant-vowel words, in a fixed order, none of them a real base word."""
    base = set(common_words_base())
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    combos = len(syllables) ** 3
    order = random.Random(0).sample(range(combos), min(combos, count + len(base)))
    words = []
    for i in order:
        a, rest = divmod(i, len(syllables) ** 2)
        b, c = divmod(rest, len(syllables))
        word = syllables[a] + syllables[b] + syllables[c]
        if word not in base:
            words.append(word)
            if len(words) == count:
                break
    if len(words) < count:
        raise ValueError(f"cannot make {count} distinct made-up words (at most {combos})")
    return words


def common_words_pool(size: int) -> list[str]:
    """At least ``size`` distinct words for cwe: the base vocabulary, topped up with made-up words."""
    base = list(common_words_base())
    if size <= len(base):
        return base
    return base + made_up_words(size - len(base))
