"""Re-key the shipped SmolLM2 thresholds files after the cache key's model identity gained fields.

The thresholds and measured results in a shipped file stay as they were calibrated; only `fields.model` (the
identity of the model they were calibrated for) and `key` are recomputed with the current
`identity.lm_model_identity`, the way `lm-sparse calibrate` and `sparse-hf` compute them. Before a file is
touched, the model on disk must be the one it names: its weight files must hash to the stored
`weights_sha256` under the formula that wrote it (v1: names, sizes and bytes in one sha256), or under the
current one; dtype, model type and layer count must match.

Why not calibrate again: CPU calibration is not bit-reproducible from run to run (float summation order
under multithreading moves PPL ratios in the third or fourth decimal), so a re-run can land on another CETT
and every figure measured with the shipped files would have to be measured again.

    python benchmarks/rekey_shipped_thresholds.py [--model smollm2] [--dry-run]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def weights_sha256_v1(directory: Path) -> str:
    """The weight hash of lm-sparse's first key format: one sha256 over each file's name, size and bytes."""
    from lm_sparse.identity import weight_files

    h = hashlib.sha256()
    for f in weight_files(directory):
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while block := fh.read(8 << 20):
                h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_sparse.identity import lm_model_identity
    from lm_sparse.models import resolve_pretrained
    from lm_sparse.thresholds import atomic_write, cache_key

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="the model the shipped files were calibrated for")
    parser.add_argument("--dir", default=str(REPO / "thresholds"), help="folder of the shipped files")
    parser.add_argument("--dry-run", action="store_true", help="print the new keys, write nothing")
    args = parser.parse_args(argv)

    directory = Path(resolve_pretrained(args.model))
    v1 = weights_sha256_v1(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))  # as `lm-sparse calibrate` loads it
    models: dict[str, torch.nn.Module] = {}
    for path in sorted(Path(args.dir).glob("*.json")):
        payload = json.loads(path.read_text(encoding="utf-8"))
        stored = payload["fields"]["model"]
        dtype = stored["dtype"]
        if dtype not in models:
            models[dtype] = AutoModelForCausalLM.from_pretrained(str(directory), dtype=getattr(torch, dtype)).eval()
        current = lm_model_identity(models[dtype], SimpleNamespace(pretrained=str(directory), revision=None), tokenizer)
        if stored.get("weights_sha256") not in (v1, current.get("weights_sha256")):
            print(f"{path.name}: calibrated for other weights ({stored.get('weights_sha256')}), left as it is")
            continue
        for name in ("model_type", "num_layers", "dtype"):
            if stored.get(name) != current.get(name):
                print(f"{path.name}: {name} {stored.get(name)!r} is not {current.get(name)!r}, left as it is")
                break
        else:
            fields = {**payload["fields"], "model": current}
            old_key, new_key = payload["key"], cache_key(fields)
            print(f"{path.name}: key {old_key[:16]} -> {new_key[:16]}")
            if not args.dry_run and new_key != old_key:
                payload.update(fields=fields, key=new_key)
                text = json.dumps(payload, indent=1, default=str) + "\n"  # as write_thresholds writes it
                atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
