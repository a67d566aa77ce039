"""From a validated `SparsityConfig` to per-site rules on a loaded model.

Top-k and FAT-epsilon need nothing but the model. PPL-p% and TEAL calibrate (or load cached thresholds)
in `lm_sparse.calibrate`; they receive the engine, the tokenizer and the config, and return their rules and
a JSON-able description of the calibration that lands in the results file.
"""

from __future__ import annotations

from typing import Any

from .config import SparsityArgumentError, SparsityConfig
from .engine.arch import is_relu_family
from .engine.engine import SparsityEngine
from .engine.rules import OnGateScore, Rule, Threshold, TopK


def build_rules(engine: SparsityEngine, config: SparsityConfig, tokenizer: Any = None,
                rank_context: Any = None) -> tuple[dict[int, Rule], dict[str, Any] | None]:
    """Return ({site index: rule}, calibration info or None) for `config` on `engine`'s model."""
    ffn_mid = engine.sites_in_groups("mlp_mid")
    # Top-k and FAT choose neurons by their gate score act(gate(x)), as Sparsing Law's reference code does.
    if config.rule == "topk":
        level = float(config.level)
        return {s.index: OnGateScore(TopK(level, s.in_features), 1.0 - level) for s in ffn_mid}, None
    if config.rule == "fat":
        return {s.index: OnGateScore(Threshold(float(config.level))) for s in ffn_mid}, None
    if config.rule in ("pplp", "teal") and config.thresholds is None and \
            any(p.is_meta for p in engine.model.parameters()):
        # accelerate's disk offload leaves weights on the meta device, where calibration cannot read them
        raise SparsityArgumentError(
            f"sparse-hf: calibrating {config.rule} needs every weight in memory, and some are offloaded "
            "(offload_folder=/max_cpu_memory=): drop the offload, pass thresholds=FILE, or use topk=K or fat=EPS")
    if config.rule == "pplp":
        from .calibrate.pplp import build_pplp_rules

        return build_pplp_rules(engine, config, tokenizer, rank_context)
    if config.rule == "teal":
        from .calibrate.teal import build_teal_rules

        return build_teal_rules(engine, config, tokenizer, rank_context)
    # Dense: count the FFN intermediate's natural zeros (exact zeros of ReLU-family FFNs), change nothing.
    engine.count_natural_zeros()
    return dict(engine.rules), None


def describe_method(config: SparsityConfig, engine: SparsityEngine) -> str:
    """A short human name for the method, for tables: 'topk=0.5', 'ppl_p=1', 'dense (relu)', ...

    Settings that change what is measured are appended when not the default ('teal=0.5,teal_mode=uniform',
    'topk=0.5,sparse_prefill=last_half'), so the report keeps such runs apart.
    """
    if config.rule == "dense":
        return f"dense ({engine.activation})" if is_relu_family(engine.model.config) else "dense"
    if config.rule == "pplp":
        name = f"ppl_p={config.level:g}"
    elif config.rule == "teal" and config.method == "teal":
        name = f"teal ppl_p={config.level:g}"
    else:
        name = f"{config.rule}={config.level:g}"
    if config.rule == "teal" and config.teal_mode != SparsityConfig.teal_mode:
        name += f",teal_mode={config.teal_mode}"
    if config.sparse_prefill != SparsityConfig.sparse_prefill:
        name += f",sparse_prefill={config.sparse_prefill}"
    return name
