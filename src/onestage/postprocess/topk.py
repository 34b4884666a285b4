"""A top-k whose ties are ordered: the k largest values, equal values lowest index first.

``torch.topk`` leaves the order of equal values (and which of them survive a cut through a
tie) to the kernel, which may differ between devices and from ONNX's ``TopK``. ONNX defines
it: "the element with the lower index will appear first" (TopK, opset 11). Post-processing
ranks candidates with this function so that PyTorch, another device and an exported graph
keep the same boxes when scores tie (saturated sigmoids and softmaxes give exact ties).
"""

from __future__ import annotations

from torch import Tensor


def stable_top_k(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest along the last dim, descending, equal values in index order.

    values: (..., N); returns (values (..., k), indices (..., k) int64). The fast path is one
    ``topk`` plus a sort of the k kept; only when a tie straddles the cut (equal values both
    inside and outside the k) does it fall back to a stable sort of all N.
    """
    n = values.shape[-1]
    if k >= n or k == 0:
        top, idx = values.sort(dim=-1, descending=True, stable=True)
        return top[..., :k], idx[..., :k]
    top, idx = values.topk(k, dim=-1)
    kth = top[..., -1:]  # (..., 1) the smallest value kept
    if ((values == kth).sum(dim=-1) != (top == kth).sum(dim=-1)).any():
        top, idx = values.sort(dim=-1, descending=True, stable=True)
        return top[..., :k], idx[..., :k]
    by_index = idx.argsort(dim=-1)  # index order first, then a stable sort by value keeps it among ties
    idx, top = idx.gather(-1, by_index), top.gather(-1, by_index)
    by_value = top.argsort(dim=-1, descending=True, stable=True)
    return top.gather(-1, by_value), idx.gather(-1, by_value)
