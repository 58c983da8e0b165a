"""The behaviours pytorch-metric-learning's own tests ask of a cross-batch memory, checked on the project's ``xbm``
(docs/xbn.md, "Peer tests"), in float16, float32 and float64.

The expected values are built here by brute force: a FIFO of every row seen, kept in plain Python lists and indexed
by the queue arithmetic, the pairs of the batch against it found by comparing labels one by one, and the wrapped loss
recomputed with PML's inner loss on those pairs. The memory takes the embeddings' dtype, as PML's does.
"""
import io

import pytest
import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.losses import CrossBatchMemory
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from xml_plugin import registry
from xml_plugin.losses.xbn import CrossBatchMemoryXBM

DTYPES = [torch.float16, torch.float32, torch.float64]
RTOL = {torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-10}
D = 16


def xbm(loss, memory_size, miner=None):
    """The project's ``xbm`` as the benchmark builds it (registry name), PML-compatible defaults."""
    return registry.build("loss_wrapper", {"name": "xbm", "memory_size": memory_size}, loss=loss, miner=miner,
                          embedding_size=D)


def batch(step, size=32, classes=10, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    return torch.randn(size, D, generator=g).to(dtype), torch.randint(0, classes, (size,), generator=g)


class Fifo:
    """What a FIFO memory of ``size`` rows must hold: slot ``(t mod size)`` gets the t-th row ever stored."""

    def __init__(self, size):
        self.size, self.rows, self.labels, self.count = size, [None] * size, [None] * size, 0

    def push(self, emb, labels):
        slots = []
        for e, y in zip(emb, labels):
            slot = self.count % self.size
            self.rows[slot], self.labels[slot] = e.clone(), int(y)
            slots.append(slot)
            self.count += 1
        return slots  # the slot of each stored row, in batch order

    def valid(self):
        n = min(self.count, self.size)
        return torch.stack(self.rows[:n]), torch.tensor(self.labels[:n])


def brute_pairs(labels, ref_labels, own_slot):
    """All (anchor, ref) positive and negative pairs, a positive never an anchor's own slot: (a1, p, a2, n), in
    row-major order (anchor, then memory row)."""
    same = labels[:, None] == ref_labels[None, :]  # [B, R]
    own = torch.arange(len(ref_labels))[None, :] == torch.tensor(own_slot)[:, None]  # [B, R] the anchor's own copy
    a1, p = (same & ~own).nonzero(as_tuple=True)
    a2, n = (~same).nonzero(as_tuple=True)
    return a1, p, a2, n


def to_slots(indices, slots):
    """Batch-relative tuples -> their reference indices moved to the batch's memory slots."""
    slot = torch.tensor(slots)
    if len(indices) == 3:
        return indices[0], slot[indices[1]], slot[indices[2]]
    return indices[0], slot[indices[1]], indices[2], slot[indices[3]]


def drop_self(indices, own_slot):
    """Mined tuples without those whose positive is the anchor's own stored copy."""
    own = torch.tensor(own_slot)
    if len(indices) == 3:
        a, p, n = indices
        keep = p != own[a]
        return a[keep], p[keep], n[keep]
    a1, p, a2, n = indices
    keep = p != own[a1]
    return a1[keep], p[keep], a2, n


def close(got, want, dtype):
    return torch.allclose(got.double(), want.double(), rtol=RTOL[dtype], atol=RTOL[dtype])


# ---- the queue -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_queue_holds_each_batch_at_the_pointer_and_wraps(dtype, masked):
    """30 batches through a 321-row memory (wraps twice): the pointer advances by the stored rows mod the size, the
    stored rows are the batch's bit for bit (in its dtype), also across the end; with an enqueue mask only the masked
    rows are stored."""
    size = 321
    ours, fifo = xbm(losses.ContrastiveLoss(), size), Fifo(size)
    mask = torch.zeros(32, dtype=torch.bool)
    mask[:-2:2] = True  # 15 rows stored, 17 queries
    stored = int(mask.sum()) if masked else 32
    for t in range(30):
        e, y = batch(t, dtype=dtype)
        assert ours.queue_idx == (t * stored) % size
        ours(e, y, enqueue_mask=mask if masked else None)
        slots = fifo.push(*((e[mask], y[mask]) if masked else (e, y)))
        assert ours.embedding_memory.dtype == dtype
        assert torch.equal(ours.embedding_memory[slots], e[mask] if masked else e)
        assert torch.equal(ours.label_memory[slots], y[mask] if masked else y)
        assert ours.has_been_filled == (fifo.count >= size)
    mem, lab = fifo.valid()
    assert torch.equal(ours.embedding_memory, mem) and torch.equal(ours.label_memory, lab)


def test_reset_queue_empties_the_memory():
    ours = xbm(losses.ContrastiveLoss(), 50)
    ours(*batch(0))
    assert ours.embedding_memory.abs().sum() > 0 and ours.queue_idx == 32
    ours.reset_queue()
    assert torch.equal(ours.embedding_memory, torch.zeros(50, D)) and torch.equal(ours.label_memory, torch.zeros(50).long())
    assert ours.queue_idx == 0 and not ours.has_been_filled


# ---- self-comparisons ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_an_embedding_is_never_its_own_positive(dtype):
    """The pairs of the batch against the memory: every same-label pair except each anchor with its own stored copy
    (wherever the pointer put it, across the end too), every different-label pair; negatives are never dropped."""
    size = 70
    ours, fifo = xbm(losses.ContrastiveLoss(), size), Fifo(size)
    for t in range(6):
        e, y = batch(t, dtype=dtype, classes=4)
        ours(e, y)
        slots = fifo.push(e, y)
        e_mem, l_mem = ours.valid_memory()
        got = ours.create_indices_tuple(e, y, e_mem, l_mem, None, True)
        want = brute_pairs(y, fifo.valid()[1], slots)
        for k in (0, 2):  # positives, negatives: the same pairs, each once
            got_pairs = list(zip(got[k].tolist(), got[k + 1].tolist()))
            assert sorted(got_pairs) == sorted(zip(want[k].tolist(), want[k + 1].tolist()))
            assert len(set(got_pairs)) == len(got_pairs)
        assert not any(p == slots[a] for a, p in zip(got[0].tolist(), got[1].tolist()))
        assert len(got[0]) == len(want[0]) > 0 and len(got[2]) > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_memory_of_one_batch_gives_the_inner_loss(dtype, masked):
    """With the memory exactly one batch long, the loss is the inner loss of the batch alone (nothing counted
    twice, no self pair); with an enqueue mask, the inner loss of the queries against the stored rows."""
    for size in (12, 20):
        loss, miner = losses.NTXentLoss(temperature=0.1), miners.TripletMarginMiner(margin=0.1)
        plain, mined = xbm(loss, size), xbm(loss, size, miner=miner)
        for t in range(3):
            e, y = batch(t, size=2 * size if masked else size, classes=4, dtype=dtype)
            if masked:
                mask = torch.arange(2 * size) >= size
                q, yq, s, ys = e[~mask], y[~mask], e[mask], y[mask]
                want = loss(q, yq, lmu.get_all_pairs_indices(yq, ys), s, ys)
                want_mined = loss(q, yq, miner(q, yq, s, ys), s, ys)
            else:
                mask, want, want_mined = None, loss(e, y), loss(e, y, miner(e, y))
            assert close(plain(e, y, enqueue_mask=mask), want, dtype)
            assert close(mined(e, y, enqueue_mask=mask), want_mined, dtype)


# ---- the loss against the memory --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inner", ["contrastive", "multi_similarity"])
def test_loss_equals_the_inner_loss_on_brute_force_pairs(dtype, inner):
    """Over 10 batches through a 100-row memory (wraps): the loss equals the inner loss of the batch against the
    FIFO's rows on the brute-force pairs; with a miner, on the miner's tuples against those rows minus self pairs;
    with an input indices_tuple (mined on the batch) too, on those followed by the input tuples moved to the batch's
    memory slots."""
    make = {"contrastive": losses.ContrastiveLoss, "multi_similarity": losses.MultiSimilarityLoss}[inner]
    inner_miner, outer_miner = miners.MultiSimilarityMiner(0.3), miners.MultiSimilarityMiner(0.2)
    size = 100
    plain, mined, mined_input = xbm(make(), size), xbm(make(), size, inner_miner), xbm(make(), size, inner_miner)
    fifo, loss = Fifo(size), make()
    for t in range(10):
        e, y = batch(t, dtype=dtype)
        given = outer_miner(e, y)
        got = plain(e, y), mined(e, y), mined_input(e, y, given)
        slots = fifo.push(e, y)
        mem, lab = fifo.valid()
        want_plain = loss(e, y, brute_pairs(y, lab, slots), mem, lab)
        tuples = drop_self(inner_miner(e, y, mem, lab), slots)
        want_mined = loss(e, y, tuples, mem, lab)
        joined = tuple(torch.cat([a, b]) for a, b in zip(tuples, to_slots(given, slots)))
        want_input = loss(e, y, joined, mem, lab)
        assert close(got[0], want_plain, dtype), t
        assert close(got[1], want_mined, dtype), t
        assert close(got[2], want_input, dtype), t


@pytest.mark.parametrize("dtype", DTYPES)
def test_miners_run_on_the_stored_memory(dtype):
    """A pair miner and a triplet miner applied to (batch, stored memory) in the batch's dtype: positives share the
    anchor's label, negatives do not."""
    ours = xbm(losses.ContrastiveLoss(), 321)
    pair, triplet = miners.PairMarginMiner(pos_margin=0, neg_margin=1), miners.TripletMarginMiner(margin=1)
    for t in range(12):
        e, y = batch(t, dtype=dtype)
        ours(e, y)
        e_mem, l_mem = ours.valid_memory()
        a1, p, a2, n = pair(e, y, e_mem, l_mem)
        a, tp, tn = triplet(e, y, e_mem, l_mem)
        assert len(a1) + len(a2) > 0 and len(a) > 0
        assert torch.equal(y[a1], l_mem[p]) and bool((y[a2] != l_mem[n]).all())
        assert torch.equal(y[a], l_mem[tp]) and bool((y[a] != l_mem[tn]).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_tuples_follow_the_memory_pairs(dtype):
    """``create_indices_tuple`` with an input tuple mined on the batch: the memory's pairs (self pairs removed) then
    the input's, a triplet input converted to pairs, their reference indices moved to the batch's memory slots; every
    positive shares the anchor's label, every negative does not."""
    ours, fifo = xbm(losses.ContrastiveLoss(), 321), Fifo(321)
    pair, triplet = miners.PairMarginMiner(pos_margin=0, neg_margin=1), miners.TripletMarginMiner(margin=1)
    for t in range(8):
        e, y = batch(t, dtype=dtype, classes=32)
        ours(e, y)
        slots = fifo.push(e, y)
        e_mem, l_mem = ours.valid_memory()
        for given in (pair(e, y), triplet(e, y)):
            as_pairs = to_slots(lmu.convert_to_pairs(given, y), slots)
            got = ours.create_indices_tuple(e, y, e_mem, l_mem, given, True)
            want = brute_pairs(y, l_mem, slots)
            for g, w, extra in zip(got, want, as_pairs):
                assert torch.equal(g, torch.cat([w, extra]))
            assert torch.equal(y[got[0]], l_mem[got[1]]) and bool((y[got[2]] != l_mem[got[3]]).all())


# ---- every loss PML supports, gradients, dtype of the state --------------------------------------------

SUPPORTED = [losses.AngularLoss, losses.CircleLoss, losses.ContrastiveLoss, losses.GeneralizedLiftedStructureLoss,
             losses.IntraPairVarianceLoss, losses.LiftedStructureLoss, losses.MarginLoss, losses.MultiSimilarityLoss,
             losses.NCALoss, losses.NTXentLoss, losses.SignalToNoiseRatioContrastiveLoss, losses.SupConLoss,
             losses.TripletMarginLoss, losses.TupletMarginLoss]


def test_the_supported_list_is_pmls():
    assert {c.__name__ for c in SUPPORTED} == set(CrossBatchMemory.supported_losses())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", SUPPORTED, ids=lambda c: c.__name__)
def test_every_supported_loss_against_the_memory(dtype, make):
    size = 100
    ours, fifo, loss = xbm(make(), size), Fifo(size), make()
    for t in range(5):
        e, y = batch(t, dtype=dtype)
        got = ours(e, y)
        slots = fifo.push(e, y)
        mem, lab = fifo.valid()
        assert close(got, loss(e, y, brute_pairs(y, lab, slots), mem, lab), dtype), t


@pytest.mark.parametrize("dtype", DTYPES)
def test_distance_weighted_miner_trains(dtype):
    """2-d embeddings on the unit circle through a DistanceWeightedMiner: a finite loss, finite gradients that reach
    the batch only."""
    ours = CrossBatchMemoryXBM(losses.NTXentLoss(temperature=0.1), 2, memory_size=256,
                               miner=miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4))
    angles = torch.arange(32, dtype=torch.float64) * (2 * torch.pi / 32)
    for t in range(6):
        x = torch.stack([angles.cos(), angles.sin()], dim=1).to(dtype).requires_grad_(True)
        y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(t))
        out = ours(x, y)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all()
        assert not ours.embedding_memory.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_keeps_its_dtype_through_a_checkpoint(dtype):
    """The memory takes the input's dtype (PML's choice) and a saved memory loads back in that dtype, bit for bit, so
    that a resumed run continues with the very same rows; the continued losses match too."""
    a, b = xbm(losses.ContrastiveLoss(), 60), xbm(losses.ContrastiveLoss(), 60)
    for t in range(3):
        a(*batch(t, dtype=dtype))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.embedding_memory.dtype == dtype and torch.equal(a.embedding_memory, b.embedding_memory)
    for t in range(3, 6):
        e, y = batch(t, dtype=dtype)
        assert torch.equal(a(e, y), b(e, y))


def test_xbm_matches_pmls_class_in_every_dtype():
    """Side by side with PML's CrossBatchMemory over a wrapping memory: the same losses and the same stored rows."""
    for dtype in DTYPES:
        ref = CrossBatchMemory(losses.ContrastiveLoss(), D, memory_size=50)
        ours = CrossBatchMemoryXBM(losses.ContrastiveLoss(), D, memory_size=50)
        for t in range(5):
            e, y = batch(t, dtype=dtype)
            assert torch.equal(ref(e, y), ours(e, y))
        assert torch.equal(ref.embedding_memory, ours.embedding_memory)
