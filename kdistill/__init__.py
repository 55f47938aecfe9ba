"""kdistill: knowledge distillation toolkit.

A teacher (a model, an ensemble or an API) teaches a smaller student; kdistill trains it and measures what
the compression cost (quality retained, parameters, bytes, FLOPs, latency).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`kdistill.distill` (the one-call Python API, `kdistill.api`), imported on first use."""
    if name in ("distill", "DistillResult"):
        from kdistill import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdistill' has no attribute {name!r}")


__all__ = ["DistillResult", "distill"]
