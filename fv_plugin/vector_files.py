"""Function vectors on disk and on the Hugging Face Hub: safetensors with the metadata in the header, never
pickle. :class:`~fv_plugin.FunctionVector`'s ``save``/``load``/``save_pretrained``/``from_pretrained``/
``push_to_hub`` call these.

This module does not import the vector's class (which imports this module): it reads a vector through
:class:`Stored`, and builds one by calling the constructor it is given with the stored fields.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from fv_plugin.condition import Condition
from fv_plugin.config import METHODS, ExtractionConfig
from fv_plugin.records import Selection, Sweep
from fv_plugin.version import __version__

__all__ = [
    "WEIGHTS_NAME",
    "Stored",
    "from_pretrained",
    "load",
    "metadata",
    "push_to_hub",
    "save",
    "save_pretrained",
]

WEIGHTS_NAME = "function_vector.safetensors"
FORMAT = "fv_plugin.FunctionVector"
FORMAT_VERSION = "2"  # 1: fv_plugin 0.1, metadata of its own in `extra`
_LAYER_PREFIX = "layer_vectors."
_CONDITION = "condition.direction"
# settings a file predates: no BOS token, the most accurate finalist (tolerance 0), finalists steered at
# "generated" only
_BEFORE = {"prepend_bos": False, "accuracy_tolerance": 0.0, "auto_positions": ("generated",)}
V = TypeVar("V")


class Stored(Protocol):
    """What a file holds of a vector: the fields of :class:`~fv_plugin.FunctionVector` (read only)."""

    @property
    def vector(self) -> torch.Tensor: ...
    @property
    def layer(self) -> int: ...
    @property
    def model_type(self) -> str | None: ...
    @property
    def hidden_size(self) -> int | None: ...
    @property
    def model_name(self) -> str | None: ...
    @property
    def task(self) -> str | None: ...
    @property
    def heads(self) -> tuple[tuple[int, int], ...] | None: ...
    @property
    def head_scores(self) -> tuple[float, ...] | None: ...
    @property
    def k(self) -> int | None: ...
    @property
    def prompt_template(self) -> str | None: ...
    @property
    def method(self) -> str | None: ...
    @property
    def library_version(self) -> str | None: ...
    @property
    def extra(self) -> Mapping[str, str]: ...
    @property
    def head_values(self) -> torch.Tensor | None: ...
    @property
    def head_mode(self) -> str: ...
    @property
    def aie(self) -> torch.Tensor | None: ...
    @property
    def layer_sweep(self) -> Sweep | None: ...
    @property
    def config(self) -> ExtractionConfig | None: ...
    @property
    def layer_vectors(self) -> Mapping[int, torch.Tensor] | None: ...
    @property
    def selection(self) -> Selection | None: ...

    @property
    def size(self) -> int: ...
    @property
    def condition(self) -> Condition | None: ...
    @property
    def positions(self) -> str | None: ...


def metadata(fv: Stored) -> dict[str, Any]:
    """Everything but the tensors, as JSON-ready values."""
    return {
        "layer": fv.layer,
        "model_type": fv.model_type,
        "hidden_size": fv.hidden_size if fv.hidden_size is not None else fv.size,
        "model_name": fv.model_name,
        "task": fv.task,
        "heads": [list(h) for h in fv.heads] if fv.heads is not None else None,
        "head_scores": list(fv.head_scores) if fv.head_scores is not None else None,
        "k": fv.k,
        "prompt_template": fv.prompt_template,
        "method": fv.method,
        "head_mode": fv.head_mode,
        "library_version": fv.library_version or __version__,
        "extra": dict(fv.extra),
        "layer_sweep": fv.layer_sweep.to_dict() if fv.layer_sweep is not None else None,
        "config": fv.config.to_dict() if fv.config is not None else None,
        "selection": fv.selection.to_dict() if fv.selection is not None else None,
        "condition": fv.condition.metadata() if fv.condition is not None else None,
        "positions": fv.positions,
    }


def save(fv: Stored, path: str | Path) -> Path:
    """Write ``fv`` to a ``.safetensors`` file, metadata in its header (no pickle)."""
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"vector": fv.vector.detach().to("cpu").contiguous()}
    if fv.head_values is not None:
        tensors["head_values"] = fv.head_values.detach().to("cpu").contiguous()
    if fv.aie is not None:
        tensors["aie"] = fv.aie.contiguous()
    for layer, part in (fv.layer_vectors or {}).items():
        tensors[f"{_LAYER_PREFIX}{layer}"] = part.detach().to("cpu").contiguous()
    if fv.condition is not None:
        tensors[_CONDITION] = fv.condition.direction.detach().to("cpu").contiguous()
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "fv_metadata": json.dumps(metadata(fv))}
    save_file(tensors, str(target), metadata=header)
    return target


def load(make: Callable[..., V], path: str | Path, *, device: torch.device | str = "cpu") -> V:
    """Read a vector written by :func:`save` (``make``: the vector's class, called with its fields); anything else
    is refused with a ``ValueError``."""
    from safetensors import safe_open

    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"No function vector file at {source}")
    try:
        with safe_open(str(source), framework="pt", device=str(device)) as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # safetensors raises its own error types for every kind of corruption
        raise ValueError(
            f"{source} is not a readable safetensors file ({type(exc).__name__}: {exc}). "
            "Function vectors are saved with FunctionVector.save(); pickles are never loaded."
        ) from exc
    if header.get("format") != FORMAT or "vector" not in tensors:
        raise ValueError(
            f"{source} is a safetensors file but not an fv_plugin FunctionVector "
            f"(header format={header.get('format')!r}, tensors={sorted(tensors)})."
        )
    try:
        meta = json.loads(header["fv_metadata"])
        return make(**_fields(meta, tensors, legacy=header.get("format_version") == "1"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{source}: the fv_plugin metadata in its header is damaged ({exc}).") from exc


def _fields(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, legacy: bool) -> dict[str, Any]:
    """Constructor arguments from a file's metadata and tensors (files of fv_plugin 0.1, ``legacy``, kept the AIE
    matrix, the layer sweep and the settings as strings in ``extra``: they become the typed fields)."""
    extra = dict(meta.get("extra") or {})
    legacy_aie = extra.pop("aie", None) if legacy else None
    legacy_sweep = extra.pop("layer_sweep", None) if legacy else None
    aie = tensors.get("aie")
    if aie is None and legacy_aie is not None:
        aie = torch.tensor(json.loads(legacy_aie), dtype=torch.float32)
    sweep = meta.get("layer_sweep") or (json.loads(legacy_sweep) if legacy_sweep is not None else None)
    config = meta.get("config") or (_legacy_config(meta, extra, chose_layer=sweep is not None) if legacy else None)
    parts = {int(k[len(_LAYER_PREFIX) :]): v for k, v in tensors.items() if k.startswith(_LAYER_PREFIX)}
    return {
        "vector": tensors["vector"],
        "layer": int(meta["layer"]),
        **{name: meta.get(name) for name in ("model_type", "hidden_size", "model_name", "task", "k")},
        **{name: meta.get(name) for name in ("prompt_template", "method", "library_version")},
        "heads": tuple(tuple(h) for h in meta["heads"]) if meta.get("heads") is not None else None,
        "head_scores": tuple(meta["head_scores"]) if meta.get("head_scores") is not None else None,
        "extra": extra,
        "head_values": tensors.get("head_values"),
        "head_mode": meta.get("head_mode") or "replace",
        "aie": aie,
        "layer_sweep": Sweep.from_dict(sweep) if sweep is not None else None,
        "config": ExtractionConfig.from_dict({**_BEFORE, **config}) if config else None,
        "layer_vectors": parts or None,
        "selection": Selection.from_dict(meta["selection"]) if meta.get("selection") else None,
        "condition": _condition(meta, tensors),
        "positions": meta.get("positions"),  # files written before vectors carried positions: None ("generated")
    }


def _condition(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Condition | None:
    """The stored condition; files written before conditions existed have none."""
    if not meta.get("condition") or _CONDITION not in tensors:
        return None
    return Condition.from_metadata(meta["condition"], tensors[_CONDITION])


def _legacy_config(meta: Mapping[str, Any], extra: dict[str, str], *, chose_layer: bool) -> dict[str, Any] | None:
    """fv_plugin 0.1 kept the extraction settings as strings in ``extra``: take them out as a config."""
    settings: dict[str, Any] = {
        name: int(extra.pop(name)) for name in ("seed", "n_shots", "n_mean", "n_aie") if name in extra
    }
    if not settings:
        return None
    method = meta.get("method")
    settings["method"] = method if method in METHODS else "auto"
    settings["layer"] = None if chose_layer else int(meta["layer"])
    if meta.get("k") is not None:
        settings["k"] = int(meta["k"])
    return settings


def save_pretrained(fv: Stored, save_directory: str | Path) -> Path:
    """Save as a Hub-style folder: ``function_vector.safetensors`` plus a readable ``fv_config.json``."""
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_pretrained expects a directory, but {folder} is a file")
    folder.mkdir(parents=True, exist_ok=True)
    save(fv, folder / WEIGHTS_NAME)
    (folder / "fv_config.json").write_text(json.dumps(metadata(fv), indent=2) + "\n", encoding="utf-8")
    return folder


def from_pretrained(
    make: Callable[..., V],
    dir_or_repo_id: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    device: torch.device | str = "cpu",
) -> V:
    """Load from a folder written by :func:`save_pretrained` or from a Hub repository id."""
    local = Path(dir_or_repo_id)
    if local.is_dir():
        weights = local / WEIGHTS_NAME
        if not weights.is_file():
            raise ValueError(f"{local} has no {WEIGHTS_NAME}; was it written by FunctionVector.save_pretrained?")
        return load(make, weights, device=device)
    if local.is_file():
        return load(make, local, device=device)
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
    return load(make, weights_path, device=device)


def push_to_hub(
    fv: Stored,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload function vector",
    revision: str | None = None,
) -> str:
    """Upload the :func:`save_pretrained` folder to a Hub model repository; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(fv, tmp)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision, repo_type="model"
        )
    return str(info)
