"""A vLLM OpenAI-server simulator: test and benchmark equipment for Argosy (not product)."""

from argosy_vllm_sim.server import SimConfig, SimServer, build_app

__all__ = ["SimConfig", "SimServer", "build_app"]
