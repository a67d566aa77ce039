"""The sparsity engine: architecture table (arch), rules, hooks (engine) and exact accounting."""

from .accounting import SparsityCounter
from .arch import ARCHITECTURES, Site, UnsupportedArchitectureError, resolve_sites
from .engine import SparsityEngine
from .rules import CountOnly, OnGateScore, Rule, Threshold, TopK

__all__ = ["ARCHITECTURES", "CountOnly", "OnGateScore", "Rule", "Site", "SparsityCounter", "SparsityEngine",
           "Threshold", "TopK", "UnsupportedArchitectureError", "resolve_sites"]
