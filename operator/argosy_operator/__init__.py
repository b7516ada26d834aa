"""Argosy operator: sizes LLMDeployments from the cluster's GPUs and runs them with vLLM."""
