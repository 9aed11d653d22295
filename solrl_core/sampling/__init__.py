"""Seeded noise and flow-matching ODE solvers (Euler, DPM-Solver-2)."""
from ..models.base import seeded_noise
from .sample import sample
from .solvers import SOLVERS, dpm2, euler, get_solver

__all__ = ["SOLVERS", "dpm2", "euler", "get_solver", "sample", "seeded_noise"]
