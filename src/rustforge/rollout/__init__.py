"""Rollouts for RL: the GPT-OSS generation engine (KV cache with ring buffers, sinks, continuous batching,
CUDA graphs), sampling, the multi-turn tool driver, and an optional vLLM backend with the same interface."""

from rustforge.rollout.engine import Completion, EngineStats, RolloutEngine, SequenceState
from rustforge.rollout.sampling import SamplingParams

__all__ = ["Completion", "EngineStats", "RolloutEngine", "SamplingParams", "SequenceState"]
