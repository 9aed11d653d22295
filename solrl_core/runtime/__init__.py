"""The floor under the engine: what every layer above may use, and which imports nothing above it.

context:     what a running op may ask of its host (run directory, progress, interruption, folders)
files:       atomic writes and checks of the run directory
distributed: torch.distributed helpers (process index, sums, gathers)
extras:      optional packages (pyproject extras): installed or not, and how to add them
"""
