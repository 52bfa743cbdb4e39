"""Metric-learning losses for instance retrieval, each a function plus an nn.Module wrapper.

All take L2-normalised embeddings `emb` [N, D] (similarity = cosine = inner product)
and integer identity labels [N]; a pair is positive when the labels agree.

- `triplet_loss`: cosine triplet ranking loss with in-batch mining. `hard` is the ALISC
  recipe (per anchor the hardest positive and the hardest negative of the batch);
  `semihard` (FaceNet) takes, per positive pair, the most similar negative that is still
  less similar than the positive (else the least similar negative).
- `contrastive_loss`: Siamese loss: positives pulled to cosine 1, negatives pushed below a margin.
- `coupled_clusters_loss`: Liu et al., CVPR 2016 (Deep Relative Distance Learning): per
  identity, its samples against their centre and the negative nearest that centre.
- `netvlad_triplet_loss`: Arandjelovic et al., CVPR 2016: the best of a set of potential
  positives against every negative, hinges summed (weak supervision).
- `norm_softmax_loss`: cosine classifier (normalised softmax, optional additive margin);
  `softmax_loss`: plain linear classifier. Strong baselines.
- `JointAttributeLoss`: FashionNet-style multi-task: a metric loss on the identity plus
  cross-entropy heads for attributes (coarse class, package type).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive mask without the diagonal, negative mask) of an [N] label vector."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


# --------------------------------------------------------------------------- triplet


def mine_triplets(sim: torch.Tensor, labels: torch.Tensor, strategy: str = "hard") -> torch.Tensor:
    """Triplets (anchor, positive, negative) as an index tensor [T, 3] chosen from a similarity matrix.

    hard: one triplet per anchor that has a positive and a negative: its least similar
      positive and its most similar negative.
    semihard: one per positive pair (a, p): the most similar negative n with s(a,n) < s(a,p);
      when every negative is at least as similar as p, the least similar negative.
    all: every valid triplet.
    """
    pos, neg = _masks(labels)
    sim = sim.detach()
    if strategy == "hard":
        valid = pos.any(1) & neg.any(1)
        a = torch.nonzero(valid).flatten()
        p = torch.where(pos, sim, torch.inf).argmin(1)[a]
        n = torch.where(neg, sim, -torch.inf).argmax(1)[a]
        return torch.stack([a, p, n], 1)
    if strategy == "semihard":
        a, p = torch.nonzero(pos & neg.any(1, keepdim=True), as_tuple=True)
        s_an = sim[a]  # [P, N]
        below = neg[a] & (s_an < sim[a, p][:, None])
        semi = torch.where(below, s_an, -torch.inf).argmax(1)
        easiest = torch.where(neg[a], s_an, torch.inf).argmin(1)
        n = torch.where(below.any(1), semi, easiest)
        return torch.stack([a, p, n], 1)
    if strategy == "all":
        trip = pos[:, :, None] & neg[:, None, :]
        return torch.nonzero(trip)
    raise ValueError(f"unknown mining strategy {strategy!r}: hard, semihard or all")


def triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.1, strategy: str = "hard") -> torch.Tensor:
    """Mean over mined triplets of max(0, s(a,n) - s(a,p) + margin), s = cosine."""
    return triplet_loss_sim(emb @ emb.T, labels, margin, strategy)


def triplet_loss_sim(sim: torch.Tensor, labels: torch.Tensor, margin: float = 0.1, strategy: str = "hard") -> torch.Tensor:
    """`triplet_loss` on a given similarity matrix."""
    t = mine_triplets(sim, labels, strategy)
    if len(t) == 0:
        return sim.sum() * 0.0
    a, p, n = t.unbind(1)
    return F.relu(sim[a, n] - sim[a, p] + margin).mean()


# --------------------------------------------------------------------------- contrastive


def contrastive_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Mean over positive pairs of (1 - s) plus mean over negative pairs of max(0, s - margin)."""
    return contrastive_loss_sim(emb @ emb.T, labels, margin)


def contrastive_loss_sim(sim: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """`contrastive_loss` on a given similarity matrix."""
    pos, neg = _masks(labels)
    zero = sim.sum() * 0.0
    lp = (1 - sim[pos]).mean() if pos.any() else zero
    ln = F.relu(sim[neg] - margin).mean() if neg.any() else zero
    return lp + ln


# --------------------------------------------------------------------------- coupled clusters


def coupled_clusters_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Coupled clusters loss (squared Euclidean distances, as in the paper).

    For each identity c with at least 2 samples in the batch and at least one negative:
    centre m_c = mean of its embeddings, n* = the negative nearest to m_c, and
    loss_i = 0.5 * max(0, |f_i - m_c|^2 + margin - |n* - m_c|^2) for each sample i of c.
    Mean over those samples.
    """
    terms = []
    for c in labels.unique():
        inside = labels == c
        if inside.sum() < 2 or inside.all():
            continue
        centre = emb[inside].mean(0)
        d_pos = (emb[inside] - centre).pow(2).sum(1)
        d_neg = (emb[~inside] - centre).pow(2).sum(1).min()
        terms.append(0.5 * F.relu(d_pos + margin - d_neg))
    if not terms:
        return emb.sum() * 0.0
    return torch.cat(terms).mean()


# --------------------------------------------------------------------------- NetVLAD weakly supervised triplet


def netvlad_triplet(query: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """One query's loss: sum over negatives of max(0, min_i |q - p_i|^2 + margin - |q - n_j|^2)."""
    d_pos = (positives - query).pow(2).sum(1).min()
    d_neg = (negatives - query).pow(2).sum(1)
    return F.relu(d_pos + margin - d_neg).sum()


def netvlad_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.1,
                         potential: torch.Tensor | None = None) -> torch.Tensor:
    """In-batch NetVLAD loss, mean over queries that have a potential positive and a negative.

    Potential positives of i are same-label items, or `potential[i, j]` when given (e.g. mined
    pairs: weak labels); negatives are different-label items that are not potential positives.
    """
    pos, neg = _masks(labels)
    if potential is not None:
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos = potential.bool() & ~eye
        neg = neg & ~pos
    d = (2 - 2 * (emb @ emb.T)).clamp(min=0)  # |a-b|^2 for unit vectors
    valid = pos.any(1) & neg.any(1)
    if not valid.any():
        return emb.sum() * 0.0
    d_pos = torch.where(pos, d, torch.inf).min(1).values
    hinge = F.relu(d_pos[:, None] + margin - d) * neg
    return hinge.sum(1)[valid].mean()


# --------------------------------------------------------------------------- classification


def norm_softmax_loss(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float = 16.0,
                      margin: float = 0.0) -> torch.Tensor:
    """Cross-entropy of scale * (cos(emb, w_c) - margin * [c == label]) (normalised softmax / CosFace)."""
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    if margin:
        cos = cos - margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype)
    return F.cross_entropy(scale * cos, labels)


def softmax_loss(emb: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """Plain softmax cross-entropy of a linear classifier on the embedding."""
    return F.cross_entropy(F.linear(emb, weight, bias), labels)


# --------------------------------------------------------------------------- modules


class MetricLoss(nn.Module):
    """Wraps a pairwise function `fn(emb, labels, **kw)`; no parameters."""

    def __init__(self, fn: Callable[..., torch.Tensor], **kw):
        super().__init__()
        self.fn, self.kw = fn, kw

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
        return self.fn(emb, labels, **self.kw)

    def extra_repr(self) -> str:
        return f"{self.fn.__name__}, {self.kw}"


class NormSoftmax(nn.Module):
    def __init__(self, dim: int, n_classes: int, scale: float = 16.0, margin: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) / dim ** 0.5)
        self.scale, self.margin = scale, margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
        return norm_softmax_loss(emb, self.weight, labels, self.scale, self.margin)


class Softmax(nn.Module):
    def __init__(self, dim: int, n_classes: int, temperature: float = 0.05):
        super().__init__()
        # Unit-norm embeddings make raw logits tiny; the temperature restores a usable range.
        self.fc = nn.Linear(dim, n_classes)
        self.temperature = temperature

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
        return softmax_loss(emb / self.temperature, self.fc.weight, self.fc.bias, labels)


def joint_attribute_loss(metric: torch.Tensor, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                         weights: dict[str, float]) -> torch.Tensor:
    """metric + sum_k weights[k] * CE(logits[k], targets[k])."""
    total = metric
    for k, lg in logits.items():
        known = targets[k] != -100  # unknown attribute (e.g. a mined, unlabelled photo)
        if known.any():
            total = total + weights.get(k, 1.0) * F.cross_entropy(lg[known], targets[k][known])
    return total


class JointAttributeLoss(nn.Module):
    """Metric loss on the identity plus a linear cross-entropy head per attribute (FashionNet-style)."""

    def __init__(self, metric: nn.Module, dim: int, attributes: dict[str, int], weight: float = 0.5,
                 temperature: float = 0.1):
        super().__init__()
        self.metric = metric
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in attributes.items()})
        self.weight, self.temperature = weight, temperature

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, attributes: dict[str, torch.Tensor] | None = None,
                **kw) -> torch.Tensor:
        m = self.metric(emb, labels, **kw)
        if not attributes:
            return m
        logits = {k: head(emb / self.temperature) for k, head in self.heads.items()}
        return joint_attribute_loss(m, logits, attributes, dict.fromkeys(logits, self.weight))


LOSSES = ("triplet", "contrastive", "coupled_clusters", "netvlad", "norm_softmax", "softmax", "joint_attribute")


def make_loss(spec: dict, dim: int, n_classes: int, attributes: dict[str, int] | None = None) -> nn.Module:
    """A loss module from a config entry like {"name": "triplet", "margin": 0.1, "strategy": "hard"}."""
    spec = dict(spec)
    name = spec.pop("name")
    if name == "triplet":
        return MetricLoss(triplet_loss, margin=spec.get("margin", 0.1), strategy=spec.get("strategy", "hard"))
    if name == "contrastive":
        return MetricLoss(contrastive_loss, margin=spec.get("margin", 0.5))
    if name == "coupled_clusters":
        return MetricLoss(coupled_clusters_loss, margin=spec.get("margin", 0.5))
    if name == "netvlad":
        return MetricLoss(netvlad_triplet_loss, margin=spec.get("margin", 0.1))
    if name == "norm_softmax":
        return NormSoftmax(dim, n_classes, spec.get("scale", 16.0), spec.get("margin", 0.0))
    if name == "softmax":
        return Softmax(dim, n_classes, spec.get("temperature", 0.05))
    if name == "joint_attribute":
        metric = make_loss(spec.get("metric", {"name": "triplet"}), dim, n_classes)
        return JointAttributeLoss(metric, dim, attributes or {}, spec.get("weight", 0.5), spec.get("temperature", 0.1))
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
