"""Calibrated sparsity: calibration text (`data`), PPL-p% thresholds (`pplp`), perplexity (`ppl`), CLI (`cli`).

The threshold cache both calibrated methods share lives in `lm_sparse.thresholds`.
"""
