"""kdistill: knowledge distillation toolkit.

A teacher (a model, an ensemble or an API) teaches a smaller student; kdistill trains it and measures what
the compression cost (quality retained, parameters, bytes, FLOPs, latency).
"""

__version__ = "0.1.0"
