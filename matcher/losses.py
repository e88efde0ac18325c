"""Training losses: focal loss on the coarse dual-softmax confidence, fine L2 weighted by inverse std."""

from __future__ import annotations

import torch


def coarse_focal_loss(
    conf: torch.Tensor,
    conf_gt: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    pos_weight: float = 1.0,
    neg_weight: float = 1.0,
    sparse: bool = False,
    mask0: torch.Tensor | None = None,
    mask1: torch.Tensor | None = None,
) -> torch.Tensor:
    """Focal loss of the confidence ``(B, L0, L1)`` against 0/1 ground truth of the same shape.

    Positives: ``-alpha (1 - p)^gamma log p``; negatives (dense only): ``-alpha p^gamma log(1 - p)``; each
    term averaged over its entries and weighted. Entries in a padded row or column (masks ``(B, L)`` bool,
    False = padding) weigh 0 but count in their term's mean, as in LoFTR (whose weight is mask0 x mask1):
    padding dilutes the negative term rather than being left out of it. Without any positive the positive
    term is 0.
    """
    p = conf.clamp(1e-6, 1 - 1e-6)
    keep = torch.ones_like(conf_gt, dtype=torch.bool)
    if mask0 is not None:
        keep = keep & mask0[:, :, None]
    if mask1 is not None:
        keep = keep & mask1[:, None, :]
    pos, neg = conf_gt == 1, conf_gt == 0
    loss = conf.new_zeros(())
    if pos.any():
        pos_terms = -alpha * (1 - p[pos]).pow(gamma) * p[pos].log()
        loss = loss + pos_weight * (pos_terms * keep[pos]).mean()
    else:  # keeps the graph (and DDP's gradient bookkeeping) intact
        loss = loss + 0.0 * conf.sum()
    if not sparse and neg.any():
        neg_terms = -alpha * p[neg].pow(gamma) * (1 - p[neg]).log()
        loss = loss + neg_weight * (neg_terms * keep[neg]).mean()
    return loss


def fine_l2_loss(expec_f: torch.Tensor, expec_f_gt: torch.Tensor, correct_thr: float = 1.0, use_std: bool = True) -> torch.Tensor:
    """Squared distance of the expected fine offset ``expec_f[:, :2]`` to the ground truth ``(M, 2)``,
    over matches whose ground truth lies inside the window (max norm below ``correct_thr``), weighted by
    the inverse predicted std ``expec_f[:, 2]`` (normalised to mean 1 over all matches, not
    back-propagated). 0 (with a graph) when no match qualifies."""
    inside = expec_f_gt.abs().amax(dim=1) < correct_thr
    if not inside.any():
        return 0.0 * expec_f.sum()
    sq = ((expec_f[inside, :2] - expec_f_gt[inside]) ** 2).sum(-1)
    if not use_std:
        return sq.mean()
    inv_std = 1.0 / expec_f[:, 2].clamp_min(1e-10)
    weight = (inv_std / inv_std.mean()).detach()
    return (sq * weight[inside]).mean()
