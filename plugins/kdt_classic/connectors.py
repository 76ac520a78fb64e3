"""Trainable connectors between student and teacher features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ConvRegressor"]


def _chw(shape: Sequence[int], what: str) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{what} must be a positive [C, H, W] shape, got {shape}")
    return shape


class ConvRegressor(nn.Module):
    """FitNets regressor: a convolution, batch norm and (optionally) ReLU mapping a student map to the teacher's shape.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015; the cases
    follow mdistiller's convolutional regressor, tried in this order:

    - student twice the teacher's size (``s_H = 2 t_H``, ``s_W = 2 t_W``):
      3x3 convolution, stride 2, padding 1;
    - student half the teacher's size (``2 s_H = t_H``, ``2 s_W = t_W``):
      4x4 transposed convolution, stride 2, padding 1;
    - student at least the teacher's size (``s_H >= t_H``, ``s_W >= t_W``):
      a convolution without padding of kernel ``(s_H + 1 − t_H, s_W + 1 − t_W)``;
      for equal sizes this is a 1x1 convolution.

    Any other relation (e.g. a student smaller than the teacher but not
    exactly half its size) raises :class:`ValueError`.

    :param student_shape: the student feature's ``[C, H, W]``.
    :param teacher_shape: the teacher feature's ``[C, H, W]``.
    :param use_relu: apply a ReLU after the batch norm.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        s_c, s_h, s_w = _chw(student_shape, "student_shape")
        t_c, t_h, t_w = _chw(teacher_shape, "teacher_shape")
        if s_h == 2 * t_h and s_w == 2 * t_w:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h and 2 * s_w == t_w:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(
                f"no regressor maps a student feature of size {s_h}x{s_w} to a teacher feature of size "
                f"{t_h}x{t_w}: the student must be twice, half, or at least the teacher's size"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu
        self.student_shape = (s_c, s_h, s_w)
        self.teacher_shape = (t_c, t_h, t_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.use_relu else x
