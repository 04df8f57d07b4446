"""vLLM tests (tests/vllm): the environment every engine and server these tests start inherits.

Helpers live in ``engine_cases.py``: test modules here do not import from a ``conftest``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")  # a stale compiled graph must never hide the hooks
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # several ranks on one NUMA node cannot auto-bind

_MAIN: list[ModuleType] = []


def __getattr__(name: str) -> object:
    """pytest imports every ``conftest.py`` as the module ``conftest``. When this one was imported last (e.g.
    ``pytest tests/test_x.py tests/vllm``), the main tests' ``from conftest import ...`` lands here: answer with the
    main tests' conftest, loaded once under a name of its own."""
    if name.startswith(("__", "pytest_")):  # pytest's own probes: nothing to forward
        raise AttributeError(name)
    if not _MAIN:
        spec = importlib.util.spec_from_file_location(
            "fv_plugin_main_conftest", Path(__file__).parents[1] / "conftest.py"
        )
        if spec is None or spec.loader is None:
            raise AttributeError(name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MAIN.append(module)
    return getattr(_MAIN[0], name)
