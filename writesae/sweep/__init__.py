"""Sweeps: a grid of WriteSAE trainings (layers, heads, families, sizes, seeds, input scaling) run
once each, spread over the processes ``torchrun`` starts, resumable cell by cell, with one results
table and its plots. ``writesae sweep GRID`` is the command; see `writesae.sweep.grid` for the file."""

from writesae.sweep.grid import SweepCell, SweepGrid, load_grid
from writesae.sweep.runner import SweepResult, run_sweep, train_cell

__all__ = ["SweepCell", "SweepGrid", "SweepResult", "load_grid", "run_sweep", "train_cell"]
