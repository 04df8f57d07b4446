"""Three tensor-parallel ranks (they divide SmolLM2's 9 query and 3 key/value heads), eager: every rank adds the same
vector to its copy of the residual stream. Eager, because the compiled path is the same per rank and is covered on
one rank (test_engine_compiled.py), while a compiled three-rank start-up costs about 4 minutes here."""

from __future__ import annotations

from typing import Any

import pytest
from engine_cases import check_batch, make_engine, require_vllm

require_vllm()
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def llm(request: pytest.FixtureRequest) -> Any:
    # each rank reserves its own KV cache (a share of the machine's RAM): keep the three small on a shared machine
    return make_engine(request, enforce_eager=True, tensor_parallel_size=3, max_num_seqs=16, gpu_memory_utilization=0.1)


def test_a_mixed_batch_matches_hugging_face_on_three_ranks(llm: Any) -> None:
    check_batch(llm)
