"""Random projections that keep pairwise distances without materialising large gradients.

``KroneckerSketch`` projects vectors of the form e ⊗ h (the last-layer gradient) with a matrix A ⊗ B,
using (A ⊗ B)(e ⊗ h) = (A e) ⊗ (B h), so the C·(d+1) outer product is never built.
``CountSketch`` hashes each coordinate of an arbitrary vector into one of m signed buckets.
Both are linear maps with E‖Sx‖² = ‖x‖²; the relative error of a squared distance shrinks like
sqrt(2/m) (tested in tests/test_sketch.py).
"""

from __future__ import annotations

import torch


class KroneckerSketch:
    """Project ``e ⊗ h`` (e: ``[B, C]``, h: ``[B, H]``) to ``out_dim`` coordinates.

    When C is small the class factor is kept exact (A = I) and only h is projected, which keeps
    the class structure of the gradient intact; otherwise both factors are projected.

    Example:
        >>> sketch = KroneckerSketch(num_classes=10, feature_dim=513, out_dim=1000, seed=0)
        >>> sketch(torch.rand(4, 10), torch.rand(4, 513)).shape
        torch.Size([4, 1000])
    """

    def __init__(self, num_classes: int, feature_dim: int, out_dim: int, seed: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if out_dim < 1:
            raise ValueError("out_dim must be positive")
        gen = torch.Generator().manual_seed(seed)
        if num_classes * 16 <= out_dim:
            self.class_proj = None
            m_class = num_classes
        else:
            m_class = max(1, int(out_dim**0.5))
            self.class_proj = (torch.randn(m_class, num_classes, generator=gen, dtype=torch.float64)
                               / m_class**0.5).to(device, dtype)
        m_feat = max(1, out_dim // m_class)
        self.feature_proj = (torch.randn(m_feat, feature_dim, generator=gen, dtype=torch.float64)
                             / m_feat**0.5).to(device, dtype)
        self.out_dim = m_class * m_feat

    def __call__(self, e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        a = e if self.class_proj is None else e @ self.class_proj.T.to(e.dtype)
        b = h @ self.feature_proj.T.to(h.dtype)
        return (a[:, :, None] * b[:, None, :]).reshape(len(e), -1)


class CountSketch:
    """Signed hashing of ``dim`` coordinates into ``out_dim`` buckets (seeded, O(dim) memory).

    Example:
        >>> sketch = CountSketch(dim=10_000, out_dim=256, seed=0)
        >>> sketch(torch.rand(3, 10_000)).shape
        torch.Size([3, 256])
    """

    def __init__(self, dim: int, out_dim: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        gen = torch.Generator().manual_seed(seed)
        self.bucket = torch.randint(0, out_dim, (dim,), generator=gen).to(device)
        self.sign = (torch.randint(0, 2, (dim,), generator=gen) * 2 - 1).to(device)
        self.out_dim = out_dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.out_dim, dtype=x.dtype, device=x.device)
        return out.index_add_(1, self.bucket, x * self.sign.to(x.dtype))
