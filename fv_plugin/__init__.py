"""fv_plugin: function-vector steering for any Hugging Face ``generate`` call."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fv_plugin")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from fv_plugin.activations import difference_vector, last_token_hidden_states, mean_last_token_hidden_state
from fv_plugin.analysis import TokenScore, aie_matrix, head_locations, similarity_matrix, top_tokens
from fv_plugin.architectures import ArchSpec, register_architecture
from fv_plugin.evaluation import EvalResult, EvalRow, Sweep, evaluate, sweep_k, sweep_layers, sweep_strength
from fv_plugin.extraction import extract_function_vector, head_vector, zero_shot_scores
from fv_plugin.hooks import attach, detach, is_attached
from fv_plugin.mediation import (
    IndirectEffects,
    attribution_patching,
    average_indirect_effect,
    mean_head_activations,
    rank_agreement,
)
from fv_plugin.models import EMBEDDED_MODELS, load_model
from fv_plugin.prompts import Prompt, PromptTemplate, encode_prompts, make_prompts
from fv_plugin.steering import FunctionVectorProcessor, SteeredModel, steer
from fv_plugin.tasks import Pair, Task, builtin_tasks, load_task
from fv_plugin.vector import FunctionVector

__all__ = [
    "EMBEDDED_MODELS",
    "ArchSpec",
    "EvalResult",
    "EvalRow",
    "FunctionVector",
    "FunctionVectorProcessor",
    "IndirectEffects",
    "Pair",
    "Prompt",
    "PromptTemplate",
    "SteeredModel",
    "Sweep",
    "Task",
    "TokenScore",
    "__version__",
    "aie_matrix",
    "attach",
    "attribution_patching",
    "average_indirect_effect",
    "builtin_tasks",
    "detach",
    "difference_vector",
    "encode_prompts",
    "evaluate",
    "extract_function_vector",
    "head_locations",
    "head_vector",
    "is_attached",
    "last_token_hidden_states",
    "load_model",
    "load_task",
    "make_prompts",
    "mean_head_activations",
    "mean_last_token_hidden_state",
    "rank_agreement",
    "register_architecture",
    "similarity_matrix",
    "steer",
    "sweep_k",
    "sweep_layers",
    "sweep_strength",
    "top_tokens",
    "zero_shot_scores",
]
