"""Analyzer: the geometry of any weight delta (full fine-tune, sparse delta, LoRA), precision-aware, with nulls."""

from .delta_overlap import delta_overlap, overlap_markdown
from .report import DeltaReport, analyze_delta, analyze_matrix
from .sources import AdapterDeltas, CheckpointPair, open_source

__all__ = ["AdapterDeltas", "CheckpointPair", "DeltaReport", "analyze_delta", "analyze_matrix", "delta_overlap",
           "open_source",
           "overlap_markdown"]
