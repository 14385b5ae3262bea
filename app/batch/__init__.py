"""Batch runs: a graph swept over param values, each job one headless run, on worker processes
here (`local`) or on a Ray cluster; a manifest to resume, results.json and a contact sheet.

No Qt; torch and Ray are imported only by the workers and the Ray backend.
"""

from .runner import BatchError, BatchPlan, BatchResult, plan_batch, run_batch
from .sweep import Axis, Sweep, SweepError, parse_axis

__all__ = ["Axis", "BatchError", "BatchPlan", "BatchResult", "Sweep", "SweepError", "parse_axis",
           "plan_batch", "run_batch"]
