"""What the Steer tab does, without the UI: check a request, batch it with other users' requests, stream it back.

Everything here uses fv_plugin's public API only. One :class:`Engine` holds the shared model. Each request
becomes three rows of one batched ``generate`` (:mod:`demo.batching`): the plain model, the model steered by the
request's vectors, and the plain model given demonstrations of the first vector's task (in-context learning,
ICL). Steering is per row and lives in the worker's call (``fv_plugin.steer(model, rows=...)``), so concurrent
users never see each other's vectors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import fv_plugin
from demo.batching import Batcher, BatchLimits, Update
from demo.generation import OWN, Job, PrefixCache, Row
from fv_plugin.side_effects import Specificity, TextEffects

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
POSITIONS = (OWN, *fv_plugin.POSITION_MODES)  # OWN: each vector at its own (fv.positions)
N_DEMOS = 10
DEFAULT_BOS = fv_plugin.ExtractionConfig().prepend_bos  # prompts without vectors: as the library extracts
SERIES = ("plain", "steered", f"{N_DEMOS}-shot ICL")

Pairs = tuple[tuple[fv_plugin.FunctionVector, float], ...]


class DemoError(ValueError):
    """A request the demo refuses; the message is shown to the user as is."""


@dataclass(frozen=True)
class Limits:
    """Per-request limits that keep one shared model responsive for everyone."""

    max_prompt_chars: int = 2_000
    max_prompt_tokens: int = 512
    max_icl_tokens: int = 1_024
    max_new_tokens: int = 64
    max_vectors: int = 3
    max_weight: float = 4.0
    max_strength: float = 10.0
    max_upload_bytes: int = 1_000_000
    max_task_pairs: int = 5_000


@dataclass(frozen=True)
class SteerRequest:
    """One user's Steer request; ``layer`` (if given) moves every vector there, ``task`` gives the
    demonstrations of the ICL row (``None``: no ICL row)."""

    prompt: str
    pairs: Pairs
    strength: float = 1.0
    layer: int | None = None
    positions: str = "generated"
    max_new_tokens: int = 8
    task: fv_plugin.Task | None = None
    gate: bool = True


# Per vector of a request, what its gate decided: True (the prompt passes the vector's condition: steered), False
# (it does not: that vector is left out of the steered row) or None (the vector has no condition: steered ungated).
# A whole request's decisions are None when its gate is off.
GateDecisions = tuple[bool | None, ...] | None


@dataclass(frozen=True)
class TokenProbs:
    """Next-token probabilities at the first generated position for the top tokens, one series per row."""

    tokens: tuple[str, ...]
    series: Mapping[str, tuple[float, ...]]


@dataclass(frozen=True)
class SteerView:
    """What the page shows for one request so far: the three continuations (``icl`` is ``None`` when there are
    no demonstrations), the probabilities once known, a note on the ICL row, whether it is finished, how many
    requests shared its ``generate``, and what the gate decided for each vector (``None``: gate off)."""

    unsteered: str
    steered: str
    icl: str | None
    probs: TokenProbs | None
    note: str
    done: bool
    shared: int = 1
    gate: GateDecisions = None


@dataclass(frozen=True)
class Demonstrations:
    """The ICL row (``None`` when there is none) and a sentence for the page saying what it is."""

    row: Row | None
    note: str


def load_vector_set(folder: Path) -> dict[str, fv_plugin.FunctionVector]:
    """Every ``<name>.safetensors`` in ``folder`` by name (an empty dict when the folder does not exist)."""
    if not folder.is_dir():
        return {}
    return {path.stem: fv_plugin.FunctionVector.load(path) for path in sorted(folder.glob("*.safetensors"))}


def available_vector_sets(root: Path = VECTORS_DIR) -> dict[str, dict[str, fv_plugin.FunctionVector]]:
    """The shipped vector sets, keyed by model short name."""
    if not root.is_dir():
        return {}
    sets = {folder.name: load_vector_set(folder) for folder in sorted(root.iterdir()) if folder.is_dir()}
    return {name: vectors for name, vectors in sets.items() if vectors}


@dataclass(frozen=True)
class ShippedEffects:
    """What the shipped vectors change besides their task (``side_effects.json``, made by build_vectors.py)."""

    specificity: Specificity | None
    text: dict[str, TextEffects]


def load_side_effects(folder: Path) -> ShippedEffects | None:
    """The shipped vectors' side effects in ``folder``, or ``None`` when they were not measured."""
    path = folder / "side_effects.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    spec = Specificity.from_dict(data["specificity"]) if data.get("specificity") else None
    return ShippedEffects(spec, {name: TextEffects.from_dict(t) for name, t in data.get("text_effects", {}).items()})


@functools.cache
def builtin_task(name: str) -> fv_plugin.Task | None:
    """The built-in task called ``name``, or ``None`` when there is none."""
    return fv_plugin.load_task(name) if name in fv_plugin.builtin_tasks() else None


def demonstration_text(task: fv_plugin.Task, n: int = N_DEMOS) -> str:
    """The first ``n`` training pairs of ``task`` as ``Q: x\\nA: y\\n\\n`` demonstrations."""
    template = fv_plugin.PromptTemplate()
    return "".join(template.demo(pair) for pair in task.train[:n])


def stop_ids(model: Any) -> frozenset[int]:
    """The model's end-of-sequence ids (its generation config may list several)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class Engine:
    """The shared model, the shipped vectors, and the Steer tab's operations on them.

    Args:
        model, tokenizer: the model every user steers.
        model_name: the name shown in the UI and written into extracted vectors.
        vectors: the precomputed vectors available to everyone, by name.
        limits: per-request limits.
        batching: how requests are gathered into one ``generate`` (default: :class:`BatchLimits`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_name: str,
        vectors: Mapping[str, fv_plugin.FunctionVector] | None = None,
        limits: Limits = Limits(),
        batching: BatchLimits | None = None,
    ) -> None:
        self.model = fv_plugin.attach(model)  # hooks stay on: steer() blocks never add or remove them
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vectors = dict(vectors or {})
        self.limits = limits
        self.num_layers = fv_plugin.resolve_architecture(model).num_layers
        self.prefixes = PrefixCache(self.model)
        self.batcher = Batcher(
            self.model,
            pad_id=tokenizer.pad_token_id,
            stop_ids=stop_ids(model),
            limits=batching or BatchLimits(),
            tokenizer=tokenizer,
        )

    # ------------------------------------------------------------------ checks
    def tokens(self, text: str, prepend_bos: bool) -> tuple[int, ...]:
        """``text``'s token ids as the vectors' prompts were tokenized (BOS first when they were extracted so)."""
        return tuple(self.bos_tokenizer(prepend_bos)(text)["input_ids"])

    def bos_tokenizer(self, prepend_bos: bool) -> Any:
        """The tokenizer as a vector's prompts were tokenized (``fv.prepend_bos``)."""
        return fv_plugin.prompt_tokenizer(self.tokenizer, prepend_bos=prepend_bos)

    def check_prompt(self, prompt: str, *, prepend_bos: bool = DEFAULT_BOS) -> tuple[int, ...]:
        """The prompt's token ids, or a :class:`DemoError` saying what is wrong with it."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise DemoError("Type a prompt first, e.g. 'Q: hot\\nA:'.")
        if len(prompt) > self.limits.max_prompt_chars:
            raise DemoError(f"The prompt has {len(prompt)} characters; the limit is {self.limits.max_prompt_chars}.")
        ids = self.tokens(prompt, prepend_bos)
        if len(ids) > self.limits.max_prompt_tokens:
            raise DemoError(f"The prompt has {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens}.")
        return ids

    def resolve(
        self, choices: Sequence[tuple[str, float]], extra: Mapping[str, fv_plugin.FunctionVector] | None = None
    ) -> Pairs:
        """``(name, weight)`` choices -> ``(vector, weight)`` pairs, from the shared vectors and the user's own."""
        pool = {**self.vectors, **(extra or {})}
        pairs = []
        for name, weight in choices:
            if not name:
                continue
            if name not in pool:
                raise DemoError(f"Unknown vector {name!r}; pick one of: {', '.join(sorted(pool)) or 'none'}.")
            if not -self.limits.max_weight <= float(weight) <= self.limits.max_weight:
                raise DemoError(f"Weight {weight} of {name!r} is outside ±{self.limits.max_weight}.")
            pairs.append((pool[name], float(weight)))
        if len(pairs) > self.limits.max_vectors:
            raise DemoError(f"Pick at most {self.limits.max_vectors} vectors.")
        return tuple(pairs)

    def check_steering(self, request: SteerRequest) -> Pairs:
        """The request's pairs (moved to ``request.layer``), or a :class:`DemoError` naming the bad setting."""
        if not request.pairs:
            raise DemoError("Pick at least one vector to steer with.")
        if request.positions not in POSITIONS:
            raise DemoError(f"Positions must be one of {POSITIONS}, got {request.positions!r}.")
        if not 1 <= int(request.max_new_tokens) <= self.limits.max_new_tokens:
            raise DemoError(
                f"New tokens must be between 1 and {self.limits.max_new_tokens}, got {request.max_new_tokens}."
            )
        if not -self.limits.max_strength <= float(request.strength) <= self.limits.max_strength:
            raise DemoError(f"Strength must be within ±{self.limits.max_strength}, got {request.strength}.")
        if request.layer is None:
            return request.pairs
        if not 0 <= int(request.layer) < self.num_layers:
            raise DemoError(f"Layer must be between 0 and {self.num_layers - 1}, got {request.layer}.")
        return tuple((dataclasses.replace(fv, layer=int(request.layer)), w) for fv, w in request.pairs)

    # ------------------------------------------------------------------ the three rows
    def demonstrations(
        self, prompt: str, task: fv_plugin.Task | None, *, prepend_bos: bool = DEFAULT_BOS
    ) -> Demonstrations:
        """The ICL row for ``prompt``: ``N_DEMOS`` training pairs of ``task``, then the prompt."""
        if task is None:
            return Demonstrations(
                None, "No ICL column: the first vector does not record a built-in task, so there are no examples."
            )
        demos = demonstration_text(task)
        ids = self.tokens(demos + prompt, prepend_bos)
        shots = len(task.train[:N_DEMOS])
        if len(ids) > self.limits.max_icl_tokens:
            return Demonstrations(
                None,
                f"No ICL column: the prompt after {shots} demonstrations of *{task.name}* has {len(ids)} "
                f"tokens, more than the {self.limits.max_icl_tokens} the demo allows.",
            )
        return Demonstrations(
            self.icl_row(ids, demos, prepend_bos), f"ICL: your prompt after {shots} demonstrations of *{task.name}*."
        )

    def icl_row(self, ids: tuple[int, ...], demos: str, prepend_bos: bool = DEFAULT_BOS) -> Row:
        """The ICL row, its demonstrations served from the prefix cache. Their last token is left out of the
        cached part (its merge may depend on what follows); a prompt whose tokens do not start with the cached
        ones is prefilled whole."""
        cached = self.tokens(demos, prepend_bos)[:-1]
        if not cached or ids[: len(cached)] != cached or len(ids) == len(cached):
            return Row(ids)
        return Row(ids[len(cached) :], prefix=self.prefixes.get(cached))

    def warm_up(self) -> None:
        """Prefill the demonstrations of every shared vector's task, so that no user waits for them."""
        for task, bos in {(builtin_task(fv.task), fv.prepend_bos) for fv in self.vectors.values() if fv.task}:
            if task is not None:
                self.demonstrations("Q: x\nA:", task, prepend_bos=bos)

    def gate(self, prompt: str, pairs: Pairs) -> tuple[bool | None, ...]:
        """Per vector: does ``prompt`` pass its condition (``None``: it has none)? The rule and the hidden state
        of ``steer(..., gate=True)``: ``fv_plugin.gate_decisions``, on the plain model."""
        return tuple(
            fv_plugin.gate_decisions(self.model, self.bos_tokenizer(fv.prepend_bos), [prompt], fv)[0]
            if fv.condition is not None
            else None
            for fv, _ in pairs
        )

    def job(self, request: SteerRequest) -> tuple[Job, Demonstrations, GateDecisions]:
        """The request as rows for the batcher (plain, steered, ICL), with what the ICL row is and what the gate
        decided. With the gate on, a vector whose condition the prompt does not pass is left out of the steered
        row (the prompt is decided once, before generation, as ``steer(..., gate=True)`` does at its last token);
        a vector without a condition steers ungated."""
        bos = request.pairs[0][0].prepend_bos if request.pairs else DEFAULT_BOS  # as the first vector's prompts
        ids = self.check_prompt(request.prompt, prepend_bos=bos)
        pairs = self.check_steering(request)
        decisions = self.gate(request.prompt, request.pairs) if request.gate else None
        if decisions is not None:
            pairs = tuple(pair for pair, passed in zip(pairs, decisions, strict=True) if passed is not False)
        demos = self.demonstrations(request.prompt, request.task, prepend_bos=bos)
        rows = (Row(ids), Row(ids, pairs), *((demos.row,) if demos.row is not None else ()))
        job = Job(rows, float(request.strength), request.positions, int(request.max_new_tokens))
        return job, demos, decisions

    # ------------------------------------------------------------------ serving
    def steer_stream(self, request: SteerRequest) -> Iterator[SteerView]:
        """Snapshots of the request's continuations as the shared batched ``generate`` produces them."""
        job, demos, decisions = self.job(request)
        probs: TokenProbs | None = None
        try:
            for update in self.batcher.submit(job).follow():
                if probs is None and update.probs is not None:
                    probs = self.token_probs(update.probs)
                yield dataclasses.replace(self.view(update, probs, demos.note), gate=decisions)
        except TimeoutError as exc:
            raise DemoError("The demo is too busy to answer right now; please try again in a minute.") from exc

    def steer(self, request: SteerRequest) -> SteerView:
        """The finished continuations of ``request`` (what :meth:`steer_stream` ends with)."""
        views = list(self.steer_stream(request))
        return views[-1]

    def view(self, update: Update, probs: TokenProbs | None, note: str) -> SteerView:
        texts = [self.tokenizer.decode(list(tokens), skip_special_tokens=True) for tokens in update.tokens]
        icl = texts[2] if len(texts) > 2 else None
        return SteerView(texts[0], texts[1], icl, probs, note, update.done, update.shared)

    def token_probs(self, probs: torch.Tensor, *, per_row: int = 5, limit: int = 8) -> TokenProbs:
        """The ``limit`` most likely tokens among each row's top ``per_row``, and every row's probability of them."""
        top = probs.topk(per_row, dim=-1).indices.flatten().tolist()
        best = probs.max(dim=0).values
        ids = sorted(set(top), key=lambda i: (-float(best[i]), i))[:limit]
        tokens = tuple(self.tokenizer.decode([i]) for i in ids)
        series = {label: tuple(float(probs[row, i]) for i in ids) for row, label in enumerate(SERIES[: len(probs)])}
        return TokenProbs(tokens, series)
