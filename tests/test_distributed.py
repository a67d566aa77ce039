"""Counts reduce over ranks: two gloo CPU processes end with the totals one process computes over all inputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import make_tiny_model
from lm_sparse.engine import SparsityCounter, SparsityEngine, TopK

WORLD = 2


def _rank_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different inputs per rank, left-padded with an attention mask (padding must not count either)."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(3, 128, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : rank + 1] = 0
    ids[mask == 0] = 0
    return ids, mask


def _engine_for(model) -> SparsityEngine:
    engine = SparsityEngine(model, pad_token_id=0)
    engine.set_rules({s.index: TopK(0.25, s.in_features) for s in engine.sites_named("down", "o")})
    return engine


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A file store, not TCP: no free-port race, and no store server living in rank 0 that can exit while
    # rank 1 still talks to it (CI once saw rank 1 abort with "terminate called without an active exception").
    store = Path(out_dir, "store").as_uri()
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD)
    try:
        counter = SparsityCounter([4, 8])
        # rank r: site 0 sees 2 tokens with (r + 1) zeros each; site 1 one token with 3r zeros (decode)
        counter.commit(0, {0: torch.full((1, 2), rank + 1)}, None)
        counter.commit(1, {1: torch.tensor([[3 * rank]])}, None)
        counter.synchronize()
        zeros, entries, tokens = counter.totals()

        model = make_tiny_model("llama_relu")
        engine = _engine_for(model)
        ids, mask = _rank_inputs(rank)
        with torch.no_grad(), engine.attached():
            model(input_ids=ids, attention_mask=mask)
        engine.counter.synchronize()
        result = {"zeros": zeros.tolist(), "entries": entries.tolist(), "tokens": tokens.tolist(),
                  "report": engine.report()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # neither rank tears gloo down while the other is still inside a collective
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_end_with_the_global_totals(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    # Counter alone: both ranks hold the sum.
    for res in results:
        assert res["zeros"] == [[2 * 1 + 2 * 2, 0], [0, 0 + 3]]
        assert res["tokens"] == [4, 2]
        assert res["entries"] == [[4 * 4, 0], [0, 2 * 8]]

    # Engine: the union of both ranks' inputs, counted in this one process.
    model = make_tiny_model("llama_relu")
    engine = _engine_for(model)
    for rank in range(WORLD):
        ids, mask = _rank_inputs(rank)
        with torch.no_grad(), engine.attached():
            model(input_ids=ids, attention_mask=mask)
    engine.counter.synchronize()
    expected = json.loads(json.dumps(engine.report()))
    assert expected["tokens"] == WORLD * 12 - 1 - 2  # rank r pads r + 1 positions
    assert results[0]["report"] == results[1]["report"] == expected
