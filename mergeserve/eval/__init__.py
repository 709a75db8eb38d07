"""Merge-quality evaluation: held-out loss per domain, math exact match, a mixed set, an oracle row.

`mergeserve eval --spec FILE [--spec FILE ...] [--oracle] --out DIR` runs it; see harness.py
for what is measured and report.py for what is written.
"""

from mergeserve.eval.datasets import EvalData, load_eval_data
from mergeserve.eval.harness import evaluate, evaluate_engine, evaluate_specs, oracle_row
from mergeserve.eval.results import EvalResults, ModelScores, Row
from mergeserve.eval.scoring import EvalSettings

__all__ = ["EvalData", "EvalResults", "EvalSettings", "ModelScores", "Row", "evaluate", "evaluate_engine", "evaluate_specs",
           "load_eval_data", "oracle_row"]
