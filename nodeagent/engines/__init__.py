"""Inference engines the agent runs: `vllm` (a supervised subprocess) and `sim` (simulated)."""
