"""Planner: feasibility of a candidate (constraints) and the candidate search (search)."""

from app.engine.planner.constraints import check, cost_reasons, never_worse_reasons, violation

__all__ = ["check", "cost_reasons", "never_worse_reasons", "violation"]
