"""Training loop, evaluation, feature cache and checkpoints."""
from .evaluate import METRICS, retrieval_metrics

__all__ = ["METRICS", "retrieval_metrics"]
