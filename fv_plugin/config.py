"""Settings of the two experiments fv_plugin runs, as frozen dataclasses: extracting a vector, and evaluating one.

Both validate themselves on construction, so a bad setting fails before any model work starts. Functions that
take a config also take its fields as keyword overrides (``extract_function_vector(..., method="heads", k=20)``),
which :func:`with_overrides` turns into a new config.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from fv_plugin.prompts import DEFAULT_TEMPLATE, PromptTemplate

__all__ = [
    "AUTO_METHODS",
    "DEFAULT_ACCURACY_TOLERANCE",
    "DEFAULT_KS",
    "DEFAULT_MODEL",
    "DEFAULT_SIDE_EFFECT_BUDGET",
    "DEFAULT_STRENGTHS",
    "HEAD_LEVEL_METHODS",
    "METHODS",
    "MODES",
    "NATURAL_TEMPLATES",
    "PORTABLE_METHODS",
    "PROTOCOLS",
    "EvalConfig",
    "ExtractionConfig",
    "Method",
    "Mode",
    "with_overrides",
]

Method = Literal["auto", "heads", "head_patch", "head_difference", "difference", "layer_mean"]
METHODS: tuple[str, ...] = get_args(Method)  # "auto", the default, first
AUTO_METHODS: tuple[str, ...] = ("heads", "head_patch", "head_difference", "difference")  # what "auto" chooses among
# Forms that act on attention-head slots (not a residual-stream vector): only fv_plugin's hooks and its vLLM plugin
# serve them; llama.cpp control vectors and other single-vector consumers cannot.
HEAD_LEVEL_METHODS: tuple[str, ...] = ("head_patch", "head_difference")
PORTABLE_METHODS: tuple[str, ...] = ("heads", "difference", "layer_mean")  # one vector added after a layer
Mode = Literal["zero_shot", "icl", "shuffled", "natural"]
MODES: tuple[str, ...] = ("zero_shot", "icl", "shuffled", "natural")
Protocol = Literal["all", "icl_correct"]
PROTOCOLS: tuple[str, ...] = ("all", "icl_correct")
AnswerPositions = Literal["generated", "last_prompt", "all", "answer"]  # where an evaluation's continuation is steered
VECTOR_POSITIONS: tuple[str, ...] = ("generated", "last_prompt", "all")  # what a vector may carry (``fv.positions``)
DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded model loaded when none is named (fv_plugin.models)
# The test-split sweeps of an evaluation (fv_plugin.experiments.ExperimentConfig, `fv eval`).
DEFAULT_STRENGTHS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
DEFAULT_KS: tuple[int, ...] = (1, 2, 5, 10, 20, 40)
NATURAL_TEMPLATES: tuple[str, ...] = (
    'The word "{x}" means',
    'When I think of "{x}", I think of',
    'Here is my answer for "{x}":',
)

# `auto`'s trade of accuracy for side effect (docs/choice.md, measured on the built-in and held-out tasks): no cap
# on the side effect (nats of KL on neutral text), and up to one standard error of the best finalist's validation
# exact match given up for the least side effect.
DEFAULT_SIDE_EFFECT_BUDGET: float | None = None
DEFAULT_ACCURACY_TOLERANCE: float | Literal["se"] = "se"

C = TypeVar("C")


def _at_least(value: object, minimum: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ExtractionConfig:
    """How :func:`~fv_plugin.extract_function_vector` makes a vector.

    Attributes:
        method: ``"heads"`` (the paper), ``"head_patch"`` (head-level method), ``"head_difference"`` (the heads'
            ICL-minus-zero-shot activations added in their slots), ``"difference"`` (ICL minus zero-shot hidden
            states), ``"layer_mean"``, or ``"auto"`` (see :func:`~fv_plugin.extract_function_vector`).
        k: number of heads for the head-based methods.
        layer: the layer whose output receives the vector; ``None`` chooses it on the validation prompts.
        layers: candidate layers for that choice (default: every layer).
        strength: strength used while choosing the layer.
        n_shots: demonstrations per ICL prompt.
        n_mean: clean ICL prompts averaged (head means, hidden-state means).
        n_aie: shuffled-label prompts for the average indirect effect.
        seed: seeds every prompt sample (the shuffled prompts use ``seed + 1``).
        template: the demonstration template.
        batch_size: prompts per forward pass.
        heads_per_batch: patched (prompt, head) rows per forward pass in the AIE.
        methods: the methods ``method="auto"`` chooses among (``forms=``, its former name, is still accepted
            when constructing, with a ``DeprecationWarning``).
        ks: the numbers of heads it tries for ``head_difference`` and ``head_patch`` (``heads``, the paper's method,
            is tried with ``k`` heads at every other layer).
        strengths: the strengths it tries for the hidden-state methods (``difference``).
        head_strengths: the strengths it tries for the additive head-based methods (``heads``,
            ``head_difference``); ``head_patch`` is tried at strength 1 (replace).
        validation: the zero-shot queries every choice (``auto``'s candidates, an explicit method's layer) is scored
            on: the ``"valid"`` split, or ``"valid+train"``
            (the train queries too, asked zero-shot: more signal on small tasks).
        smooth_layers: how many neighbouring layers on each side are averaged into a single-layer candidate's
            validation accuracy (0: each layer on its own; 1: a lone lucky layer loses to a steady region).
        portable: make a vector every consumer can serve: ``method="auto"`` then chooses among the residual-stream
            forms only (:data:`PORTABLE_METHODS`: one vector added after a layer, as llama.cpp control vectors
            and other single-vector tools take), never a head-level form (:data:`HEAD_LEVEL_METHODS`).
        max_validation: at most this many validation queries (a seeded sample), so a large task file costs
            what a small one does; ``None``: every one.
        screen_queries: ``method="auto"`` scores every candidate on this many validation queries first...
        finalists: ...and only this many of the best (plus each method's best two) on every query, by the exact
            match of the greedy answer and by their side effect on neutral text.
        side_effect_budget: the most side effect ``method="auto"`` accepts: the mean KL divergence (nats) of a few
            neutral paragraphs' next-token distributions from the plain model's, with the candidate steered at its
            positions (:func:`~fv_plugin.selection.neutral_kl`); the most accurate finalist within it is chosen
            (none within: the one with the least). ``None``: no budget. The default is measured in docs/choice.md.
        auto_positions: where ``method="auto"`` steers each finalist when scoring it (exact match, side effect):
            ``"generated"`` (the last prompt token and every generated token, the paper's setting) and
            ``"last_prompt"`` (that token only); the chosen pair's positions go with the vector (``fv.positions``,
            what :func:`~fv_plugin.steer` uses unless told). ``("generated",)``: the paper's setting only.
            ``("all",)``: every token, the prompt's included, which is how llama.cpp adds a control vector (with
            ``portable=True``, a vector chosen for ``fv export``; its prefixes then run once per finalist).
        accuracy_tolerance: how much validation exact match ``method="auto"`` gives up for a smaller side effect:
            of the finalists within this much of the most accurate one, the one with the least side effect is
            chosen. ``"se"``: one standard error of the most accurate finalist's exact match on the validation
            queries (the one-standard-error rule); ``0``: always the most accurate.
        condition: also learn which prompts are the task's queries (``fv.condition``, used by ``gate=True``;
            see :mod:`fv_plugin.condition_fit`); on by default, at about a fifth of the unavoidable passes'
            work (``False`` or ``fv extract --no-condition`` skips it).
        condition_negatives: prompts of your own that the condition must not pass (added to the shipped ones).
        aie_screen: the AIE runs every head on this many of the ``n_aie`` shuffled prompts first, and on the rest
            only the ``aie_keep`` x (the most heads the vector may use) heads with the largest effect there; when
            that is every head, there is no screen. ``None``: every head on every prompt (the paper's AIE). With
            the defaults, the paper's ``heads`` (k = 10) keeps 80 heads and gets the same top 10 as the full AIE
            on every built-in and held-out task measured (docs/extraction_cost.md); ``auto`` (k up to 80) keeps
            every head on a model the size of SmolLM2.
        aie_keep: see ``aie_screen``.
        prepend_bos: start every prompt with the tokenizer's BOS token (the paper's code does; SmolLM2's tokenizer
            adds none). The vector keeps the setting (``fv.prepend_bos``) and :func:`~fv_plugin.evaluate` uses it;
            tokenize the prompts you steer the same way (:func:`~fv_plugin.prompt_tokenizer`).
    """

    method: Method = "auto"
    k: int = 10
    layer: int | None = None
    layers: tuple[int, ...] | None = None
    strength: float = 1.0
    n_shots: int = 10
    n_mean: int = 100
    n_aie: int = 25
    seed: int = 0
    template: str = DEFAULT_TEMPLATE
    batch_size: int = 16
    heads_per_batch: int = 256
    methods: tuple[str, ...] = ("difference", "head_difference", "heads", "head_patch")
    ks: tuple[int, ...] = (5, 10, 20, 40, 80)
    strengths: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
    head_strengths: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    validation: Literal["valid", "valid+train"] = "valid+train"
    smooth_layers: int = 0
    condition: bool = True
    condition_negatives: tuple[str, ...] = ()
    forms: dataclasses.InitVar[tuple[str, ...] | None] = None  # deprecated name of `methods`, construction only
    portable: bool = False
    max_validation: int | None = 64
    screen_queries: int = 12
    finalists: int = 20
    aie_screen: int | None = 12
    aie_keep: int = 8
    prepend_bos: bool = False
    side_effect_budget: float | None = DEFAULT_SIDE_EFFECT_BUDGET
    accuracy_tolerance: float | Literal["se"] = DEFAULT_ACCURACY_TOLERANCE
    auto_positions: tuple[str, ...] = ("generated", "last_prompt")

    @property
    def auto_methods(self) -> tuple[str, ...]:
        """What ``method="auto"`` chooses among: ``methods``, without the head-level ones when ``portable``."""
        return tuple(m for m in self.methods if not (self.portable and m in HEAD_LEVEL_METHODS))

    def __post_init__(self, forms: tuple[str, ...] | None) -> None:
        if forms is not None:
            warnings.warn(
                "ExtractionConfig(forms=...) is deprecated; use methods=... (the same tuple)",
                DeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "methods", forms)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        self._check_auto()
        for name, minimum in (("k", 1), ("n_shots", 1), ("n_mean", 1), ("n_aie", 1), ("batch_size", 1)):
            _at_least(getattr(self, name), minimum, name)
        _at_least(self.heads_per_batch, 1, "heads_per_batch")
        if self.layer is not None:
            _at_least(self.layer, 0, "layer")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers:
                raise ValueError("layers is empty: give the candidate layers or None for every layer")
        PromptTemplate(self.template)  # validates
        object.__setattr__(self, "condition_negatives", tuple(str(t) for t in self.condition_negatives))

    def _check_auto(self) -> None:
        object.__setattr__(self, "auto_positions", tuple(self.auto_positions))
        chosen = self.auto_positions
        if not chosen or len(set(chosen)) < len(chosen) or any(p not in VECTOR_POSITIONS for p in chosen):
            raise ValueError(f"auto_positions must be one or more of {VECTOR_POSITIONS}, got {self.auto_positions!r}")
        for name in ("methods", "ks", "strengths", "head_strengths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise ValueError(f"{name} is empty: method='auto' needs at least one")
        unknown = [f for f in self.methods if f not in AUTO_METHODS]
        if unknown:
            raise ValueError(f"methods {unknown} cannot be chosen by 'auto'; choose from {AUTO_METHODS}")
        for k in self.ks:
            _at_least(k, 1, "every k")
        if any(not s > 0 for s in (*self.strengths, *self.head_strengths)):
            raise ValueError("strengths must be positive")
        _at_least(self.smooth_layers, 0, "smooth_layers")
        if not isinstance(self.portable, bool):
            raise TypeError(f"portable must be True or False, got {self.portable!r}")
        if self.portable and self.method in HEAD_LEVEL_METHODS:
            raise ValueError(
                f"portable=True makes a residual-stream vector, but method={self.method!r} is head-level; "
                f"choose one of {PORTABLE_METHODS} or 'auto'"
            )
        if self.portable and not self.auto_methods:
            raise ValueError(
                f"portable=True leaves no method to choose among methods={self.methods}; add one of {PORTABLE_METHODS}"
            )
        for name in ("screen_queries", "finalists", "aie_keep"):
            _at_least(getattr(self, name), 1, name)
        if self.aie_screen is not None:
            _at_least(self.aie_screen, 1, "aie_screen")
        if not isinstance(self.prepend_bos, bool):
            raise TypeError(f"prepend_bos must be True or False, got {self.prepend_bos!r}")
        if self.max_validation is not None:
            _at_least(self.max_validation, 1, "max_validation")
        budget = self.side_effect_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0):
            raise ValueError(
                f"side_effect_budget must be a number of nats >= 0 (or None for no budget), got {budget!r}"
            )
        tolerance = self.accuracy_tolerance
        if tolerance != "se" and (
            isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance <= 1
        ):
            raise ValueError(
                "accuracy_tolerance must be 'se' (one standard error of the best finalist's validation exact match) "
                f"or a number between 0 and 1, got {tolerance!r}"
            )
        if self.validation not in ("valid", "valid+train"):
            raise ValueError(f"validation must be 'valid' or 'valid+train', got {self.validation!r}")

    def aie_finalists(self, total_heads: int) -> int | None:
        """How many heads the AIE's screen keeps for the prompts after the first ``aie_screen`` (see
        ``aie_screen``), or ``None`` for no screen: every head on every prompt."""
        if self.aie_screen is None or self.aie_screen >= self.n_aie:
            return None
        if self.method == "auto":  # `heads` with k heads, the head-level forms with every k of `ks`
            uses = [self.k] * ("heads" in self.auto_methods)
            uses += list(self.ks) * any(m in HEAD_LEVEL_METHODS for m in self.auto_methods)
        else:
            uses = [self.k] if self.method in ("heads", *HEAD_LEVEL_METHODS) else []
        if not uses or self.aie_keep * max(uses) >= total_heads:
            return None
        return self.aie_keep * max(uses)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExtractionConfig:
        """Inverse of :meth:`to_dict` (also reads ``forms``, the former name of ``methods``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "forms" in data and "methods" not in data:
            values["methods"] = tuple(data["forms"])
        return cls(**values)


@dataclass(frozen=True)
class EvalConfig:
    """How :func:`~fv_plugin.evaluate` scores a task.

    Attributes:
        mode: ``"zero_shot"``, ``"icl"``, ``"shuffled"`` or ``"natural"``.
        strength: multiplies every vector.
        n_shots: demonstrations per ICL / shuffled prompt.
        split: where the queries come from (demonstrations always come from ``train``).
        n: number of prompts (default: one per query; natural mode: that many queries, each with every
            template).
        seed: seeds the prompt sample.
        template: demonstration template.
        natural_templates: templates with ``{x}`` for natural mode.
        generate: also decode greedily for exact match (natural mode always generates).
        max_new_tokens: for the continuation; default: the longest accepted answer's tokens plus one (natural
            mode: 12).
        batch_size: prompts per forward pass.
        protocol: ``"all"`` scores every query; ``"icl_correct"`` (the paper's protocol) only the queries the
            plain model answers correctly (first token) with clean ``n_shots``-shot ICL prompts.
        gate: steer a prompt only if it passes each vector's condition (``steer(..., gate=True)``).
        positions: where the continuation is steered: ``"generated"`` (the last prompt token and every generated
            token), ``"last_prompt"`` (that token only), ``"all"`` (every token) or ``"answer"`` (until the
            row's answer ends; ``steer(..., positions="answer")``); ``None``: the vectors' own (``fv.positions``).
            The next-token figures are steered at the last prompt token, and for ``"all"`` at every prompt token.
        prepend_bos: start every prompt with the tokenizer's BOS token; ``None``: as the vectors were extracted
            (``fv.prepend_bos``), or :class:`ExtractionConfig`'s default without vectors.
    """

    mode: Mode = "zero_shot"
    strength: float = 1.0
    n_shots: int = 10
    split: str = "test"
    n: int | None = None
    seed: int = 0
    template: str = DEFAULT_TEMPLATE
    natural_templates: tuple[str, ...] = NATURAL_TEMPLATES
    generate: bool = True
    max_new_tokens: int | None = None
    batch_size: int = 16
    protocol: Protocol = "all"
    gate: bool = False
    positions: AnswerPositions | None = None
    prepend_bos: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.gate, bool):
            raise TypeError(f"gate must be True or False, got {self.gate!r}")
        if self.positions is not None and self.positions not in get_args(AnswerPositions):
            raise ValueError(f"positions must be one of {get_args(AnswerPositions)}, got {self.positions!r}")
        if self.prepend_bos is not None and not isinstance(self.prepend_bos, bool):
            raise TypeError(f"prepend_bos must be True, False or None, got {self.prepend_bos!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.protocol == "icl_correct" and self.n_shots < 1:
            raise ValueError("protocol 'icl_correct' filters queries by clean ICL: it needs n_shots >= 1")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.split not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {self.split!r}")
        _at_least(self.batch_size, 1, "batch_size")
        _at_least(self.n_shots, 0, "n_shots")
        if self.n is not None:
            _at_least(self.n, 1, "n")
        if self.max_new_tokens is not None:
            _at_least(self.max_new_tokens, 1, "max_new_tokens")
        object.__setattr__(self, "natural_templates", tuple(self.natural_templates))
        for template in self.natural_templates:
            if template.count("{x}") != 1:
                raise ValueError(f"a natural-text template needs exactly one '{{x}}', got {template!r}")
        PromptTemplate(self.template)  # validates


def with_overrides(config: C, overrides: Mapping[str, Any], *, what: str) -> C:
    """``config`` with ``overrides`` applied; an unknown name raises a ``TypeError`` that lists the valid ones."""
    if not overrides:
        return config
    known = {f.name for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    renamed = {"forms": "methods"}  # deprecated names, accepted for one release
    unknown = sorted(set(overrides) - known - {old for old, new in renamed.items() if new in known})
    if unknown:
        raise TypeError(f"{what} got unknown setting(s) {unknown}; valid settings: {sorted(known)}")
    return dataclasses.replace(config, **overrides)  # type: ignore[type-var]
