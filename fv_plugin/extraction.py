"""Function-vector extraction: mean head activations -> AIE -> top-k heads -> vector, plus the baselines.

Forms, all returned as a :class:`~fv_plugin.FunctionVector` (``method`` says which):

- ``"heads"`` (the paper): the sum over the top-k heads by AIE of each head's mean activation sent through the
  attention output projection (and, for Gemma 2/3 and OLMo 2, through the norm applied to the attention output
  before it joins the residual stream).
- ``"head_patch"`` (the head-level form): the top-k heads' mean activations, written into those heads' own
  slots at the steered positions, the very intervention the AIE measures (``vector`` holds their sum for
  inspection; ``layer`` is the lowest head's layer; no layer sweep).
- ``"difference"``: mean last-token hidden state of ICL prompts minus that of zero-shot prompts at the layer.
- ``"layer_mean"``: mean last-token hidden state of ICL prompts at the layer (the task-vector baseline).

The layer is chosen by a zero-shot sweep on the task's validation split unless given.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from fv_plugin.activations import last_token_hidden_states
from fv_plugin.architectures import ArchSpec, ResolvedArch, resolve_architecture
from fv_plugin.devices import execution_device, input_device, input_dtype
from fv_plugin.mediation import IndirectEffects, average_indirect_effect, last_logits_only, mean_head_activations
from fv_plugin.prompts import DEFAULT_TEMPLATE, Prompt, encode_prompts, make_prompts
from fv_plugin.steering import steer
from fv_plugin.tasks import Task
from fv_plugin.vector import FunctionVector

__all__ = [
    "DEFAULT_METHODS",
    "LayerSweep",
    "Method",
    "default_method",
    "extract_function_vector",
    "head_vector",
    "layer_vectors",
    "zero_shot_scores",
]

logger = logging.getLogger(__name__)

Method = Literal["heads", "head_patch", "difference", "layer_mean"]
METHODS: tuple[str, ...] = ("heads", "head_patch", "difference", "layer_mean")

# The form ``method="auto"`` picks, per ``config.model_type``, from ``fv bench quality`` on the embedded models
# (first-token zero-shot accuracy on the 12 built-in tasks' test splits; README, "Which form by default"). On
# both, the ICL-minus-zero-shot difference beat the paper's head-based vector by a wide margin, so it is also
# the default for families not measured yet.
DEFAULT_METHODS: dict[str, Method] = {"llama": "difference", "gemma3_text": "difference"}
FALLBACK_METHOD: Method = "difference"


def default_method(model_type: str) -> Method:
    """The form ``method="auto"`` uses for a model family."""
    return DEFAULT_METHODS.get(model_type, FALLBACK_METHOD)


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


@torch.no_grad()
def head_vector(
    model: nn.Module, means: torch.Tensor, heads: Sequence[tuple[int, int]], *, arch: ArchSpec | None = None
) -> torch.Tensor:
    """Residual-stream contribution of ``heads`` at their mean activations, summed: float32 ``[hidden]``.

    Each head's contribution is computed by calling the output projection itself on an input that holds only
    that head's mean activation, minus the projection of zeros (so a bias is never counted once per head); this
    works for quantized projections too. Where the attention output passes through a norm before the residual
    add, a head's contribution is the norm of the mean attention output minus the norm of it without that head.
    """
    resolved = resolve_architecture(model, arch)
    n_heads, dim = means.shape[1], means.shape[2]
    total = torch.zeros(resolved.hidden_size)
    for layer, head in heads:
        proj = resolved.out_proj(layer)
        # Quantized weights are int8 / packed uint8 and offloaded ones sit on meta: ask the module instead.
        dtype = input_dtype(proj, fallback=_model_dtype(model))
        device = execution_device(proj) or input_device(model)
        if resolved.spec.attn_out_norm is None:
            only = torch.zeros(1, 1, n_heads * dim)
            only[..., head * dim : (head + 1) * dim] = means[layer, head]
            zeros = torch.zeros_like(only)
            pair = torch.cat([only, zeros]).to(device=device, dtype=dtype)
            out = proj(pair).float()
            total += (out[0, 0] - out[1, 0]).cpu()
        else:
            norm = resolved.layers[layer].get_submodule(resolved.spec.attn_out_norm)
            full = means[layer].reshape(1, 1, n_heads * dim).clone()
            without = full.clone()
            without[..., head * dim : (head + 1) * dim] = 0
            pair = torch.cat([full, without]).to(device=device, dtype=dtype)
            out = norm(proj(pair)).float()
            total += (out[0, 0] - out[1, 0]).cpu()
    return total


@torch.no_grad()
def zero_shot_scores(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    vectors: Sequence[FunctionVector | tuple[FunctionVector, float]] = (),
    *,
    strength: float = 1.0,
    normalize: Literal["absolute", "relative"] = "absolute",
    batch_size: int = 16,
) -> tuple[float, float]:
    """First-token top-1 accuracy and mean answer probability on ``prompts``, steered at the last prompt token."""
    correct, prob = 0, 0.0
    device = input_device(model)
    for start in range(0, len(prompts), batch_size):
        enc = encode_prompts(tokenizer, prompts[start : start + batch_size])
        with steer(model, *vectors, strength=strength, positions="last_prompt", normalize=normalize):
            logits = model(
                input_ids=enc.input_ids.to(device),
                attention_mask=enc.attention_mask.to(device),
                **last_logits_only(model),
            ).logits
        probs = logits[:, -1].float().softmax(-1).cpu()
        correct += int((probs.argmax(-1) == enc.answer_ids).sum())
        prob += float(probs[torch.arange(len(probs)), enc.answer_ids].sum())
    return correct / len(prompts), prob / len(prompts)


@dataclass(frozen=True)
class LayerSweep:
    """Zero-shot accuracy and answer probability on the validation prompts for each candidate layer."""

    layers: tuple[int, ...]
    accuracy: tuple[float, ...]
    probability: tuple[float, ...]

    @property
    def best(self) -> int:
        scored = zip(self.accuracy, self.probability, self.layers, strict=True)
        return max(scored, key=lambda t: (t[0], t[1]))[2]


def _sweep(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    make: Callable[[int], FunctionVector],
    layers: Sequence[int],
    strength: float,
    progress: bool,
) -> LayerSweep:
    acc, prob = [], []
    for layer in tqdm(layers, desc="layer sweep", disable=not progress):
        a, p = zero_shot_scores(model, tokenizer, prompts, [make(layer)], strength=strength)
        acc.append(a)
        prob.append(p)
    return LayerSweep(tuple(layers), tuple(acc), tuple(prob))


def _metadata(resolved: ResolvedArch, model: nn.Module, task: Task, template: str) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "model_type": resolved.model_type,
        "hidden_size": resolved.hidden_size,
        "model_name": str(getattr(config, "_name_or_path", "") or "") or None,
        "task": task.name,
        "prompt_template": template,
    }


def _state_vectors(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    method: str,
    clean: Sequence[Prompt],
    layers: Sequence[int],
    template: str,
    seed: int,
    batch_size: int,
) -> dict[int, torch.Tensor]:
    icl = last_token_hidden_states(model, tokenizer, [p.text for p in clean], layers, batch_size=batch_size)
    if method == "layer_mean":
        return {at: icl[at].mean(0) for at in layers}
    zero_prompts = make_prompts(task, n=len(clean), n_shots=0, split="train", template=template, seed=seed)
    zero = last_token_hidden_states(model, tokenizer, [p.text for p in zero_prompts], layers, batch_size=batch_size)
    return {at: icl[at].mean(0) - zero[at].mean(0) for at in layers}


def layer_vectors(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    *,
    method: Literal["difference", "layer_mean"] = "difference",
    layers: Sequence[int] | None = None,
    n_shots: int = 10,
    n_mean: int = 100,
    seed: int = 0,
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 16,
    arch: ArchSpec | None = None,
) -> dict[int, FunctionVector]:
    """The hidden-state forms at every layer in ``layers`` (default: all) from one pass over the prompts.

    Uses the same prompts as :func:`extract_function_vector` with the same arguments, so entry ``L`` equals
    ``extract_function_vector(..., method=method, layer=L)``'s vector. Handy for layer sweeps.
    """
    if method not in ("difference", "layer_mean"):
        raise ValueError(f"method must be 'difference' or 'layer_mean', got {method!r}")
    resolved = resolve_architecture(model, arch)
    wanted = list(layers) if layers is not None else list(range(resolved.num_layers))
    for at in wanted:
        if not 0 <= at < resolved.num_layers:
            raise ValueError(f"layer {at} is out of range: the model has {resolved.num_layers} layers")
    clean = make_prompts(task, n=n_mean, n_shots=n_shots, split="train", template=template, seed=seed)
    per_layer = _state_vectors(model, tokenizer, task, method, clean, wanted, template, seed, batch_size)
    meta = _metadata(resolved, model, task, template)
    return {at: FunctionVector(vector=v, layer=at, method=method, **meta) for at, v in per_layer.items()}


def extract_function_vector(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    *,
    n_shots: int = 10,
    k: int = 10,
    layer: int | None = None,
    seed: int = 0,
    method: Method | Literal["auto"] = "auto",
    n_mean: int = 100,
    n_aie: int = 25,
    layers: Sequence[int] | None = None,
    strength: float = 1.0,
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 16,
    heads_per_batch: int = 64,
    arch: ArchSpec | None = None,
    progress: bool = False,
    means: torch.Tensor | None = None,
    effects: IndirectEffects | None = None,
) -> FunctionVector:
    """Extract a function vector for ``task`` from ``model``.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        task: the task (see :func:`~fv_plugin.load_task`).
        n_shots: demonstrations per ICL prompt.
        k: number of heads (``method="heads"``).
        layer: layer whose output receives the vector; ``None`` chooses it by a zero-shot sweep on the
            validation split over ``layers`` (default: every layer).
        seed: seeds every prompt sample.
        method: ``"heads"`` (the paper), ``"head_patch"`` (head-level form), ``"difference"`` (ICL minus
            zero-shot), ``"layer_mean"``, or ``"auto"``: the form measured best for the model's family
            (:data:`DEFAULT_METHODS`).
        n_mean: clean ICL prompts for the means. n_aie: shuffled-label prompts for the AIE.
        strength: strength used when sweeping layers.
        means, effects: precomputed mean head activations and indirect effects (from the same prompts and
            seed) to reuse across forms.

    Returns:
        A :class:`FunctionVector` whose metadata has the heads, their AIE, the AIE matrix and the layer sweep.

    Example:
        >>> fv = extract_function_vector(model, tok, load_task("antonym"))  # doctest: +SKIP
    """
    if method != "auto" and method not in METHODS:
        raise ValueError(f"method must be 'auto' or one of {METHODS}, got {method!r}")
    if n_mean < 1 or n_aie < 1 or n_shots < 1:
        raise ValueError("n_mean, n_aie and n_shots must be >= 1")
    resolved = resolve_architecture(model, arch)
    if method == "auto":
        method = default_method(resolved.model_type)
    if layer is not None and not 0 <= layer < resolved.num_layers:
        raise ValueError(f"layer {layer} is out of range: the model has {resolved.num_layers} layers")
    candidates = list(layers) if layers is not None else list(range(resolved.num_layers))
    meta = _metadata(resolved, model, task, template)
    clean = make_prompts(task, n=n_mean, n_shots=n_shots, split="train", template=template, seed=seed)
    valid = make_prompts(task, n_shots=0, split="valid", template=template, seed=seed)
    extra: dict[str, str] = {"seed": str(seed), "n_shots": str(n_shots), "n_mean": str(n_mean)}

    if method in ("heads", "head_patch"):
        if means is None:
            means = mean_head_activations(model, tokenizer, clean, batch_size=batch_size, arch=arch, progress=progress)
        if effects is None:
            shuffled = make_prompts(
                task, n=n_aie, n_shots=n_shots, split="train", shuffle_labels=True, template=template, seed=seed + 1
            )
            effects = average_indirect_effect(
                model, tokenizer, shuffled, means, heads_per_batch=heads_per_batch, arch=arch, progress=progress
            )
        heads = effects.top_heads(k)
        vector = head_vector(model, means, heads, arch=arch)
        aie = effects.aie
        extra.update({"n_aie": str(n_aie), "aie": json.dumps([[round(float(v), 7) for v in row] for row in aie])})

        def make(at: int) -> FunctionVector:
            return FunctionVector(vector=vector, layer=at, **meta)

        scores = [float(aie[h]) for h in heads]
        fields: dict[str, Any] = {"heads": tuple(heads), "head_scores": tuple(scores), "k": k}
        if method == "head_patch":
            fields["head_values"] = torch.stack([means[h] for h in heads])
            layer = min(h[0] for h in heads)
    else:
        wanted = [layer] if layer is not None else candidates
        per_layer = _state_vectors(model, tokenizer, task, method, clean, wanted, template, seed, batch_size)

        def make(at: int) -> FunctionVector:
            return FunctionVector(vector=per_layer[at], layer=at, **meta)

        fields = {}

    if layer is None:  # (head_patch has set it: its heads sit at their own layers)
        sweep = _sweep(model, tokenizer, valid, make, candidates, strength, progress)
        layer = sweep.best
        extra["layer_sweep"] = json.dumps(
            {
                "layers": sweep.layers,
                "accuracy": sweep.accuracy,
                "probability": [round(p, 5) for p in sweep.probability],
            }
        )
        logger.info("layer %d chosen (validation accuracy %.2f)", layer, max(sweep.accuracy))
    from fv_plugin import __version__

    return FunctionVector(
        vector=make(layer).vector,
        layer=layer,
        method=method,
        library_version=__version__,
        extra=extra,
        **meta,
        **fields,
    )
