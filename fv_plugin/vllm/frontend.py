"""The server side of a request: where vLLM turns a request into engine input (the process that knows the model).

Each request's ``fv_`` arguments are parsed, checked against the served model and resolved into per-layer vectors
there, so a bad request fails alone (HTTP 400 on the OpenAI-compatible server, an exception from ``LLM.generate``)
and the workers only ever see checked input. A steered request also gets a prefix-cache salt of its steering, so
the cache never serves it key/value entries computed under other steering.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import nn

from fv_plugin.answer_span import answer_end_ids
from fv_plugin.architectures import ArchSpec, ResolvedArch
from fv_plugin.vector import FunctionVector
from fv_plugin.vllm.requests import RESOLVED_KEY, parse_request, resolve
from fv_plugin.vllm.settings import PluginSettings

__all__ = ["Frontend", "answer_ends_reader", "install_frontend", "load_vector_folder", "served_arch"]

logger = logging.getLogger(__name__)
_PATCHED = "fv_plugin_patched"


def load_vector_folder(folder: Path) -> dict[str, FunctionVector]:
    """Every vector file (``*.safetensors`` written by ``FunctionVector.save``) in ``folder``, keyed by file stem."""
    if not folder.is_dir():
        raise ValueError(f"FV_PLUGIN_VECTORS={folder} is not a folder; point it at a folder of saved vectors")
    vectors = {path.stem: FunctionVector.load(path) for path in sorted(folder.glob("*.safetensors"))}
    if not vectors:
        logger.warning("FV_PLUGIN_VECTORS=%s holds no .safetensors vector files", folder)
    logger.info("fv_plugin: loaded %d named vectors from %s: %s", len(vectors), folder, ", ".join(vectors))
    return vectors


def served_arch(*, hidden_size: int, num_layers: int, num_heads: int | None, model_type: str) -> ResolvedArch:
    """What ``check_vector`` needs to know of the served model (its modules live in the workers)."""
    return ResolvedArch(
        spec=ArchSpec(layers="model.layers"),
        layers=nn.ModuleList(nn.Identity() for _ in range(num_layers)),
        base=nn.Identity(),
        hidden_size=hidden_size,
        num_heads=num_heads,
        model_type=model_type,
    )


def _arch_of(model_config: Any) -> ResolvedArch:
    text = model_config.hf_text_config
    return served_arch(
        hidden_size=int(model_config.get_hidden_size()),
        num_layers=int(text.num_hidden_layers),
        num_heads=getattr(text, "num_attention_heads", None),
        model_type=str(text.model_type),
    )


def _head_dim_of(model_config: Any) -> int | None:
    try:
        return int(model_config.get_head_size())
    except (AttributeError, TypeError, ValueError):
        return None


def answer_ends_reader(tokenizer: Any, eos_token_id: object = None) -> Callable[[], bytes] | None:
    """The ids that end an answer for ``positions="answer"`` (little-endian ``int64`` bytes), computed from the
    served tokenizer on first use and kept; ``eos_token_id``: the model's generation config's. ``None`` without a
    tokenizer."""
    if tokenizer is None:
        return None
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos_token_id))

    @functools.cache
    def ends() -> bytes:
        return answer_end_ids(tokenizer, model).numpy().astype("<i8").tobytes()

    return ends


@dataclass(frozen=True)
class Frontend:
    """Checks and resolves the steering of each request for one served model."""

    arch: ResolvedArch
    settings: PluginSettings
    named: Mapping[str, FunctionVector] = field(default_factory=dict)
    head_dim: int | None = None
    pipeline_stages: int = 1
    answer_ends: Callable[[], bytes] | None = None

    def lookup(self, name: str) -> FunctionVector:
        found = self.named.get(name)
        if found is None:
            known = ", ".join(sorted(self.named)[:20]) or "none: start the server with FV_PLUGIN_VECTORS=<folder>"
            raise ValueError(f"no vector named {name!r} on this server (names are file stems; known: {known})")
        return found

    def resolved_args(self, extra_args: Mapping[str, Any] | None, prompt_length: int) -> tuple[dict[str, Any], str]:
        """New ``extra_args`` (``fv_`` keys replaced by the resolved steering) and the cache salt mark ("" if plain).

        Raises:
            ValueError, TypeError: what is wrong with the request's steering.
        """
        request = parse_request(extra_args, self.lookup)
        kept = {key: value for key, value in (extra_args or {}).items() if not key.startswith("fv_")}
        if request is None:
            return kept, ""
        if not self.settings.enabled:
            raise ValueError("steering is turned off on this server (FV_PLUGIN_VLLM=0)")
        if request.gate and self.pipeline_stages > 1:
            raise ValueError(
                "gate=True is not served with pipeline parallelism (a condition's layer and the layers it gates may "
                "sit on different stages); serve with tensor parallelism, or steer with gate=False"
            )
        resolved = resolve(
            request,
            self.arch,
            max_layers=self.settings.max_layers,
            max_heads=self.settings.max_heads,
            head_dim=self.head_dim,
            answer_ends=self.answer_ends,
        )
        if resolved is None:
            return kept, ""
        kept[RESOLVED_KEY] = resolved.to_args()
        return kept, resolved.salt(prompt_length)

    def admit(self, request: Any) -> None:
        """Resolve an ``EngineCoreRequest``'s steering in place (its params are the request's own copy)."""
        params = request.sampling_params
        if params is None or not params.extra_args:
            return
        length = len(request.prompt_token_ids) if request.prompt_token_ids is not None else len(request.prompt_embeds)
        try:
            extra_args, salt = self.resolved_args(params.extra_args, length)
        except (ValueError, TypeError) as exc:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(f"fv_plugin steering: {exc}", parameter="vllm_xargs") from exc
        params.extra_args = extra_args or None
        if salt:
            request.cache_salt = salt if request.cache_salt is None else f"{request.cache_salt}|{salt}"


def _frontend_for(processor: Any) -> Frontend:
    settings = PluginSettings.from_env()
    named = load_vector_folder(settings.vectors_folder) if settings.vectors_folder is not None else {}
    model_config = processor.model_config
    parallel = getattr(getattr(processor, "vllm_config", None), "parallel_config", None)
    return Frontend(
        arch=_arch_of(model_config),
        settings=settings,
        named=named,
        head_dim=_head_dim_of(model_config),
        pipeline_stages=int(getattr(parallel, "pipeline_parallel_size", 1)),
        answer_ends=answer_ends_reader(
            getattr(processor, "tokenizer", None),
            (getattr(processor, "generation_config_fields", None) or {}).get("eos_token_id"),
        ),
    )


def _wrap_init(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.fv_plugin_frontend = _frontend_for(self)

    return __init__


def _wrap_process(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = original(self, *args, **kwargs)
        self.fv_plugin_frontend.admit(request)
        return request

    return process_inputs


def install_frontend() -> None:
    """Make vLLM's ``InputProcessor`` check and resolve every request's steering (once per process; the settings
    are read from the environment when each engine starts)."""
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, _PATCHED, False):
        return
    setattr(InputProcessor, "__init__", _wrap_init(InputProcessor.__init__))  # noqa: B010
    setattr(InputProcessor, "process_inputs", _wrap_process(InputProcessor.process_inputs))  # noqa: B010
    setattr(InputProcessor, _PATCHED, True)
