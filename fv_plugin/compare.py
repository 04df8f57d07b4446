"""Across models: where each model's top heads sit, its vectors' similarities, and transfer of a vector.

Transfer fits a linear map between two models' residual streams at the layers their vectors use, by least
squares (with a small ridge) on shared neutral text, and sends model A's vector through it into model B. The
two models' tokenizers differ, so hidden states are paired at the character offsets where both models end a
token (word and punctuation ends: both tokenizers split there). A vector is a direction in the residual stream,
so only the map's linear part is applied to it (the offset cancels in any difference of states).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fv_plugin.analysis import HeadLocation, head_locations, similarity_matrix
from fv_plugin.architectures import ArchSpec, resolve_architecture
from fv_plugin.devices import input_device
from fv_plugin.evaluation import evaluate
from fv_plugin.hooks import record_layer_outputs
from fv_plugin.tasks import Task, neutral_texts
from fv_plugin.vector import FunctionVector

__all__ = [
    "LinearMap",
    "ModelComparison",
    "TaskComparison",
    "aligned_hidden_states",
    "compare_models",
    "fit_linear_map",
    "neutral_texts",
    "solve_ridge",
]


def _tokenize(tokenizer: Any, text: str) -> tuple[list[int], list[int | None]]:
    """Token ids and each token's end offset in ``text`` (``None`` for tokens with no text, e.g. BOS)."""
    enc = tokenizer(text, return_offsets_mapping=True)
    if "offset_mapping" not in enc:
        raise ValueError(f"{type(tokenizer).__name__} gives no offsets; transfer needs a fast tokenizer")
    return list(enc["input_ids"]), [end if end > start else None for start, end in enc["offset_mapping"]]


@torch.no_grad()
def aligned_hidden_states(
    models: Sequence[tuple[nn.Module, Any, int]],
    texts: Sequence[str],
    *,
    arch: Sequence[ArchSpec | None] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per text, each model's hidden states after its layer at the character offsets where all models end a token.

    Args:
        models: ``(model, tokenizer, layer)`` per model.
        texts: the texts (each run on its own, without padding).

    Returns:
        One ``(text_index, states)`` pair per model: ``text_index`` ``[n]`` says which text each row came from,
        ``states`` is ``[n, hidden]`` float32 on the CPU; row ``i`` of every model is the same place in the text.
    """
    if not texts:
        raise ValueError("no texts to align")
    specs = list(arch) if arch is not None else [None] * len(models)
    rows: list[list[torch.Tensor]] = [[] for _ in models]
    sources: list[int] = []
    for t, text in enumerate(texts):
        encoded = [_tokenize(tok, text) for _, tok, _ in models]
        ends = [e for _, e in encoded]
        shared = set.intersection(*[{e for e in row if e is not None} for row in ends])
        if not shared:
            continue
        order = sorted(shared)
        sources.extend([t] * len(order))
        for m, ((model, _, layer), spec) in enumerate(zip(models, specs, strict=True)):
            index = {e: i for i, e in enumerate(ends[m]) if e is not None}  # last token ending at each offset
            ids = torch.tensor([encoded[m][0]], device=input_device(model))
            with record_layer_outputs(model, [layer], arch=spec) as seen:
                model(input_ids=ids)
            picks = torch.tensor([index[e] for e in order])
            rows[m].append(seen[layer][0, picks.to(seen[layer].device)].float().cpu())
    if not sources:
        raise ValueError("the models' tokenizers share no token boundary in these texts")
    text_index = torch.tensor(sources)
    return [(text_index, torch.cat(chunks)) for chunks in rows]


@dataclass(frozen=True)
class LinearMap:
    """``y ≈ x @ weight + bias`` from model A's residual stream (after ``layer_a``) to B's (after ``layer_b``).

    ``r2`` is the fraction of B's variance it explains on held-out texts; ``n_fit`` and ``n_heldout`` count the
    paired positions used.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    layer_a: int
    layer_b: int
    r2: float
    n_fit: int
    n_heldout: int
    ridge: float
    model_a: str | None = None
    model_b: str | None = None

    def apply(self, fv: FunctionVector, *, target: nn.Module | None = None) -> FunctionVector:
        """Model A's vector as a vector for model B at ``layer_b`` (linear part only)."""
        if fv.is_head_patch or fv.layer_vectors is not None:
            raise ValueError(
                f"the {fv.task or 'task'!r} vector ({fv.method}) lives in its model's heads or at several layers; a "
                "map carries one layer's residual stream: map a single-layer method's vector (method='difference')"
            )
        if fv.size != self.weight.shape[0]:
            raise ValueError(f"the vector has size {fv.size}, the map expects {self.weight.shape[0]}")
        if fv.layer != self.layer_a:
            raise ValueError(f"the map was fitted at layer {self.layer_a} of model A; the vector is at {fv.layer}")
        mapped = fv.vector.float().cpu() @ self.weight
        config = getattr(target, "config", None)
        extra = {**fv.extra, "mapped_from": fv.model_name or "", "map_r2": f"{self.r2:.4f}"}
        return FunctionVector(
            vector=mapped,
            layer=self.layer_b,
            model_type=getattr(config, "model_type", None),
            hidden_size=int(self.weight.shape[1]),
            model_name=self.model_b,
            task=fv.task,
            prompt_template=fv.prompt_template,
            method=f"mapped {fv.method}" if fv.method else "mapped",
            library_version=fv.library_version,
            extra=extra,
        )


def solve_ridge(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    x64, y64 = x.double(), y.double()
    mx, my = x64.mean(0), y64.mean(0)
    xc, yc = x64 - mx, y64 - my
    gram = xc.T @ xc
    scale = float(gram.diagonal().mean()) or 1.0
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram + ridge * scale * eye, xc.T @ yc)
    return weight.float(), (my - mx @ weight).float()


def _r2(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    residual = y - (x @ weight + bias)
    total = (y - y.mean(0)).pow(2).sum()
    return float(1 - residual.pow(2).sum() / total) if total > 0 else float("nan")


def _name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or "") or None


def fit_linear_map(
    model_a: nn.Module,
    tokenizer_a: Any,
    layer_a: int,
    model_b: nn.Module,
    tokenizer_b: Any,
    layer_b: int,
    *,
    texts: Sequence[str] | None = None,
    ridge: float = 1e-3,
    heldout: float = 0.2,
) -> LinearMap:
    """Fit the map from A's residual stream after ``layer_a`` to B's after ``layer_b`` on neutral text.

    Args:
        texts: paragraphs to fit on (default: :func:`neutral_texts`); the last ``heldout`` fraction of them
            (at least one) is kept out of the fit to measure ``r2``, then the map is refitted on all of them.
        ridge: ridge penalty relative to the mean variance of A's states (0 gives plain least squares).
    """
    if ridge < 0 or not 0 < heldout < 1:
        raise ValueError("ridge must be >= 0 and heldout in (0, 1)")
    paragraphs = list(texts) if texts is not None else neutral_texts()
    if len(paragraphs) < 2:
        raise ValueError("fitting a map needs at least 2 texts (one is held out)")
    (source, xs), (_, ys) = aligned_hidden_states(
        [(model_a, tokenizer_a, layer_a), (model_b, tokenizer_b, layer_b)], paragraphs
    )
    cut = len(paragraphs) - max(1, round(heldout * len(paragraphs)))
    fit = source < cut
    if int(fit.sum()) <= xs.shape[1]:
        raise ValueError(f"only {int(fit.sum())} paired positions for a {xs.shape[1]}-dimensional map; pass more text")
    weight, bias = solve_ridge(xs[fit], ys[fit], ridge)
    r2 = _r2(xs[~fit], ys[~fit], weight, bias)
    weight, bias = solve_ridge(xs, ys, ridge)
    return LinearMap(
        weight=weight,
        bias=bias,
        layer_a=layer_a,
        layer_b=layer_b,
        r2=r2,
        n_fit=int(fit.sum()),
        n_heldout=int((~fit).sum()),
        ridge=ridge,
        model_a=_name(model_a),
        model_b=_name(model_b),
    )


@dataclass(frozen=True)
class TaskComparison:
    """One task on two models: layers, transfer, and zero-shot test accuracy with each vector.

    ``accuracy`` has ``"zero-shot"``, ``"own"`` (B's own vector) and ``"mapped"`` (A's vector mapped into B),
    all on model B; ``accuracy_a`` the same for A with its own vector. ``cosine`` compares the mapped vector
    with B's own; ``norm_ratio`` is their norms' ratio (mapped / own).
    """

    task: str
    layer_a: int
    layer_b: int
    map_r2: float
    cosine: float
    norm_ratio: float
    accuracy: dict[str, float]
    accuracy_a: dict[str, float]
    heads_a: tuple[HeadLocation, ...] = ()
    heads_b: tuple[HeadLocation, ...] = ()


@dataclass(frozen=True)
class ModelComparison:
    """Two models' vectors for the same tasks: similarity matrices, head depths and transfer per task."""

    model_a: str
    model_b: str
    tasks: tuple[str, ...]
    similarity_a: torch.Tensor
    similarity_b: torch.Tensor
    rows: tuple[TaskComparison, ...]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["similarity_a"] = self.similarity_a.tolist()
        out["similarity_b"] = self.similarity_b.tolist()
        return out


def _accuracy(model: nn.Module, tokenizer: Any, task: Task, fv: FunctionVector | None, n: int | None) -> float:
    vectors = [fv] if fv is not None else []
    return evaluate(model, tokenizer, task, vectors=vectors, generate=False, n=n).accuracy


@dataclass(frozen=True)
class _Side:
    """One model of a comparison, with its vectors per task."""

    model: nn.Module
    tokenizer: Any
    vectors: Mapping[str, FunctionVector]
    heads: Mapping[str, FunctionVector] | None

    def head_locations(self, task: str) -> tuple[HeadLocation, ...]:
        fv = self.heads.get(task) if self.heads else None
        return tuple(head_locations(fv)) if fv is not None and fv.heads else ()


def _compare_task(task: Task, a: _Side, b: _Side, mapping: LinearMap, n: int | None) -> TaskComparison:
    fa, fb = a.vectors[task.name], b.vectors[task.name]
    mapped = mapping.apply(fa, target=b.model)
    return TaskComparison(
        task=task.name,
        layer_a=fa.layer,
        layer_b=fb.layer,
        map_r2=mapping.r2,
        cosine=float(similarity_matrix([mapped, fb])[0, 1]),
        norm_ratio=mapped.norm() / max(fb.norm(), 1e-12),
        accuracy={
            "zero-shot": _accuracy(b.model, b.tokenizer, task, None, n),
            "own": _accuracy(b.model, b.tokenizer, task, fb, n),
            "mapped": _accuracy(b.model, b.tokenizer, task, mapped, n),
        },
        accuracy_a={
            "zero-shot": _accuracy(a.model, a.tokenizer, task, None, n),
            "own": _accuracy(a.model, a.tokenizer, task, fa, n),
        },
        heads_a=a.head_locations(task.name),
        heads_b=b.head_locations(task.name),
    )


def _check_vectors(tasks: Sequence[Task], side: _Side, which: str) -> None:
    missing = [t.name for t in tasks if t.name not in side.vectors]
    if missing:
        raise ValueError(f"{which} has no vector for {missing}")
    size = resolve_architecture(side.model).hidden_size
    wrong = [t.name for t in tasks if side.vectors[t.name].size != size]
    if wrong:
        raise ValueError(f"the {wrong} vectors of {which} do not match the model's hidden size {size}")


def compare_models(
    model_a: nn.Module,
    tokenizer_a: Any,
    model_b: nn.Module,
    tokenizer_b: Any,
    tasks: Sequence[Task],
    vectors_a: Mapping[str, FunctionVector],
    vectors_b: Mapping[str, FunctionVector],
    *,
    head_vectors_a: Mapping[str, FunctionVector] | None = None,
    head_vectors_b: Mapping[str, FunctionVector] | None = None,
    names: tuple[str, str] | None = None,
    texts: Sequence[str] | None = None,
    ridge: float = 1e-3,
    n: int | None = None,
) -> ModelComparison:
    """Compare two models on ``tasks`` given each model's vector per task name.

    Args:
        vectors_a, vectors_b: residual-stream vectors per task name (compared, mapped and evaluated).
        head_vectors_a, head_vectors_b: optional vectors extracted with ``method="heads"`` per task name, for
            where the top heads sit.
        names: display names of the models (default: their ``_name_or_path``).
        n: test prompts per task (default: the whole test split).
    """
    if not tasks:
        raise ValueError("no tasks to compare")
    a = _Side(model_a, tokenizer_a, vectors_a, head_vectors_a)
    b = _Side(model_b, tokenizer_b, vectors_b, head_vectors_b)
    _check_vectors(tasks, a, "vectors_a")
    _check_vectors(tasks, b, "vectors_b")
    maps: dict[tuple[int, int], LinearMap] = {}
    rows = []
    for task in tasks:
        key = (vectors_a[task.name].layer, vectors_b[task.name].layer)
        if key not in maps:
            maps[key] = fit_linear_map(
                model_a, tokenizer_a, key[0], model_b, tokenizer_b, key[1], texts=texts, ridge=ridge
            )
        rows.append(_compare_task(task, a, b, maps[key], n))
    label_a, label_b = names or (_name(model_a) or "model A", _name(model_b) or "model B")
    return ModelComparison(
        model_a=label_a,
        model_b=label_b,
        tasks=tuple(t.name for t in tasks),
        similarity_a=similarity_matrix([vectors_a[t.name] for t in tasks]),
        similarity_b=similarity_matrix([vectors_b[t.name] for t in tasks]),
        rows=tuple(rows),
    )
