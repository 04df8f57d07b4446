"""One compiled engine (``enforce_eager=False``, vLLM's default), one rank: the hooks and buffers are installed before
compilation, and each step only changes the buffers' contents."""

from __future__ import annotations

from typing import Any

import pytest
from engine_cases import Case, check_batch, make_engine, random_vector, require_vllm

require_vllm()
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def llm(request: pytest.FixtureRequest) -> Any:
    return make_engine(request, enforce_eager=False, max_num_batched_tokens=64, max_num_seqs=16)


def test_a_mixed_batch_matches_hugging_face(llm: Any) -> None:
    check_batch(llm)


def test_new_vectors_in_a_later_batch_reach_the_compiled_graph(llm: Any) -> None:
    d, e = random_vector(15, 4, 0.7), random_vector(25, 5, 0.6)
    cases = [
        Case("story", (d, (e, -1.0)), dict(strength=1.0)),
        Case("hot"),
        Case("capital", (e,), dict(strength=1.5, positions="all")),
        Case("long", (d,), dict(strength=1.0, normalize="relative")),
    ]
    check_batch(llm, cases)


def test_the_compile_cache_is_keyed_on_the_plugin(llm: Any) -> None:
    # An ahead-of-time artifact compiled without the hooks skips tracing when loaded: it must have another key.
    from vllm.compilation import caching

    factors = caching.aot_compile_hash_factors(llm.llm_engine.vllm_config)
    assert factors[-1].startswith("fv_plugin-steering-") and factors[-1].endswith("-columns-4-heads-40")
