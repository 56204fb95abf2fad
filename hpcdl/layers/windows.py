"""Sliding-window geometry shared by convolution and pooling.

Every windowed layer here is written as a short loop over the kernel
offsets (i, j), each step moving one strided sub-rectangle of the whole batch
at once. Padding is never materialised: for each offset we compute which
output positions read real input (`WindowPlan.offsets`), and the positions
that would read padding are simply left alone (zero in a column buffer,
-inf in a max). That saves a padded copy of the input in forward and a
cropped copy of the gradient in backward.

For stride-1 "same-width" windows (2 * padding == kernel - 1, the usual 3x3
convolution) col2im has a faster form: with equal input and output row
lengths, every kernel offset is one constant shift of the flattened H*W
plane, so each step adds long contiguous runs instead of W-element rows
(NumPy's per-row overhead dominated at 14x14). Entries that wrapped around
a row edge are zeroed first.
"""
from __future__ import annotations

from dataclasses import dataclass


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(
            f"window of kernel {kernel}, stride {stride}, padding {padding} does not fit an input of size {size}"
        )
    return out


def _axis_offsets(size: int, out: int, kernel: int, stride: int, padding: int) -> list[tuple[slice, slice]]:
    """For each kernel offset k: (output slice, input slice) of the positions that hit real input.

    Output position o at offset k reads input index o*stride + k - padding.
    """
    pairs = []
    for k in range(kernel):
        lo = max(0, -(-(padding - k) // stride))           # ceil((padding - k) / stride)
        hi = min(out - 1, (size - 1 + padding - k) // stride)
        if hi < lo:
            pairs.append((slice(0, 0), slice(0, 0)))
            continue
        first = lo * stride + k - padding
        last = hi * stride + k - padding
        pairs.append((slice(lo, hi + 1), slice(first, last + 1, stride)))
    return pairs


def _flat_shifts(height: int, width: int, out_h: int, kernel: int, padding: int) -> tuple:
    """Per offset (i, j, out flat slice, in flat slice, wrapped output columns) when out_w == width, stride 1."""
    plane = height * width
    shifts = []
    for i in range(kernel):
        di = i - padding
        first_row, stop_row = max(0, -di), min(out_h, height - di)  # output rows that read a real input row
        for j in range(kernel):
            dj = j - padding
            o0, o1 = first_row * width, max(first_row, stop_row) * width
            s0, s1 = o0 + di * width + dj, o1 + di * width + dj
            if s0 < 0:          # the cut-off entries are wrapped columns anyway
                o0, s0 = o0 - s0, 0
            if s1 > plane:
                o1, s1 = o1 - (s1 - plane), plane
            wrapped = slice(0, -dj) if dj < 0 else slice(width - dj, width) if dj > 0 else None
            shifts.append((i, j, slice(o0, max(o0, o1)), slice(s0, max(s0, s1)), wrapped))
    return tuple(shifts)


@dataclass(frozen=True)
class WindowPlan:
    """Output size and per-offset (i, j, out_h, out_w, in_h, in_w) slices for one input size.

    `flat` holds the shifted-plane form of the same offsets when it applies (see module docstring).
    """

    out_h: int
    out_w: int
    offsets: tuple
    flat: tuple | None = None

    @classmethod
    def build(cls, height: int, width: int, kernel: int, stride: int, padding: int) -> "WindowPlan":
        out_h = output_size(height, kernel, stride, padding)
        out_w = output_size(width, kernel, stride, padding)
        rows = _axis_offsets(height, out_h, kernel, stride, padding)
        cols = _axis_offsets(width, out_w, kernel, stride, padding)
        offsets = tuple(
            (i, j, oh, ow, ih, iw) for i, (oh, ih) in enumerate(rows) for j, (ow, iw) in enumerate(cols)
        )
        flat = _flat_shifts(height, width, out_h, kernel, padding) if stride == 1 and out_w == width else None
        return cls(out_h, out_w, offsets, flat)


def im2col(x, cols, plan: WindowPlan) -> None:
    """Scatter windows of x (N, C, H, W) into cols (C, kh, kw, N, Ho, Wo).

    Channel-major columns make the forward product one GEMM,
    W (O, C*kh*kw) @ cols (C*kh*kw, N*Ho*Wo), and the weight gradient one
    GEMM with the long N*Ho*Wo axis as its inner dimension. Entries that
    would read padding are not written: `cols` must start zeroed and may be
    reused for inputs of the same shape.
    """
    xt = x.transpose(1, 0, 2, 3)
    for i, j, oh, ow, ih, iw in plan.offsets:
        cols[:, i, j, :, oh, ow] = xt[:, :, ih, iw]


def col2im(dcols, dx, plan: WindowPlan) -> None:
    """Adjoint of im2col: add dcols (C, kh, kw, N, Ho, Wo) into dx (N, C, H, W).

    May overwrite entries of `dcols` (the flat form zeroes wrapped columns).
    """
    if plan.flat is not None and dx.flags.c_contiguous and dcols.flags.c_contiguous:  # reshapes must be views
        _col2im_flat(dcols, dx, plan)
        return
    dxt = dx.transpose(1, 0, 2, 3)
    for i, j, oh, ow, ih, iw in plan.offsets:
        dxt[:, :, ih, iw] += dcols[:, i, j, :, oh, ow]


def _col2im_flat(dcols, dx, plan: WindowPlan) -> None:
    n, c, h, w = dx.shape
    dx_planes = dx.reshape(n, c, h * w).transpose(1, 0, 2)
    dcol_planes = dcols.reshape(dcols.shape[:4] + (-1,))
    for i, j, out_flat, in_flat, wrapped in plan.flat:
        if wrapped is not None:
            dcols[:, i, j, :, :, wrapped] = 0
        dx_planes[:, :, in_flat] += dcol_planes[:, i, j, :, out_flat]
