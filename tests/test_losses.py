"""The training losses on hand-computed cases: values, mined triplets and the direction of the gradients.

Four unit vectors in 2-D, two identities:
    e0 = (1, 0), e1 = (0.6, 0.8)   label 0
    e2 = (0.8, 0.6), e3 = (0, 1)   label 1
cosines: s01 = 0.6, s02 = 0.8, s03 = 0, s12 = 0.96, s13 = 0.8, s23 = 0.6
so every positive pair has s = 0.6 and the hardest negatives (0.8, 0.96) are closer than the positives.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from visearch.training import losses, mining  # noqa: E402

pytestmark = pytest.mark.train

E = [[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]]
Y = [0, 0, 1, 1]


def emb(requires_grad: bool = False):
    return torch.tensor(E, dtype=torch.float64, requires_grad=requires_grad)


def labels():
    return torch.tensor(Y)


def approx(x, expected, tol=1e-6):
    return abs(float(x) - expected) < tol


# --------------------------------------------------------------------------- triplet


def test_hard_mining_picks_hardest_positive_and_negative():
    e = emb()
    t = losses.mine_triplets(e @ e.T, labels(), "hard").tolist()
    assert t == [[0, 1, 2], [1, 0, 2], [2, 3, 1], [3, 2, 1]]


def test_hard_mining_on_a_larger_batch():
    # anchor 0 has positives 1 (s=0.9) and 2 (s=0.2); negatives 3 (s=0.5) and 4 (s=-0.3)
    sim = torch.tensor([[1.0, 0.9, 0.2, 0.5, -0.3],
                        [0.9, 1.0, 0.1, 0.0, 0.7],
                        [0.2, 0.1, 1.0, 0.4, 0.6],
                        [0.5, 0.0, 0.4, 1.0, 0.3],
                        [-0.3, 0.7, 0.6, 0.3, 1.0]])
    lab = torch.tensor([0, 0, 0, 1, 1])
    t = {row[0]: row[1:] for row in losses.mine_triplets(sim, lab, "hard").tolist()}
    assert t[0] == [2, 3]  # least similar positive, most similar negative
    assert t[1] == [2, 4]
    assert t[3] == [4, 0]
    assert t[4] == [3, 1]


def test_semihard_mining():
    e = emb()
    t = losses.mine_triplets(e @ e.T, labels(), "semihard").tolist()
    # (0,1): s_ap 0.6, negatives below it: 3 (s=0) -> 3; (1,0): none below -> the least similar, 3 (0.8)
    # (2,3): none below -> least similar, 0 (0.8); (3,2): 0 (s=0) is below
    assert sorted(t) == [[0, 1, 3], [1, 0, 3], [2, 3, 0], [3, 2, 0]]


def test_triplet_loss_values():
    # hard: anchors 0..3: 0.8-0.6+0.1, 0.96-0.6+0.1, 0.96-0.6+0.1, 0.8-0.6+0.1
    assert approx(losses.triplet_loss(emb(), labels(), 0.1, "hard"), (0.3 + 0.46 + 0.46 + 0.3) / 4)
    # semihard: 0, 0.3, 0.3, 0
    assert approx(losses.triplet_loss(emb(), labels(), 0.1, "semihard"), 0.15)
    # all: every (a, p, n), 8 triplets: hinge of s_an - 0.6 + 0.1
    s_an = [0.8, 0.0, 0.96, 0.8, 0.8, 0.96, 0.0, 0.8]
    assert approx(losses.triplet_loss(emb(), labels(), 0.1, "all"), sum(max(0, s - 0.5) for s in s_an) / 8)
    # a batch with no positive pair gives zero, not NaN
    assert float(losses.triplet_loss(emb(), torch.tensor([0, 1, 2, 3]))) == 0.0


def test_triplet_gradient_signs():
    """d loss / d s(a,p) < 0 and d loss / d s(a,n) > 0 for each active mined triplet; 0 elsewhere."""
    e = emb()
    sim = (e @ e.T).clone().requires_grad_(True)
    losses.triplet_loss_sim(sim, labels(), 0.1, "hard").backward()
    g = sim.grad
    for a, p, n in [(0, 1, 2), (1, 0, 2), (2, 3, 1), (3, 2, 1)]:
        assert approx(g[a, p], -0.25) and approx(g[a, n], 0.25)
    assert float(g[0, 3]) == 0.0 and float(g[3, 0]) == 0.0  # never-mined pairs get no gradient
    # through the embeddings: one descent step on an isolated triplet raises s(a,p) and lowers s(a,n)
    a = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.8, 0.0, 0.6]], dtype=torch.float64, requires_grad=True)
    a_only = torch.tensor([0, 0, 1])
    sim = a @ a.T
    loss = torch.relu(sim[0, 2] - sim[0, 1] + 0.1)  # = the (0, 1, 2) term of triplet_loss
    loss.backward()
    assert float(a.grad[0] @ a.detach()[1]) < 0 < float(a.grad[0] @ a.detach()[2])
    assert losses.mine_triplets(sim.detach(), a_only, "hard").tolist()[0] == [0, 1, 2]


# --------------------------------------------------------------------------- contrastive


def test_contrastive_loss_value_and_gradient():
    # positives: 1 - 0.6 = 0.4; negatives (margin 0.5): 0.3, 0, 0.46, 0.3 -> mean 0.265
    assert approx(losses.contrastive_loss(emb(), labels(), margin=0.5), 0.4 + 0.265)
    sim = (emb() @ emb().T).requires_grad_(True)
    losses.contrastive_loss_sim(sim, labels(), margin=0.5).backward()
    g = sim.grad
    assert approx(g[0, 1], -1 / 4)  # 4 ordered positive pairs: pulled towards 1
    assert approx(g[0, 2], 1 / 8)  # 8 ordered negative pairs; s = 0.8 > margin: pushed down
    assert float(g[0, 3]) == 0.0  # s = 0 < margin: no gradient
    # a negative below the margin costs nothing
    far = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert float(losses.contrastive_loss(far, torch.tensor([0, 1]), 0.5)) == 0.0


# --------------------------------------------------------------------------- coupled clusters


def test_coupled_clusters_loss_value():
    # class 0: centre (0.8, 0.4); |e0-c|^2 = |e1-c|^2 = 0.2; nearest negative e2 at 0.04
    # each sample: 0.5 * (0.2 + 0.5 - 0.04) = 0.33; class 1 is the mirror image
    assert approx(losses.coupled_clusters_loss(emb(), labels(), margin=0.5), 0.33)
    # tight, well separated clusters: zero
    tight = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    assert float(losses.coupled_clusters_loss(tight, labels(), margin=0.5)) == 0.0


def test_coupled_clusters_gradient_tightens_cluster():
    e = emb(True)
    losses.coupled_clusters_loss(e, labels(), margin=0.5).backward()
    step = e.detach() - 0.05 * e.grad
    c0 = step[:2].mean(0)
    assert float((step[:2] - c0).pow(2).sum(1).mean()) < 0.2  # class 0 tighter around its centre
    assert float(e.grad[2] @ (emb()[2] - torch.tensor([0.8, 0.4], dtype=torch.float64))) < 0  # e2 pushed off it


# --------------------------------------------------------------------------- NetVLAD


def test_netvlad_triplet_best_positive_and_summed_negatives():
    q = torch.tensor([1.0, 0.0])
    positives = torch.tensor([[0.0, 1.0], [0.6, 0.8]])  # d^2 = 2 and 0.8: the best is 0.8
    negatives = torch.tensor([[0.8, 0.6], [-1.0, 0.0]])  # d^2 = 0.4 (violates) and 4 (does not)
    assert approx(losses.netvlad_triplet(q, positives, negatives, margin=0.1), 0.8 + 0.1 - 0.4)


def test_netvlad_gradients_reach_only_the_best_positive_and_violating_negatives():
    q = torch.tensor([1.0, 0.0], requires_grad=True)
    positives = torch.tensor([[0.0, 1.0], [0.6, 0.8]], requires_grad=True)
    negatives = torch.tensor([[0.8, 0.6], [-1.0, 0.0]], requires_grad=True)
    losses.netvlad_triplet(q, positives, negatives, margin=0.1).backward()
    assert positives.grad[0].abs().sum() == 0 and negatives.grad[1].abs().sum() == 0
    assert float(-positives.grad[1] @ (q.detach() - positives.detach()[1])) > 0  # best positive drawn to q
    assert float(-negatives.grad[0] @ (q.detach() - negatives.detach()[0])) < 0  # violating negative pushed off


def test_netvlad_in_batch():
    # d^2 = 2 - 2s. anchor 0: pos 0.8; negs 0.4, 2 -> 0.5. anchor 1: pos 0.8; negs 0.08, 0.4 -> 0.82 + 0.5
    # anchors 2, 3 mirror 1, 0
    assert approx(losses.netvlad_triplet_loss(emb(), labels(), margin=0.1), (0.5 + 1.32 + 1.32 + 0.5) / 4)
    # potential positives given explicitly (weak labels): e0 ~ e2 only
    pot = torch.zeros(4, 4, dtype=torch.bool)
    pot[0, 2] = pot[2, 0] = True
    v = losses.netvlad_triplet_loss(emb(), torch.arange(4), margin=0.1, potential=pot)
    # anchor 0: pos d 0.4, negs e1 (0.8), e3 (2) -> 0; anchor 2: pos 0.4, negs e1 (0.08) -> 0.42, e3 (0.8) -> 0
    assert approx(v, 0.42 / 2)


# --------------------------------------------------------------------------- classification and multi-task


def test_norm_softmax_loss_values():
    e = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # class weights are normalised: cosines 1 and 0
    y = torch.tensor([0])
    assert approx(losses.norm_softmax_loss(e, w, y, scale=2.0), math.log(1 + math.exp(-2)))
    assert approx(losses.norm_softmax_loss(e, w, y, scale=2.0, margin=0.5), math.log(1 + math.exp(-1)))


def test_norm_softmax_gradient_moves_towards_class_weight():
    head = losses.NormSoftmax(2, 2, scale=8.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    e = torch.tensor([[0.6, 0.8]], requires_grad=True)
    head(e, torch.tensor([0])).backward()
    assert float(e.grad[0, 0]) < 0 < float(e.grad[0, 1])  # descent raises the class-0 cosine


def test_softmax_and_joint_attribute_loss():
    e = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert approx(losses.softmax_loss(e, w, None, torch.tensor([0])), math.log(1 + math.exp(-1)))
    logits = {"coarse": torch.tensor([[0.0, 0.0]]), "package": torch.tensor([[0.0, 0.0, 0.0, 0.0]])}
    targets = {"coarse": torch.tensor([1]), "package": torch.tensor([2])}
    total = losses.joint_attribute_loss(torch.tensor(0.25), logits, targets, {"coarse": 0.5, "package": 1.0})
    assert approx(total, 0.25 + 0.5 * math.log(2) + math.log(4))
    # unknown attributes (-100, mined photos) are skipped, never NaN
    skip = losses.joint_attribute_loss(torch.tensor(0.25), logits, {"coarse": torch.tensor([-100]),
                                                                    "package": torch.tensor([-100])}, {})
    assert approx(skip, 0.25)


def test_joint_attribute_module_and_factory():
    torch.manual_seed(0)
    loss = losses.make_loss({"name": "joint_attribute", "metric": {"name": "triplet", "margin": 0.1}, "weight": 0.5},
                            dim=2, n_classes=2, attributes={"coarse": 2, "package": 5})
    e = emb().float()
    attrs = {"coarse": torch.tensor([0, 0, 1, 1]), "package": torch.tensor([1, 1, 2, 2])}
    metric_only = losses.triplet_loss(e, labels(), 0.1)
    total = loss(e, labels(), attributes=attrs)
    assert float(total.detach()) > float(metric_only)  # + cross-entropy terms (positive)
    total.backward()
    assert loss.heads["coarse"].weight.grad is not None
    for name in losses.LOSSES:
        assert isinstance(losses.make_loss({"name": name}, 2, 2, {"coarse": 2, "package": 5}), torch.nn.Module)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.make_loss({"name": "arcface"}, 2, 2)


# --------------------------------------------------------------------------- same-item mining


def test_mining_precision_and_recall_by_hand():
    lab = np.array([0, 0, 1, 1, 1])
    m = mining.mining_precision([(0, 1), (2, 3), (1, 4)], lab)
    # correct: (0,1), (2,3); true pairs: 1 (class 0) + 3 (class 1)
    assert m["pairs"] == 3 and m["correct"] == 2
    assert approx(m["precision"], 2 / 3) and approx(m["recall"], 2 / 4) and m["true_pairs"] == 4


def test_mine_pairs_mutual_knn_and_threshold():
    a = np.array([[1.0, 0.0], [0.995, 0.0998], [0.0, 1.0], [0.0998, 0.995], [0.7071, 0.7071]])
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    # 0-1 and 2-3 are mutual nearest neighbours; 4 is nobody's nearest neighbour
    assert mining.mine_pairs(a, threshold=0.9, k=1) == [(0, 1), (2, 3)]
    assert mining.mine_pairs(a, threshold=0.999, k=1) == []  # below the threshold
    # with k=2, 4 is the second neighbour of 1 and 3, and 1, 3 are among 4's two nearest
    assert set(mining.mine_pairs(a, threshold=0.7, k=2)) == {(0, 1), (2, 3), (1, 4), (3, 4)}
    assert mining.mine_pairs(a, threshold=0.7, k=2, mutual=True) == mining.mine_pairs(a, 0.7, 2)


def test_mining_on_synthetic_clusters():
    """Three tight identities plus scattered singletons: the mined pairs are the identities' pairs."""
    rng = np.random.default_rng(0)
    centres = np.eye(16)[:3]
    x = np.concatenate([c + rng.normal(0, 0.05, (4, 16)) for c in centres] + [rng.normal(0, 1, (6, 16))])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = np.array([0] * 4 + [1] * 4 + [2] * 4 + list(range(3, 9)))
    pairs = mining.mine_pairs(x, threshold=0.8, k=3)
    m = mining.mining_precision(pairs, truth)
    assert m["precision"] == 1.0 and m["pairs"] >= 9
    clusters = mining.connected_clusters(len(x), pairs)
    assert (clusters[12:] == -1).all()  # singletons are left out
    assert mining.cluster_purity(clusters, truth)["purity"] == 1.0
    assert len(set(clusters[:12].tolist())) == 3
