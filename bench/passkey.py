"""Passkey retrieval: a number hidden in filler text, asked for at the end (Landmark Attention's
test, as Quest and InfLLM use it). It needs no judge: the reply holds the number or not."""

from __future__ import annotations

import random

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")
HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "it. I will quiz you about the important information there.\n")
QUESTION = "\nWhat is the pass key? The pass key is"


def needle(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def document(n_tokens: int, depth: float, key: int, count_tokens) -> str:
    """Filler of about ``n_tokens`` tokens (``count_tokens(text)`` counts them) with the needle
    at ``depth`` (0: start, 1: end), without the question."""
    per_filler = count_tokens(FILLER)
    n_filler = max(1, (n_tokens - count_tokens(HEAD + needle(key) + QUESTION)) // per_filler)
    before = int(n_filler * depth)
    return HEAD + FILLER * before + needle(key) + FILLER * (n_filler - before)


def prompt(n_tokens: int, depth: float, key: int, count_tokens) -> str:
    """The whole passkey prompt: document and question."""
    return document(n_tokens, depth, key, count_tokens) + QUESTION


def found(reply: str, key: int) -> bool:
    return str(key) in reply.replace(" ", "")


def keys(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10000, 99999) for _ in range(n)]
