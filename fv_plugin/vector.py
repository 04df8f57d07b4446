"""The :class:`FunctionVector` value: a residual-stream vector for one layer, plus where it came from."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["WEIGHTS_NAME", "FunctionVector"]

WEIGHTS_NAME = "function_vector.safetensors"
_FORMAT = "fv_plugin.FunctionVector"
_FORMAT_VERSION = "1"
# Metadata fields that must agree for two vectors to be combined.
_IDENTITY_FIELDS = ("model_type", "hidden_size", "model_name")


def _library_version() -> str:
    from fv_plugin import __version__

    return __version__


@dataclass(frozen=True, eq=False)
class FunctionVector:
    """A vector to add to the residual stream after decoder layer ``layer``.

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
        extra: further string metadata.
        head_values: for the head-level form (``method="head_patch"``): one activation per entry of ``heads``,
            shape ``[k, head_dim]``, written into those heads' own slots of the attention output projection's
            input when steering (instead of adding ``vector``, which then holds their residual-stream sum).

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

    @property
    def is_head_patch(self) -> bool:
        """Whether steering writes head activations (head-level form) rather than adding ``vector``."""
        return self.head_values is not None

    # ----------------------------------------------------------------- basics
    @property
    def size(self) -> int:
        return int(self.vector.numel())

    def norm(self) -> float:
        return float(self.vector.float().norm())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FunctionVector:
        values = self.head_values.to(device=device, dtype=dtype) if self.head_values is not None else None
        return dataclasses.replace(self, vector=self.vector.to(device=device, dtype=dtype), head_values=values)

    def __repr__(self) -> str:
        what = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in ("model_type", "task", "method", "k")
            if getattr(self, name) is not None
        )
        return (
            f"FunctionVector(layer={self.layer}, size={self.size}, norm={self.norm():.4g}{', ' if what else ''}{what})"
        )

    # ------------------------------------------------------------- arithmetic
    def _refuse_head_patch(self, op: str) -> None:
        if self.is_head_patch:
            raise TypeError(
                f"head-level function vectors (method='head_patch') do not support {op}: they write head "
                "activations instead of adding a vector. Steer with several, each with its own strength."
            )

    def _check_compatible(self, other: FunctionVector) -> None:
        self._refuse_head_patch("arithmetic")
        other._refuse_head_patch("arithmetic")
        if self.layer != other.layer:
            raise ValueError(
                f"Cannot combine function vectors of different layers ({self.layer} and {other.layer}); "
                "steer with both instead: `steer(model, a, b)`."
            )
        for name in _IDENTITY_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(f"Cannot combine function vectors of different models: {name} {mine!r} vs {theirs!r}")
        if self.size != other.size:
            raise ValueError(f"Cannot combine function vectors of sizes {self.size} and {other.size}")

    def _combined(self, other: FunctionVector, vector: torch.Tensor) -> FunctionVector:
        def pick(name: str) -> Any:
            mine, theirs = getattr(self, name), getattr(other, name)
            return mine if theirs is None or mine == theirs else theirs if mine is None else None

        return FunctionVector(
            vector=vector,
            layer=self.layer,
            model_type=pick("model_type"),
            hidden_size=pick("hidden_size"),
            model_name=pick("model_name"),
            prompt_template=pick("prompt_template"),
            method="combination",
            library_version=_library_version(),
        )

    def _scaled(self, factor: float) -> FunctionVector:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        self._refuse_head_patch("scaling")
        if not math.isfinite(factor):
            raise ValueError(f"Cannot scale a function vector by {factor}")
        return dataclasses.replace(self, vector=self.vector * float(factor))

    def __add__(self, other: object) -> FunctionVector:
        if not isinstance(other, FunctionVector):
            return NotImplemented
        self._check_compatible(other)
        return self._combined(other, self.vector + other.vector.to(self.vector))

    def __sub__(self, other: object) -> FunctionVector:
        if not isinstance(other, FunctionVector):
            return NotImplemented
        self._check_compatible(other)
        return self._combined(other, self.vector - other.vector.to(self.vector))

    def __neg__(self) -> FunctionVector:
        self._refuse_head_patch("negation")
        return dataclasses.replace(self, vector=-self.vector)

    def __mul__(self, factor: float) -> FunctionVector:
        return self._scaled(factor)

    __rmul__ = __mul__

    def __truediv__(self, factor: float) -> FunctionVector:
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor == 0:
            raise ZeroDivisionError("Cannot divide a function vector by zero")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        return self._scaled(1.0 / factor)

    # --------------------------------------------------------------- file I/O
    def _metadata(self) -> dict[str, str]:
        meta: dict[str, Any] = {
            "layer": self.layer,
            "model_type": self.model_type,
            "hidden_size": self.hidden_size if self.hidden_size is not None else self.size,
            "model_name": self.model_name,
            "task": self.task,
            "heads": [list(h) for h in self.heads] if self.heads is not None else None,
            "head_scores": list(self.head_scores) if self.head_scores is not None else None,
            "k": self.k,
            "prompt_template": self.prompt_template,
            "method": self.method,
            "library_version": self.library_version or _library_version(),
            "extra": dict(self.extra),
        }
        return {"format": _FORMAT, "format_version": _FORMAT_VERSION, "fv_metadata": json.dumps(meta)}

    def save(self, path: str | Path) -> Path:
        """Write the vector to a ``.safetensors`` file, metadata in its header (no pickle)."""
        from safetensors.torch import save_file

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"vector": self.vector.detach().to("cpu").contiguous()}
        if self.head_values is not None:
            tensors["head_values"] = self.head_values.detach().to("cpu").contiguous()
        save_file(tensors, str(target), metadata=self._metadata())
        return target

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu") -> FunctionVector:
        """Read a vector written by :meth:`save`.

        Raises:
            ValueError: when the file is not an fv_plugin safetensors file (a pickle, random bytes, a truncated
                file, another library's tensors).
        """
        from safetensors import safe_open

        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"No function vector file at {source}")
        try:
            with safe_open(str(source), framework="pt", device=str(device)) as handle:
                header = handle.metadata() or {}
                keys = list(handle.keys())
                vector = handle.get_tensor("vector") if "vector" in keys else None
                head_values = handle.get_tensor("head_values") if "head_values" in keys else None
        except Exception as exc:  # safetensors raises its own error types for every kind of corruption
            raise ValueError(
                f"{source} is not a readable safetensors file ({type(exc).__name__}: {exc}). "
                "Function vectors are saved with FunctionVector.save(); pickles are never loaded."
            ) from exc
        if header.get("format") != _FORMAT or vector is None:
            raise ValueError(
                f"{source} is a safetensors file but not an fv_plugin FunctionVector "
                f"(header format={header.get('format')!r}, tensors={keys})."
            )
        try:
            meta = json.loads(header["fv_metadata"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{source}: the fv_plugin metadata in its header is damaged ({exc}).") from exc
        return cls(
            vector=vector,
            layer=int(meta["layer"]),
            model_type=meta.get("model_type"),
            hidden_size=meta.get("hidden_size"),
            model_name=meta.get("model_name"),
            task=meta.get("task"),
            heads=tuple(tuple(h) for h in meta["heads"]) if meta.get("heads") is not None else None,
            head_scores=tuple(meta["head_scores"]) if meta.get("head_scores") is not None else None,
            k=meta.get("k"),
            prompt_template=meta.get("prompt_template"),
            method=meta.get("method"),
            library_version=meta.get("library_version"),
            extra=meta.get("extra") or {},
            head_values=head_values,
        )

    def to_gguf(self, path: str | Path, *, model_hint: str | None = None) -> Path:
        """Write a llama.cpp control-vector GGUF (``direction.{layer}``; llama.cpp adds it at every position)."""
        from fv_plugin.export import to_gguf

        return to_gguf(self, path, model_hint=model_hint)

    # ---------------------------------------------------- Hugging Face Hub I/O
    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Save as a Hub-style folder: ``function_vector.safetensors`` plus a readable ``fv_config.json``."""
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_pretrained expects a directory, but {folder} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        self.save(folder / WEIGHTS_NAME)
        meta = json.loads(self._metadata()["fv_metadata"])
        (folder / "fv_config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return folder

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
        local = Path(dir_or_repo_id)
        if local.is_dir():
            weights = local / WEIGHTS_NAME
            if not weights.is_file():
                raise ValueError(f"{local} has no {WEIGHTS_NAME}; was it written by FunctionVector.save_pretrained?")
            return cls.load(weights, device=device)
        if local.is_file():
            return cls.load(local, device=device)
        from huggingface_hub import hf_hub_download

        try:
            weights_path = hf_hub_download(
                repo_id=str(dir_or_repo_id), filename=WEIGHTS_NAME, revision=revision, cache_dir=cache_dir, token=token
            )
        except Exception as exc:
            raise ValueError(
                f"{dir_or_repo_id!r} is neither a local folder nor a Hub repository whose {WEIGHTS_NAME} could be "
                f"downloaded ({type(exc).__name__}: {exc})."
            ) from exc
        return cls.load(weights_path, device=device)

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
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision, repo_type="model"
            )
        return str(info)
