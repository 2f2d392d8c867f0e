"""Graph room: periodic radius graphs and neighbour selection. Knows nothing of models."""

from mlcalc.graph.atomgraph import AtomGraph
from mlcalc.graph.neighbors import candidate_pairs, check_cell, radius_graph, select_neighbors

__all__ = ["AtomGraph", "candidate_pairs", "check_cell", "radius_graph", "select_neighbors"]
