"""Core attention disaggregation (CAD): attention tasks planned onto ranks acting as servers.

`plan(doc_lens, tokens_per_rank, mask, epsilon=...)` is the pure planner; `CAD` is the
context-parallel strategy registered as "cad" in `parallel.build`.
"""
from .planner import Plan, plan
from .strategy import CAD
from .tasks import MaskKind, Task

__all__ = ["CAD", "MaskKind", "Plan", "Task", "plan"]
