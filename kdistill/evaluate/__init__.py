"""Evaluation: quality (accuracy, agreement, calibration, retention) and cost (params, bytes, FLOPs, latency)."""

from kdistill.evaluate.cost import (cost_report, flops_per_sample, headline, latency_ms, measure_cost, param_count,
                                    round_ratio, static_cost, throughput, weight_bytes)
from kdistill.evaluate.quality import accuracy, agreement, expected_calibration_error, predict_logits, retention

__all__ = ["accuracy", "agreement", "cost_report", "expected_calibration_error", "flops_per_sample", "headline",
           "latency_ms", "measure_cost", "param_count", "predict_logits", "retention", "round_ratio", "static_cost",
           "throughput", "weight_bytes"]
