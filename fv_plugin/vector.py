"""The :class:`FunctionVector` value: a residual-stream vector for one layer (or one per layer), plus where it
came from. Its files are written and read by :mod:`fv_plugin.vector_files`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fv_plugin import vector_files
from fv_plugin.condition import Condition
from fv_plugin.config import VECTOR_POSITIONS, ExtractionConfig
from fv_plugin.records import Selection, Sweep
from fv_plugin.vector_files import WEIGHTS_NAME
from fv_plugin.version import __version__

__all__ = ["WEIGHTS_NAME", "FunctionVector"]

# Metadata fields that must agree for two vectors to be combined.
_IDENTITY_FIELDS = ("model_type", "hidden_size", "model_name")


def _library_version() -> str:
    return __version__


@dataclass(frozen=True, eq=False)
class FunctionVector:
    """A vector to add to the residual stream after decoder layer ``layer``.

    What the ``strength`` of :func:`~fv_plugin.steer` (and of the processor, ``SteeredModel`` and vLLM's
    ``steering``) does depends on the vector's ``method``:

    - ``"heads"``, ``"difference"``, ``"layer_mean"``, ``"head_difference"`` and sums of vectors: a multiplier;
      ``strength * weight * vector`` is added (0 = off, 1 = the vector as made);
    - ``"head_patch"``: an interpolation of the chosen heads' activations toward their stored means (0 = off,
      1 = replaced by the means);
    - a vector made by ``method="auto"``: ``auto`` already multiplied the vector by the strength it chose (its
      :attr:`builtin_strength`, shown by ``print(fv)``), so ``strength`` multiplies on top of it: 1 steers as
      ``auto`` measured.

    Attributes:
        vector: shape ``[hidden]``.
        layer: index of the decoder layer whose output receives the vector (0-based).
        model_type: ``config.model_type`` of the model it was made on, if known.
        hidden_size: hidden size of that model, if known.
        model_name: name or path of that model, if known.
        task: name of the task it encodes.
        heads: ``(layer, head)`` pairs it was built from.
        head_scores: one score (e.g. average indirect effect) per entry of ``heads``.
        k: number of heads.
        prompt_template: template of the prompts it was extracted from.
        method: how it was made (e.g. ``"heads"``, ``"layer_mean"``, ``"combination"``).
        library_version: fv_plugin version that made it.
        extra: further string metadata of your own (fv_plugin's own metadata has typed fields).
        head_values: for the head-level methods: one activation per entry of ``heads``, shape ``[k, head_dim]``,
            written into (``head_mode="replace"``, ``method="head_patch"``) or added to (``head_mode="add"``,
            ``method="head_difference"``) those heads' own slots of the attention output projection's input
            when steering, instead of adding ``vector`` (which then holds their residual-stream contribution).
        head_mode: ``"replace"`` (strength interpolates, 0 = off, 1 = replace) or ``"add"`` (strength scales).
        layer_vectors: for a vector spread over several layers: one ``[hidden]`` vector per layer, each added
            after its own layer when steering (``vector`` then holds their sum, ``layer`` the lowest layer);
            e.g. each chosen head's contribution added after the head's own layer. See :meth:`from_layers`.
        aie: the ``[layers, heads]`` average indirect effects the heads were ranked by, if they were.
        layer_sweep: the validation sweep that chose ``layer``, if one did.
        selection: every candidate ``method="auto"`` scored on validation prompts, and the one it chose.
        config: the settings it was extracted with, if it was.
        condition: which prompts it is meant for (see :mod:`fv_plugin.condition`); used by ``gate=True``.
        positions: where ``steer`` adds it when not told (``"generated"``: the last prompt token and every
            generated one; ``"last_prompt"``: that token only); ``method="auto"`` chooses it, ``None``: ``"generated"``.
            A sum of vectors keeps it only where they agree.

    Example:
        >>> import torch
        >>> fv = FunctionVector(vector=torch.ones(4), layer=3)
        >>> (2.0 * fv - fv / 2).vector.tolist()
        [1.5, 1.5, 1.5, 1.5]
    """

    vector: torch.Tensor
    layer: int
    model_type: str | None = None
    hidden_size: int | None = None
    model_name: str | None = None
    task: str | None = None
    heads: tuple[tuple[int, int], ...] | None = None
    head_scores: tuple[float, ...] | None = None
    k: int | None = None
    prompt_template: str | None = None
    method: str | None = None
    library_version: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    head_values: torch.Tensor | None = None
    head_mode: Literal["replace", "add"] = "replace"
    aie: torch.Tensor | None = None
    layer_sweep: Sweep | None = None
    config: ExtractionConfig | None = None
    layer_vectors: Mapping[int, torch.Tensor] | None = None
    selection: Selection | None = None
    condition: Condition | None = None
    positions: str | None = None

    @classmethod
    def from_layers(cls, parts: Mapping[int, torch.Tensor], **fields: Any) -> FunctionVector:
        """A vector added after several layers: ``parts`` maps a layer to its ``[hidden]`` vector."""
        if not parts:
            raise ValueError("from_layers needs at least one (layer, vector) part")
        total = torch.stack([p.detach().float() for p in parts.values()]).sum(0)
        return cls(vector=total, layer=min(parts), layer_vectors=dict(parts), **fields)

    def __post_init__(self) -> None:
        vec = self.vector
        if not isinstance(vec, torch.Tensor):
            raise TypeError(f"FunctionVector.vector must be a torch.Tensor, got {type(vec).__name__}")
        if vec.dim() != 1 or vec.numel() == 0:
            raise ValueError(f"FunctionVector.vector must have shape [hidden], got {tuple(vec.shape)}")
        if not vec.is_floating_point():
            raise TypeError(f"FunctionVector.vector must be a floating-point tensor, got {vec.dtype}")
        if vec.device.type != "meta" and not bool(torch.isfinite(vec).all()):
            raise ValueError("FunctionVector.vector contains NaN or inf values")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"FunctionVector.layer must be a non-negative int, got {self.layer!r}")
        if self.hidden_size is not None and self.hidden_size != vec.numel():
            raise ValueError(
                f"FunctionVector.hidden_size={self.hidden_size} does not match the vector's size {vec.numel()}"
            )
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple((int(a), int(b)) for a, b in self.heads))
        if self.head_scores is not None:
            object.__setattr__(self, "head_scores", tuple(float(s) for s in self.head_scores))
        object.__setattr__(self, "vector", vec.detach())
        object.__setattr__(self, "extra", dict(self.extra))
        if self.head_values is not None:
            values = self.head_values
            if not isinstance(values, torch.Tensor) or values.dim() != 2 or not values.is_floating_point():
                raise ValueError("head_values must be a floating-point tensor of shape [k, head_dim]")
            if self.heads is None or len(self.heads) != values.shape[0]:
                raise ValueError("head_values needs `heads` with one (layer, head) per row")
            if values.device.type != "meta" and not bool(torch.isfinite(values).all()):
                raise ValueError("head_values contains NaN or inf values")
            object.__setattr__(self, "head_values", values.detach())
        if self.head_mode not in ("replace", "add"):
            raise ValueError(f"head_mode must be 'replace' or 'add', got {self.head_mode!r}")
        if self.aie is not None:
            if not isinstance(self.aie, torch.Tensor) or self.aie.dim() != 2 or not self.aie.is_floating_point():
                raise ValueError("aie must be a floating-point tensor of shape [layers, heads]")
            object.__setattr__(self, "aie", self.aie.detach().float().cpu())
        if self.layer_sweep is not None and not isinstance(self.layer_sweep, Sweep):
            raise TypeError(f"layer_sweep must be an fv_plugin Sweep, got {type(self.layer_sweep).__name__}")
        if self.config is not None and not isinstance(self.config, ExtractionConfig):
            raise TypeError(f"config must be an ExtractionConfig, got {type(self.config).__name__}")
        if self.layer_vectors is not None:
            object.__setattr__(self, "layer_vectors", self._checked_parts(self.layer_vectors))
        if self.selection is not None and not isinstance(self.selection, Selection):
            raise TypeError(f"selection must be an fv_plugin Selection, got {type(self.selection).__name__}")
        if self.condition is not None:
            self._check_condition(self.condition)
        if self.positions is not None and self.positions not in VECTOR_POSITIONS:
            raise ValueError(
                f"FunctionVector.positions must be one of {VECTOR_POSITIONS} or None, got {self.positions!r}"
            )

    def _check_condition(self, condition: object) -> None:
        if not isinstance(condition, Condition):
            raise TypeError(f"condition must be an fv_plugin Condition, got {type(condition).__name__}")
        if condition.direction.numel() != self.size or condition.layer >= self.first_layer:
            raise ValueError(
                f"a condition reads layer {condition.layer} with size {condition.direction.numel()}; this vector "
                f"needs a layer below {self.first_layer} (the first it touches) and size {self.size}"
            )

    def _checked_parts(self, parts: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if not parts or self.head_values is not None:
            raise ValueError("layer_vectors must hold at least one layer, and not with head_values")
        checked = {}
        for layer, part in sorted(parts.items()):
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"layer_vectors keys must be non-negative ints (layers), got {layer!r}")
            if not isinstance(part, torch.Tensor) or part.shape != self.vector.shape or not part.is_floating_point():
                raise ValueError(
                    f"layer_vectors[{layer}] must be a floating-point tensor of shape {tuple(self.vector.shape)}"
                )
            if part.device.type != "meta" and not bool(torch.isfinite(part).all()):
                raise ValueError(f"layer_vectors[{layer}] contains NaN or inf values")
            checked[layer] = part.detach()
        if self.layer != min(checked):
            raise ValueError(
                f"a vector over layers {sorted(checked)} has layer {min(checked)} (its lowest), not {self.layer}"
            )
        return checked

    @property
    def prepend_bos(self) -> bool:
        """Whether its prompts started with the BOS token (``config.prepend_bos``; ``False`` without a config):
        steer prompts tokenized the same way (:func:`~fv_plugin.prompt_tokenizer`)."""
        return bool(self.config.prepend_bos) if self.config is not None else False

    @property
    def is_head_patch(self) -> bool:
        """Whether steering writes head activations (head-level method) rather than adding ``vector``."""
        return self.head_values is not None

    @property
    def builtin_strength(self) -> float | None:
        """The strength ``method="auto"`` chose and multiplied into this vector (``None`` if it carries none)."""
        if self.selection is None or (self.is_head_patch and self.head_mode == "replace"):
            return None  # head_patch: auto keeps strength 1 (replace) and builds nothing in
        return self.selection.best.strength

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers it is added after."""
        return tuple(self.layer_vectors) if self.layer_vectors is not None else (self.layer,)

    @property
    def first_layer(self) -> int:
        """The first layer steering touches (a head-level form writes inside its heads' layers)."""
        heads = [layer for layer, _ in self.heads or ()] if self.head_values is not None else []
        return min([*self.layers, *heads])

    def parts(self) -> dict[int, torch.Tensor]:
        """What is added after each layer: ``{layer: [hidden]}`` (one entry for a single-layer vector)."""
        return dict(self.layer_vectors) if self.layer_vectors is not None else {self.layer: self.vector}

    # ----------------------------------------------------------------- basics
    @property
    def size(self) -> int:
        return int(self.vector.numel())

    def norm(self) -> float:
        return float(self.vector.float().norm())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FunctionVector:
        return self._mapped(lambda t: t.to(device=device, dtype=dtype), heads_too=True)

    def _mapped(self, fn: Callable[[torch.Tensor], torch.Tensor], *, heads_too: bool = False) -> FunctionVector:
        """The same vector with ``fn`` applied to ``vector`` and each layer's part (and head values)."""
        parts = {layer: fn(p) for layer, p in self.layer_vectors.items()} if self.layer_vectors is not None else None
        values = fn(self.head_values) if heads_too and self.head_values is not None else self.head_values
        return dataclasses.replace(self, vector=fn(self.vector), layer_vectors=parts, head_values=values)

    def __repr__(self) -> str:
        what = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in ("model_type", "task", "method", "k", "positions")
            if getattr(self, name) is not None
        )
        if self.builtin_strength is not None:
            what += f"{', ' if what else ''}built-in strength {self.builtin_strength:g} (chosen by auto)"
        return (
            f"FunctionVector(layer={self.layer}, size={self.size}, norm={self.norm():.4g}{', ' if what else ''}{what})"
        )

    # ------------------------------------------------------------- arithmetic
    def _refuse_head_patch(self, op: str) -> None:
        if self.is_head_patch and (self.head_mode == "replace" or op == "arithmetic"):
            raise TypeError(
                f"head-level function vectors (method={self.method!r}) do not support {op}: they write head "
                "activations instead of adding a vector. Steer with several, each with its own strength."
            )

    def _check_compatible(self, other: FunctionVector) -> None:
        self._refuse_head_patch("arithmetic")
        other._refuse_head_patch("arithmetic")
        if self.layers != other.layers:
            raise ValueError(
                f"Cannot combine function vectors of different layers ({list(self.layers)} and {list(other.layers)}); "
                "steer with both instead: `steer(model, a, b)`."
            )
        for name in _IDENTITY_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(f"Cannot combine function vectors of different models: {name} {mine!r} vs {theirs!r}")
        if self.size != other.size:
            raise ValueError(f"Cannot combine function vectors of sizes {self.size} and {other.size}")

    def _combined(self, other: FunctionVector, sign: float) -> FunctionVector:
        def pick(name: str) -> Any:
            mine, theirs = getattr(self, name), getattr(other, name)
            return mine if theirs is None or mine == theirs else theirs if mine is None else None

        theirs = other.parts()
        parts = {at: p + sign * theirs[at].to(p) for at, p in self.parts().items()}
        return FunctionVector(
            vector=self.vector + sign * other.vector.to(self.vector),
            layer=self.layer,
            layer_vectors=parts if self.layer_vectors is not None else None,
            model_type=pick("model_type"),
            hidden_size=pick("hidden_size"),
            model_name=pick("model_name"),
            prompt_template=pick("prompt_template"),
            method="combination",
            library_version=_library_version(),
            positions=self.positions if self.positions == other.positions else None,
        )

    def _scaled(self, factor: float) -> FunctionVector:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        self._refuse_head_patch("scaling")
        if not math.isfinite(factor):
            raise ValueError(f"Cannot scale a function vector by {factor}")
        return self._mapped(lambda t: t * float(factor), heads_too=True)

    def __add__(self, other: object) -> FunctionVector:
        if not isinstance(other, FunctionVector):
            return NotImplemented
        self._check_compatible(other)
        return self._combined(other, 1.0)

    def __sub__(self, other: object) -> FunctionVector:
        if not isinstance(other, FunctionVector):
            return NotImplemented
        self._check_compatible(other)
        return self._combined(other, -1.0)

    def __neg__(self) -> FunctionVector:
        self._refuse_head_patch("negation")
        return self._mapped(lambda t: -t, heads_too=True)

    def __mul__(self, factor: float) -> FunctionVector:
        return self._scaled(factor)

    __rmul__ = __mul__

    def __truediv__(self, factor: float) -> FunctionVector:
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor == 0:
            raise ZeroDivisionError("Cannot divide a function vector by zero")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        return self._scaled(1.0 / factor)

    # --------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write the vector to a ``.safetensors`` file, metadata in its header (no pickle)."""
        return vector_files.save(self, path)

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu") -> FunctionVector:
        """Read a vector written by :meth:`save`.

        Raises:
            ValueError: when the file is not an fv_plugin safetensors file (a pickle, random bytes, a truncated
                file, another library's tensors).
        """
        return vector_files.load(cls, path, device=device)

    def to_gguf(self, path: str | Path, *, model_hint: str | None = None) -> Path:
        """Write a llama.cpp control-vector GGUF (one ``direction.N`` per layer; llama.cpp adds it at every
        position, fv_plugin's ``positions="all"``). See :func:`fv_plugin.export.to_gguf`."""
        from fv_plugin.export import to_gguf

        return to_gguf(self, path, model_hint=model_hint)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Save as a Hub-style folder: ``function_vector.safetensors`` plus a readable ``fv_config.json``."""
        return vector_files.save_pretrained(self, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        dir_or_repo_id: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        device: torch.device | str = "cpu",
    ) -> FunctionVector:
        """Load from a folder written by :meth:`save_pretrained` or from a Hub repository id."""
        return vector_files.from_pretrained(
            cls, dir_or_repo_id, revision=revision, cache_dir=cache_dir, token=token, device=device
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload function vector",
        revision: str | None = None,
    ) -> str:
        """Upload the :meth:`save_pretrained` folder to a Hub model repository; returns the commit URL."""
        return vector_files.push_to_hub(
            self, repo_id, private=private, token=token, commit_message=commit_message, revision=revision
        )
