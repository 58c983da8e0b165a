"""The fair-comparison protocol: Optuna search with exact budgets, reproductions, reports and plots."""
from .report import EMBEDDINGS, METRICS, compare, read_report_csv, summarize, write_report

__all__ = ["EMBEDDINGS", "METRICS", "compare", "read_report_csv", "summarize", "write_report"]
