"""Reports of measured sparsity: the short CLI summary (summary.py)."""
