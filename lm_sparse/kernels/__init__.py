"""Triton kernels for activation-sparse decoding, their plain-torch references and the decode backend.

- `sparse_gemv`: y = (x * (|x| > t)) @ W^T + bias from an input-major weight; torch ops
  `lm_sparse::sparse_linear` and `lm_sparse::sparse_linear_counted` (also the zero count per row), custom
  ops with fake implementations, so torch.compile fullgraph works.
- `threshold_mask`: the fused one-pass masking (and zero counting) of prefill inputs,
  `lm_sparse::threshold_mask_counted`.
- `backend.attach_decode_kernels`: registers the kernel as the engine's decode executor on CUDA (q/k/v and
  gate/up fused into one launch when they share the threshold).
- `decode.generate_static`: greedy generation with a static KV cache and a compiled decode step.

Importing this package does not import triton; the submodules do.
"""
