"""The work of an extraction, projected from a model's config alone (``fv bench extract --estimate MODEL``).

Per stage, the token passes through the decoder stack (a token run through ``m`` of ``L`` layers counts
``m / L``) and the rows the unembedding computes, as :mod:`fv_plugin.benchmarks.extraction` counts them on a
real run; FLOPs are ``2 x`` the decoder's weights per token plus ``2 x hidden x vocab`` per logit row
(attention over the prompt's own tokens is left out: at 100-token prompts it is a few percent).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fv_plugin.config import ExtractionConfig

__all__ = ["ModelShape", "StageWork", "estimate", "model_shape", "print_estimate"]

ICL_TOKENS = 88.0  # mean tokens of a 10-shot prompt of the built-in antonym task (SmolLM2's tokenizer)
ZERO_TOKENS = 7.0  # ... and of its zero-shot prompt
ANSWER_STEPS = 1.5  # mean greedy steps a finalist's answer runs before its verdict is settled (antonym, SmolLM2)
NEUTRAL = (4, 12, 4)  # side effects: paragraphs, prompt tokens, steered tokens (fv_plugin.selection.neutral_kl)


@dataclass(frozen=True)
class ModelShape:
    """What the cost depends on: layers, query heads, hidden size, vocabulary, weights per decoder layer."""

    layers: int
    heads: int
    hidden: int
    vocab: int
    layer_params: int


@dataclass(frozen=True)
class StageWork:
    """One stage's projected work."""

    name: str
    tokens: float
    logit_rows: int

    def flops(self, shape: ModelShape) -> float:
        return 2.0 * (self.tokens * shape.layers * shape.layer_params + self.logit_rows * shape.hidden * shape.vocab)


def model_shape(config: Any) -> ModelShape:
    """The shape of a transformers config (a text config inside a multimodal one is used)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0))
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0))
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    if not (layers and heads and hidden):
        raise ValueError(f"config of model_type {getattr(text, 'model_type', None)!r}: layers/heads/hidden not found")
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    inner = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden)
    mlp = (3 if hasattr(text, "intermediate_size") else 2) * hidden * inner  # gated MLPs have three matrices
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim
    return ModelShape(layers, heads, hidden, int(text.vocab_size), attention + mlp)


def _replay(starts: Sequence[int], layers: int) -> float:
    """Token passes of rows replayed from their start layers (rows that start at the same layer run together, so
    none runs a layer below its own start)."""
    return sum((layers - at) / layers for at in starts)


def _indirect_effects(config: ExtractionConfig, shape: ModelShape, icl_tokens: float) -> StageWork:
    """Per shuffled prompt its prefix and reference, then one replayed row per head; after a screen
    (``config.aie_screen``), only the kept heads' rows, assumed spread over the layers as all heads are."""
    grid = shape.layers * shape.heads
    every = _replay([i // shape.heads for i in range(grid)], shape.layers)
    kept = config.aie_finalists(grid)  # None: no screen (then aie_screen is None or covers every prompt)
    screened = config.n_aie if kept is None or config.aie_screen is None else config.aie_screen
    rest, kept = config.n_aie - screened, kept or grid
    tokens = config.n_aie * (icl_tokens + 1) + screened * every + rest * every * kept / grid
    return StageWork("indirect effects", tokens, config.n_aie * 3 + screened * grid + rest * kept)


def _per_query(name: str, queries: int, starts: Sequence[int], shape: ModelShape, length: float) -> StageWork:
    """Candidates on zero-shot queries: per query its prefix, the reference and check replays, then the rows."""
    return StageWork(name, queries * (length + 1 + _replay(starts, shape.layers)), queries * (3 + len(starts)))


def _finalists(queries: int, finalists: int, zero_tokens: float, positions: Sequence[str]) -> list[StageWork]:
    """The finalists and the model without a vector: the prefix once per query, then the answers' greedy steps,
    the first step shared by every position set (later sets fork after it); then the finalists on the neutral
    paragraphs (their prefix and the plain model once, then the steered tokens per finalist, the first shared)."""
    rows = (finalists + 1) * (ANSWER_STEPS + (len(positions) - 1) * (ANSWER_STEPS - 1))
    work = [StageWork("finalists", queries * (zero_tokens - 1 + rows), int(queries * (1 + rows)))]
    texts, prompt, steered = NEUTRAL
    per = (steered + 1) + finalists * (1 + steered * len(positions))  # the plain model, then each finalist
    work.append(StageWork("side effects", texts * (prompt - 1 + per), texts * (1 + per)))
    return work


def _candidate_starts(config: ExtractionConfig, shape: ModelShape) -> list[int]:
    """Lowest layer of each ``auto`` candidate (head-level forms: assumed 0, their heads spread over the stack)."""
    layers = list(range(shape.layers))
    starts: list[int] = []
    for form in config.auto_methods:
        if form == "difference":
            starts += [at for at in layers for _ in config.strengths]
        elif form == "heads":
            starts += [at for at in layers[:: 2 if len(layers) > 2 else 1] for _ in config.head_strengths]
        elif form == "head_difference":
            starts += [0] * (len(set(config.ks)) * len(config.head_strengths))
        else:
            starts += [0] * len(set(config.ks))
    return starts


def estimate(
    shape: ModelShape,
    config: ExtractionConfig = ExtractionConfig(),
    *,
    queries: int = 64,
    icl_tokens: float = ICL_TOKENS,
    zero_tokens: float = ZERO_TOKENS,
) -> list[StageWork]:
    """Projected stages of one extraction with ``config.method`` (``"auto"`` or a form) on ``queries``
    validation queries (capped by ``config.max_validation``), prompts of the given mean token counts as they are
    batched (prompts are batched by length; a batch pads its shorter prompts to its longest)."""
    queries = min(queries, config.max_validation or queries)
    forms = config.auto_methods if config.method == "auto" else (config.method,)
    layers = shape.layers
    work = []
    heads = any(f in ("heads", "head_patch", "head_difference") for f in forms)
    work.append(StageWork("ICL prompts", config.n_mean * icl_tokens, config.n_mean))
    if "head_difference" in forms or "difference" in forms:
        work.append(StageWork("zero-shot prompts", config.n_mean * zero_tokens, config.n_mean))
    if heads:
        work.append(_indirect_effects(config, shape, icl_tokens))
    if config.method == "auto":
        starts = _candidate_starts(config, shape)
        screen = min(config.screen_queries, queries)
        work.append(_per_query("candidates", screen, starts, shape, zero_tokens))
        finalists = min(len(starts), config.finalists + 2 * len(config.auto_methods))
        work += _finalists(queries, finalists, zero_tokens, config.auto_positions)
    elif config.method != "head_patch" and config.layer is None:
        work.append(_per_query("layer sweep", queries, [0, *range(layers)], shape, zero_tokens))  # no vector: 0
    return work


def print_estimate(model: str, args: argparse.Namespace, *, flops: float | None = None) -> None:
    """Print the projected stages of ``auto`` and ``heads`` for ``model`` (a local folder or a Hub id)."""
    from transformers import AutoConfig

    from fv_plugin.models import EMBEDDED_MODELS, embedded_checkpoint

    source = embedded_checkpoint(model) if model in EMBEDDED_MODELS else model
    shape = model_shape(AutoConfig.from_pretrained(source))
    base = ExtractionConfig(n_mean=args.n_mean, n_aie=args.n_aie)
    plain_tokens = (base.n_mean + base.n_aie) * ICL_TOKENS
    plain = StageWork("plain forwards", plain_tokens, int(plain_tokens))
    print(
        f"{model}: {shape.layers} layers x {shape.heads} heads, hidden {shape.hidden}, vocab {shape.vocab}; "
        f"prompts of {ICL_TOKENS:.0f} (ICL) and {ZERO_TOKENS:.0f} (zero-shot) tokens"
    )
    for method in ("auto", "heads"):
        stages = estimate(shape, ExtractionConfig(method=method, n_mean=base.n_mean, n_aie=base.n_aie))
        total = sum(s.flops(shape) for s in stages)
        print(f"\nmethod={method}: {total:.3g} FLOPs = {total / plain.flops(shape):.2f}x the plain forwards")
        for s in [*stages, plain]:
            seconds = f"{s.flops(shape) / flops:9.3g} s" if flops else ""
            work = f"{s.tokens:11.0f} tokens {s.logit_rows:9d} logit rows {s.flops(shape):10.3g} FLOPs"
            print(f"  {s.name:22s} {work} {seconds}")
    if not flops:
        print("\n(give --flops, e.g. 1e14 for a GPU at ~100 TFLOP/s sustained, to project seconds)")
    print("\ncounts assume 64 validation queries (the cap) and the default grids")
