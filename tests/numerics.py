"""Tolerances derived from floating-point arithmetic, for tests that compare two runs of one computation.

Two runs that sum the same terms in another order (a batch split over ranks, a compiled graph,
another CPU's kernels) differ by rounding. Standard bounds (Higham, *Accuracy and Stability of
Numerical Algorithms*, ch. 4): with unit roundoff ``u``, a sum of ``N`` terms is off by at most
``N u`` times the sum of their magnitudes.

Training amplifies that difference. AdamW divides every gradient element by its own running RMS,
so its step ``lr * m / (sqrt(v) + eps)`` changes by up to ``lr / eps`` per unit change of the
gradient element. In float32 (``u = 6e-8``) a gradient element within rounding of zero can then
move a weight by up to ``lr`` on noise alone, so no weight tolerance below ``lr`` holds on every
CPU. In float64 (``u = 1.1e-16``) the same bound is ``updates * lr * N u / eps``: about 1e-7 for a
few updates at ``lr = 1e-3`` and ``N = 2048``, four orders below one real update. Runs compared
weight for weight therefore train in float64 (:func:`default_dtype`; the trainers follow torch's
default dtype), with these bounds as tolerances.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

#: torch.optim.AdamW's default ``eps``, which the trainers use.
ADAM_EPS = 1e-8


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2``: the largest relative error of one rounding."""
    return torch.finfo(dtype).eps / 2


def sum_rtol(terms: int, dtype: torch.dtype) -> float:
    """Relative difference of two orders of a sum of ``terms`` terms of one sign: ``N u``."""
    return terms * unit_roundoff(dtype)


def adam_weight_atol(
    updates: int, lr: float, terms: int, dtype: torch.dtype, *, grad_bound: float = 1.0, eps: float = ADAM_EPS
) -> float:
    """How far AdamW weights of two runs can drift apart after ``updates`` steps from equal weights.

    terms: length of the longest reduction in a gradient (a convolution's weight gradient sums
        batch * H * W terms). grad_bound: the largest gradient element (clipping to norm ``c``
        bounds every element by ``c``). Each update moves a weight by at most ``lr / eps`` times
        the gradient's error ``N u grad_bound``.
    """
    return updates * lr * sum_rtol(terms, dtype) * grad_bound / eps


def loss_atol(loss: float, grad_norm: float, parameters: int, weight_atol: float, terms: int, dtype) -> float:
    """How far a logged loss of two runs can differ: its own rounding plus what the weights' drift
    moves it by (``|dL| <= |grad|_1 |dw|_inf <= sqrt(P) |grad|_2 |dw|_inf``)."""
    return sum_rtol(terms, dtype) * abs(loss) + math.sqrt(parameters) * grad_norm * weight_atol


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype, threads: int | None = None) -> Iterator[None]:
    """Run the block with torch's default dtype (and optionally its thread count) set, then restore."""
    old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(dtype)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_default_dtype(old_dtype)
        torch.set_num_threads(old_threads)
