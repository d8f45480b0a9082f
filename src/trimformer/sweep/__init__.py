"""Sweeps: a grid of recipes, each cell pruned and evaluated (local processes or Ray), one frontier report.

    grid = trimformer.sweep.Grid.from_file("grid.yaml")
    summary = trimformer.sweep.run(grid, "sweeps/wanda")         # ray="auto" or an address: a Ray cluster
"""

from .driver import frontier, run
from .execute import run_cell
from .grid import Cell, Grid, RunOptions

__all__ = ["Cell", "Grid", "RunOptions", "frontier", "run", "run_cell"]
