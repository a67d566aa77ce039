"""Exact sparsity accounting: zeroed entries of every sparsified tensor, over real tokens only.

Hooks record, per site, the number of zero entries of each token ([B, T] integer tensors); one forward
pass's records are committed with a validity mask of the same shape, so padding never counts. When the
validity is only known later (lm-eval's loglikelihood batches are right-padded with token id 0 and their
row lengths are only seen row by row), the records stay pending and are committed one row at a time.

Counts live on the model's device as int64 tensors and are added without host synchronisation. Under
data parallelism each rank counts its own tokens; `synchronize()` all-reduces what was added since the
last call, so every rank ends with the global totals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PHASES = ("prefill", "decode")


@dataclass
class _Pending:
    phase: int
    zeros: torch.Tensor  # [S_active, B, T]
    site_index: torch.Tensor  # [S_active] indices into the site list
    next_row: int = 0


class SparsityCounter:
    """Zero counts and entry totals per (phase, site), plus real-token counts per phase."""

    def __init__(self, widths: list[int], device: torch.device | str = "cpu"):
        self.widths = torch.tensor(widths, dtype=torch.int64)
        self.num_sites = len(widths)
        self.device = torch.device(device)
        self._local_zeros = torch.zeros(2, self.num_sites, dtype=torch.int64, device=self.device)
        self._local_tokens = torch.zeros(2, self.num_sites, dtype=torch.int64, device=self.device)
        self._local_step_tokens = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.zeros = torch.zeros_like(self._local_zeros)  # synchronized totals
        self.tokens = torch.zeros_like(self._local_tokens)  # tokens seen by each site
        self.step_tokens = torch.zeros_like(self._local_step_tokens)  # tokens through the model
        self._pending: _Pending | None = None
        if self.device.type == "cuda":
            # A compiled decode step adds to these in place; fixed addresses let CUDA graphs keep them.
            for t in (self._local_zeros, self._local_tokens, self._local_step_tokens):
                torch._dynamo.mark_static_address(t)

    # -- recording -----------------------------------------------------------------------------------
    def commit(self, phase: int, zeros: dict[int, torch.Tensor], valid: torch.Tensor | None) -> None:
        """Add one forward pass. `zeros[site] ` is [B, T] zero counts; `valid` is a [B, T] bool mask or None."""
        if not zeros:
            return
        idx, stacked = self._stack(zeros)
        if valid is None:
            per_site = stacked.sum(dim=(1, 2))
            ntok = stacked.shape[1] * stacked.shape[2]
            self._local_tokens[phase].index_add_(0, idx, torch.full_like(per_site, ntok))
            self._local_step_tokens[phase] += ntok
        else:
            valid = valid.to(device=self.device, dtype=torch.int64)
            per_site = (stacked * valid).sum(dim=(1, 2))
            ntok = valid.sum()
            self._local_tokens[phase].index_add_(0, idx, ntok.expand_as(per_site).contiguous())
            self._local_step_tokens[phase] += ntok
        self._local_zeros[phase].index_add_(0, idx, per_site)

    def defer(self, phase: int, zeros: dict[int, torch.Tensor]) -> None:
        """Keep one forward pass's records until its rows' real lengths are known (`commit_row`)."""
        self.flush_pending()
        if zeros:
            idx, stacked = self._stack(zeros)
            self._pending = _Pending(phase, stacked, idx)

    def commit_row(self, length: int) -> None:
        """Commit the next pending row, counting its first `length` positions."""
        p = self._pending
        if p is None:
            return
        row = p.zeros[:, p.next_row, :length].sum(dim=1)
        self._local_zeros[p.phase].index_add_(0, p.site_index, row)
        self._local_tokens[p.phase].index_add_(0, p.site_index, torch.full_like(row, length))
        self._local_step_tokens[p.phase] += length
        p.next_row += 1
        if p.next_row >= p.zeros.shape[1]:
            self._pending = None

    def flush_pending(self) -> None:
        """Commit whatever rows were never claimed, counting all their positions."""
        p = self._pending
        if p is None:
            return
        self._pending = None
        length = p.zeros.shape[2]
        rest = p.zeros[:, p.next_row :, :]
        if rest.shape[1]:
            self._local_zeros[p.phase].index_add_(0, p.site_index, rest.sum(dim=(1, 2)))
            n = rest.shape[1] * length
            self._local_tokens[p.phase].index_add_(0, p.site_index, torch.full_like(p.site_index, n))
            self._local_step_tokens[p.phase] += n

    def _stack(self, zeros: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        keys = sorted(zeros)
        idx = torch.tensor(keys, dtype=torch.int64, device=self.device)
        stacked = torch.stack([zeros[k].to(self.device, torch.int64) for k in keys])
        return idx, stacked

    # -- reduction -----------------------------------------------------------------------------------
    def synchronize(self, distributed: bool | None = None) -> None:
        """Fold local counts into the totals, summed over all ranks.

        `distributed=None` reduces whenever torch.distributed runs with several ranks; the LM passes
        False when its ranks evaluate independently (each then reports only what it ran itself).
        """
        self.flush_pending()
        local = torch.cat([self._local_zeros.flatten(), self._local_tokens.flatten(), self._local_step_tokens])
        dist = torch.distributed
        running = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if running if distributed is None else (distributed and running):
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
        n = self._local_zeros.numel()
        self.zeros += local[:n].view_as(self.zeros)
        self.tokens += local[n : 2 * n].view_as(self.tokens)
        self.step_tokens += local[2 * n :]
        self._local_zeros.zero_()
        self._local_tokens.zero_()
        self._local_step_tokens.zero_()

    def reset(self) -> None:
        for t in (self._local_zeros, self._local_tokens, self._local_step_tokens, self.zeros, self.tokens,
                  self.step_tokens):
            t.zero_()
        self._pending = None

    # -- reading -------------------------------------------------------------------------------------
    def totals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(zeros [2, S], entries [2, S], tokens [2]) on the CPU, synchronized totals only."""
        zeros = self.zeros.cpu()
        entries = self.tokens.cpu() * self.widths
        return zeros, entries, self.step_tokens.cpu()
