"""Synthetic instruction task families for the bundled federation demo.

Every family is a pure function of a ``random.Random`` instance, so the whole suite is
deterministic from one seed. Examples follow the edge client's JSONL format
(``instruction``, ``input``, ``output``, ``category``). Outputs are short word sequences so
that Rouge-L (word level, as ``rouge-score`` tokenises) gives partial credit.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["FAMILIES", "WORDS", "CAPITALS", "POLARITY", "make_example", "family_names"]

# A small closed vocabulary keeps the tokenizer and the demo model tiny.
WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "green", "music", "paper", "light", "table", "horse",
    "bread", "chair", "dream", "flame", "glass", "honey", "juice", "lemon", "mango", "night",
    "ocean", "piano", "queen", "robot", "sugar", "tiger", "water", "zebra", "plant", "smile",
)

# Country -> capital table (the "knowledge" family's bundled lookup).
CAPITALS: dict[str, str] = {
    "france": "paris", "japan": "tokyo", "italy": "rome", "spain": "madrid",
    "egypt": "cairo", "kenya": "nairobi", "peru": "lima", "chile": "santiago",
    "china": "beijing", "india": "delhi", "russia": "moscow", "canada": "ottawa",
    "norway": "oslo", "sweden": "stockholm", "greece": "athens", "cuba": "havana",
}

# Word -> polarity table (the classification family).
POLARITY: dict[str, str] = {
    "happy": "positive", "great": "positive", "love": "positive", "bright": "positive",
    "kind": "positive", "calm": "positive", "brave": "positive", "sweet": "positive",
    "sad": "negative", "awful": "negative", "hate": "negative", "dark": "negative",
    "cruel": "negative", "angry": "negative", "weak": "negative", "bitter": "negative",
}

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _words(rng: random.Random, lo: int = 3, hi: int = 5) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _reverse_words(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng)
    return "Reverse the order of the words.", " ".join(w), " ".join(reversed(w))


def _sort_words(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng)
    return "Sort the words alphabetically.", " ".join(w), " ".join(sorted(w))


def _uppercase(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng, 2, 4)
    return "Write the words in capital letters.", " ".join(w), " ".join(x.upper() for x in w)


def _capitals(rng: random.Random) -> tuple[str, str, str]:
    c = rng.sample(sorted(CAPITALS), rng.randint(2, 3))
    return "Name the capital of each country.", " ".join(c), " ".join(CAPITALS[x] for x in c)


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(rng.randint(2, 3))]
    return ("Add each pair of numbers.", " ".join(f"{a}+{b}" for a, b in pairs),
            " ".join(str(a + b) for a, b in pairs))


def _count_letters(rng: random.Random) -> tuple[str, str, str]:
    w = rng.sample(WORDS + tuple(CAPITALS), rng.randint(2, 4))
    return "Count the letters in each word.", " ".join(w), " ".join(str(len(x)) for x in w)


def _repeat_twice(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng, 2, 3)
    return "Repeat every word twice.", " ".join(w), " ".join(f"{x} {x}" for x in w)


def _polarity(rng: random.Random) -> tuple[str, str, str]:
    w = rng.sample(sorted(POLARITY), rng.randint(2, 4))
    return "Classify each word as positive or negative.", " ".join(w), " ".join(POLARITY[x] for x in w)


def _first_letters(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng)
    return "Write the first letter of each word.", " ".join(w), " ".join(x[0] for x in w)


def _digits_to_words(rng: random.Random) -> tuple[str, str, str]:
    d = [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]
    return ("Spell out each digit.", " ".join(map(str, d)), " ".join(_NUMBER_WORDS[x] for x in d))


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "reverse_words": _reverse_words,
    "sort_words": _sort_words,
    "uppercase": _uppercase,
    "capitals": _capitals,
    "arithmetic": _arithmetic,
    "count_letters": _count_letters,
    "repeat_twice": _repeat_twice,
    "polarity": _polarity,
    "first_letters": _first_letters,
    "digits_to_words": _digits_to_words,
}


def family_names() -> list[str]:
    return list(FAMILIES)


def make_example(family: str, rng: random.Random) -> dict[str, str]:
    """One example of ``family`` in the edge client's JSONL record format."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {sorted(FAMILIES)}")
    instruction, inp, out = FAMILIES[family](rng)
    return {"instruction": instruction, "input": inp, "output": out, "category": family}
