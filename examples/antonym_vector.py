"""Shared by the examples: a small antonym task and a vector for it, built with fv_plugin's public API.

The vector is the ICL-minus-zero-shot difference of mean last-token hidden states at one layer: the quickest
task vector to make. The extraction issue adds the paper's head-based function vectors.
"""

from __future__ import annotations

import random

import fv_plugin

PAIRS = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("up", "down"),
    ("open", "closed"),
    ("early", "late"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("young", "old"),
    ("full", "empty"),
    ("high", "low"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("hard", "soft"),
    ("long", "short"),
    ("thick", "thin"),
    ("clean", "dirty"),
    ("true", "false"),
    ("win", "lose"),
    ("push", "pull"),
    ("cheap", "expensive"),
    ("heavy", "light"),
    ("inside", "outside"),
    ("before", "after"),
    ("begin", "end"),
    ("friend", "enemy"),
    ("buy", "sell"),
    ("near", "far"),
]
TEMPLATE = "Q: {x}\nA: {y}\n\n"
QUERIES = ["good", "tall", "wide", "day", "love", "first"]


def icl_prompt(query: str, rng: random.Random, shots: int = 10) -> str:
    demos = rng.sample(PAIRS, shots)
    return "".join(TEMPLATE.format(x=x, y=y) for x, y in demos) + f"Q: {query}\nA:"


def zero_shot(query: str) -> str:
    return f"Q: {query}\nA:"


def antonym_vector(model: object, tokenizer: object, layer: int = 18, n: int = 24) -> fv_plugin.FunctionVector:
    """An antonym task vector for ``model`` at ``layer`` from ``n`` 10-shot prompts."""
    rng = random.Random(0)
    queries = [rng.choice(PAIRS)[0] for _ in range(n)]
    icl = [icl_prompt(q, rng) for q in queries]
    return fv_plugin.difference_vector(
        model, tokenizer, icl, [zero_shot(q) for q in queries], layer=layer, task="antonym"
    )
