"""Time relative-contribution computation against a plain conv forward.

For one batch of 32 inputs on a 64->64, 3x3, padding-1 conv over 32x32 maps, times
(a) the plain conv forward (float32), (b) ``conv2d_contribution`` (float64) and (c) a naive
method that unfolds the input and materialises every per-position, per-(q, p) product
(float64), then prints b/a and c/b. Run: ``python benchmarks/contribution_speed.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modellego.analysis.contribution import conv2d_contribution


def naive_unfold_contribution(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    x = x.double()
    w = conv.weight.detach().double()
    q, p, kh, kw = w.shape
    cols = F.unfold(x, (kh, kw), conv.dilation, conv.padding, conv.stride)  # (B, P*K, L)
    cols = cols.reshape(x.shape[0], p, kh * kw, -1)
    products = torch.einsum("qpk,bpkl->bqpl", w.reshape(q, p, kh * kw), cols)
    return products.sum(-1)


def best_time(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(32, 64, 32, 32)
    with torch.inference_mode():
        fast = conv2d_contribution(x, conv)
        naive = naive_unfold_contribution(x, conv)
        torch.testing.assert_close(fast, naive, rtol=1e-6, atol=1e-8)
        t_conv = best_time(lambda: conv(x))
        t_fast = best_time(lambda: conv2d_contribution(x, conv))
        t_naive = best_time(lambda: naive_unfold_contribution(x, conv), repeats=3)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"(a) conv forward (float32):          {t_conv * 1e3:9.2f} ms")
    print(f"(b) conv2d_contribution (float64):   {t_fast * 1e3:9.2f} ms")
    print(f"(c) naive unfold (float64):          {t_naive * 1e3:9.2f} ms")
    print(f"b/a = {t_fast / t_conv:.2f}   c/b = {t_naive / t_fast:.1f}")


if __name__ == "__main__":
    main()
