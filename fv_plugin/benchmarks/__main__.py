"""``python -m fv_plugin.benchmarks overhead|extract|quality|quant|vllm ...`` (the same as ``fv bench ...``)."""

from fv_plugin.benchmarks import main

raise SystemExit(main())
