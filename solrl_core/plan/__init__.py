"""Memory plans: peak accelerator memory of one Sol-RL iteration from configs alone (no weights)."""
from .memory import GIB, IterationShape, MemoryPlan, MemorySettings, plan_memory

__all__ = ["GIB", "IterationShape", "MemoryPlan", "MemorySettings", "plan_memory"]
