"""Benchmarks: attention variants trained at equal budget (``masa bench train``), and reporting helpers.

``masa.bench.command`` (the ``masa bench`` CLI) and ``masa.bench.train_suite`` (which imports the
trainer) are not imported here, so that the reporting helpers stay light to import.
"""

from masa.bench.report import Point, curve_plot, fmt_mean_std, markdown_table, mean_std, scatter_plot

__all__ = ["Point", "curve_plot", "fmt_mean_std", "markdown_table", "mean_std", "scatter_plot"]
