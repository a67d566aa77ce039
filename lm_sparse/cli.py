"""`lm-sparse`: the command line.

    lm-sparse eval ...         lm_eval with sparse-hf registered (same arguments as lm_eval)
    lm-sparse calibrate ...    calibrate PPL-p% or TEAL thresholds into a file / the cache
    lm-sparse sweep ...        one lm-eval run per sparsity level plus the dense baseline
    lm-sparse report DIR ...   leaderboard table, HTML page and plots from results files
    lm-sparse check ...        CI gate: fail when accuracy drops or sparsity falls below a floor
    lm-sparse demo             the built-in demo on SmolLM2-135M-Instruct
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> "module:function"; each function takes argv (list[str]) and returns an exit code.
SUBCOMMANDS = {
    "eval": "lm_sparse.cli:eval_main",
    "calibrate": "lm_sparse.calibrate.cli:main",
    "sweep": "lm_sparse.report.sweep:main",
    "report": "lm_sparse.report.cli:main",
    "check": "lm_sparse.report.check:main",
    "demo": "lm_sparse.demo:main",
}


def eval_main(argv: list[str]) -> int:
    """Run lm-eval's own CLI with `sparse-hf` registered; argument errors print as one line."""
    from lm_eval.__main__ import cli_evaluate

    import lm_sparse  # noqa: F401  (registers sparse-hf)
    from lm_sparse.config import SparsityArgumentError
    from lm_sparse.engine.arch import UnsupportedArchitectureError

    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except (SparsityArgumentError, UnsupportedArchitectureError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    target = SUBCOMMANDS.get(name)
    if target is None:
        print(f"lm-sparse: unknown command {name!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module, _, func = target.partition(":")
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
