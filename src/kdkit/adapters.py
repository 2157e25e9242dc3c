"""Adapters: learned maps from a student feature to the teacher feature's shape.

Feature losses (FitNets' hint loss, Romero et al. 2015; Patient-KD; TinyBERT) compare tensors of
different widths. The adapter sits on the student side (student -> teacher shape): projecting
the teacher instead would let both sides shrink towards a trivial match. Build adapters from
probed shapes::

    s = probe_shapes(student, ["layer3"], x)["layer3"]
    t = probe_shapes(teacher, ["layer3"], x)["layer3"]
    adapter = build_adapter("auto", s, t, student_name="layer3", teacher_name="layer3")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.capture import probe_shapes

__all__ = [
    "ADAPTER_KINDS",
    "Conv1x1Adapter",
    "LinearAdapter",
    "build_adapter",
    "probe_shapes",
]

ADAPTER_KINDS = ("identity", "linear", "conv", "auto")

AdapterKind = Literal["identity", "linear", "conv", "auto"]


class LinearAdapter(nn.Module):
    """``nn.Linear`` over one feature dim: the last dim for ``[B, D]`` / ``[B, L, D]``, the
    channel dim 1 for ``[B, C, H, W]``; optional ``LayerNorm`` over the output features."""

    def __init__(self, in_features: int, out_features: int, *, dim: int = -1, norm: bool = False):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(in_features, out_features)
        self.norm = nn.LayerNorm(out_features) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.dim in (-1, x.dim() - 1):
            return self.norm(self.proj(x))
        y = self.norm(self.proj(x.movedim(self.dim, -1)))
        return y.movedim(-1, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Conv1x1Adapter(nn.Module):
    """Resize a ``[B, C, H, W]`` map to the teacher's ``(H, W)``, then a 1x1 conv (+ BatchNorm).

    Spatial resizing: a student map at least as large as the teacher's on both axes is reduced
    by adaptive average pooling (each output cell averages the region it covers, so nothing is
    dropped); a map smaller on any axis is enlarged by bilinear interpolation
    (``align_corners=False``), since pooling to a larger size only repeats cells.
    ``out_channels=None`` skips the conv (used by ``"auto"`` when only the spatial size differs).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None,
        *,
        in_size: tuple[int, int] | None = None,
        out_size: tuple[int, int] | None = None,
        norm: bool = False,
    ):
        super().__init__()
        self.out_size = tuple(out_size) if out_size is not None else None
        self.resize: str | None = None
        if out_size is not None and in_size is not None and tuple(in_size) != tuple(out_size):
            larger = in_size[0] >= out_size[0] and in_size[1] >= out_size[1]
            self.resize = "pool" if larger else "interpolate"
        if out_channels is None:
            self.conv: nn.Module = nn.Identity()
            self.norm: nn.Module = nn.Identity()
        else:
            # BatchNorm's shift makes a conv bias redundant
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=not norm)
            self.norm = nn.BatchNorm2d(out_channels) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.resize == "pool":
            x = F.adaptive_avg_pool2d(x, self.out_size)
        elif self.resize == "interpolate":
            x = F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)
        return self.norm(self.conv(x))

    def extra_repr(self) -> str:
        return f"resize={self.resize}, out_size={self.out_size}"


def _fail(kind: str, s: tuple, t: tuple, student_name: str, teacher_name: str, why: str):
    return ValueError(
        f"cannot build a '{kind}' adapter from student layer '{student_name}' with shape {s} "
        f"to teacher layer '{teacher_name}' with shape {t}: {why}. Allowed kinds: "
        f"{', '.join(ADAPTER_KINDS)} (identity: equal shapes; linear: [B, D] / [B, L, D] differing "
        f"in D, or [B, C, H, W] differing in C; conv: [B, C, H, W] with any C, H, W). Pick "
        f"layers whose shapes agree apart from the feature/channel dim, or adapt by hand."
    )


def build_adapter(
    kind: AdapterKind,
    student_shape: Sequence[int],
    teacher_shape: Sequence[int],
    *,
    student_name: str,
    teacher_name: str,
    norm: bool = False,
) -> nn.Module:
    """Build a module mapping a student feature of ``student_shape`` to ``teacher_shape``.

    Shapes are full tensor shapes including the batch dim (``[B, D]``, ``[B, L, D]``,
    ``[B, C, H, W]``); the batch size is only checked for agreement.

    * ``"identity"``: ``nn.Identity``; the shapes must be equal. ``norm`` is ignored.
    * ``"linear"``: :class:`LinearAdapter` over the last dim for rank 2/3, over the channel dim
      for rank 4 with equal ``H, W``. ``norm=True`` adds a ``LayerNorm`` over the teacher dim.
    * ``"conv"``: :class:`Conv1x1Adapter` for rank 4: spatial resize to the teacher's
      ``(H, W)`` if needed (pool when shrinking, bilinear when enlarging), then a 1x1 conv,
      plus ``BatchNorm2d`` when ``norm=True``.
    * ``"auto"``: identity if the shapes are equal; linear when only the last dim of a rank-2/3
      shape differs; for rank 4, a :class:`Conv1x1Adapter` whose conv is present only when the
      channels differ.

    Raises:
        ValueError: unknown kind, or a mismatch the kind cannot bridge (different ranks, batch
            or sequence length, spatial size for ``"linear"``, any difference for
            ``"identity"``); the message names both layers and both shapes.
    """
    if kind not in ADAPTER_KINDS:
        raise ValueError(
            f"adapter kind must be one of {list(ADAPTER_KINDS)}, got {kind!r} "
            f"(for student layer '{student_name}' -> teacher layer '{teacher_name}')"
        )
    s, t = tuple(int(d) for d in student_shape), tuple(int(d) for d in teacher_shape)
    requested = kind

    def fail(why: str) -> ValueError:
        return _fail(requested, s, t, student_name, teacher_name, why)

    if len(s) != len(t):
        raise fail(f"ranks differ ({len(s)} vs {len(t)})")
    if len(s) < 2:
        raise fail("features need a batch dim and at least one feature dim")
    if s[0] != t[0]:
        raise fail(f"batch sizes differ ({s[0]} vs {t[0]}); probe both with the same input")

    if kind == "auto":
        if s == t:
            return nn.Identity()
        if len(s) == 4:
            return _conv(s, t, norm, channels_optional=True)
        kind = "linear"

    if kind == "identity":
        if s != t:
            raise fail("identity needs equal shapes")
        return nn.Identity()

    if kind == "linear":
        if len(s) in (2, 3):
            if s[:-1] != t[:-1]:
                raise fail(f"all dims but the last must match (sequence length {s[1]} vs {t[1]})")
            return LinearAdapter(s[-1], t[-1], dim=-1, norm=norm)
        if len(s) == 4:
            if s[2:] != t[2:]:
                raise fail(
                    f"linear maps channels only; spatial sizes differ ({s[2:]} vs {t[2:]}); "
                    f"use kind='conv', which also resizes"
                )
            return LinearAdapter(s[1], t[1], dim=1, norm=norm)
        raise fail(f"linear supports rank 2, 3 or 4 shapes, got rank {len(s)}")

    # kind == "conv"
    if len(s) != 4:
        raise fail(f"conv needs [B, C, H, W] shapes, got rank {len(s)}; use kind='linear'")
    return _conv(s, t, norm, channels_optional=False)


def _conv(s: tuple, t: tuple, norm: bool, *, channels_optional: bool) -> Conv1x1Adapter:
    same_channels = s[1] == t[1]
    out_channels = None if channels_optional and same_channels else t[1]
    return Conv1x1Adapter(s[1], out_channels, in_size=s[2:], out_size=t[2:], norm=norm)
