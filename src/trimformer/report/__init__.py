"""Report pages: plots over one or several saved reports (report.json)."""

from .plots import frontier, layer_sparsity, write_report

__all__ = ["frontier", "layer_sparsity", "write_report"]
