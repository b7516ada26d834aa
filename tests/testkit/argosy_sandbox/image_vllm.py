"""The `vllm` program of the vLLM image inside the sandbox: ``python -m argosy_sandbox.image_vllm ARGS``.

A group pod's container runs a shell script that calls ``vllm serve "$@" --node-rank R``
(operator/argosy_operator/group_builders.py). The pod runner puts a `vllm` first on that
script's PATH that execs this module, which replaces itself (same process id, so the
container's main process stays the server) with what stands in for the image's vLLM: the
CPU runtime's `vllm serve` on the stand-in model, or the vLLM simulator. What is changed
is decided in kubelet_plan.image_vllm_exec and written to the container's log.
"""

from __future__ import annotations

import os
import sys

from . import kubelet_plan as plan


def main(argv: list[str]) -> int:
    try:
        image = plan.ImageVllm.from_env(os.environ)
        launch = plan.image_vllm_exec(argv, image)
    except plan.ContainerConfigError as error:
        print(f"sandbox: vllm: {error}", file=sys.stderr)
        return 2
    for note in launch.substitutions:
        print(f"sandbox: {note}", file=sys.stderr)
    print(f"sandbox: exec {' '.join(launch.args)}", file=sys.stderr, flush=True)
    os.execv(launch.args[0], launch.args)
    return 127  # not reached: execv replaces this process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
