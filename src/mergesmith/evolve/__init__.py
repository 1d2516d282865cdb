"""`mergesmith evolve`: search for the merge recipe instead of guessing it (evolutionary model merging, Sakana AI,
arXiv 2403.13187; mergekit-evolve's configuration and options).

A genome (mergesmith.evolve.genome) maps a vector of per-layer-group weights and densities to a recipe; a strategy
(CMA-ES, random or grid) proposes vectors; workers (this process or Ray actors) merge each candidate in memory and
score it on the tasks' search split; the journal keeps every score, so a search survives a crash; the best recipe
is written as STORAGE/best.yml. See docs/evolve.md.
"""

from mergesmith.evolve.search import EvolveOptions, run_evolve

__all__ = ["EvolveOptions", "run_evolve"]
