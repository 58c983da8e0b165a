"""Class-disjoint protocol splits (docs/methods.md, the protocol)."""
import json
import types

import numpy as np
import pytest

from xml_plugin.data.splits import Split, class_disjoint_splits, protocol_splits


def _labels(num_classes, seed=0):
    rng = np.random.default_rng(seed)
    # class ids are not 0..C-1 and not contiguous; 1-4 images each, shuffled
    ids = rng.choice(1000, size=num_classes, replace=False)
    labels = np.repeat(ids, rng.integers(1, 5, size=num_classes))
    return rng.permutation(labels)


@pytest.mark.parametrize("num_classes,num_folds", [(20, 4), (23, 4), (13, 3), (52, 4)])
def test_disjoint_cover_and_contiguous(num_classes, num_folds):
    labels = _labels(num_classes)
    s = class_disjoint_splits(labels, test_fraction=0.5, num_folds=num_folds)
    classes = np.sort(np.unique(labels))
    n_trainval = num_classes // 2  # floor(C * 0.5): an odd C gives the test half the extra class
    assert s.test_classes.tolist() == classes[n_trainval:].tolist()
    assert set(labels[s.test].tolist()) == set(s.test_classes.tolist())
    # fold groups: contiguous runs of the sorted train/val classes, KFold sizes
    groups = s.fold_classes
    assert np.concatenate(groups).tolist() == classes[:n_trainval].tolist()
    sizes = [len(g) for g in groups]
    q, r = divmod(n_trainval, num_folds)
    assert sizes == [q + 1] * r + [q] * (num_folds - r)
    all_idx = set(range(len(labels)))
    for i, (train, val) in enumerate(s.folds):
        assert set(labels[val].tolist()) == set(groups[i].tolist())
        train_cls, val_cls = set(labels[train].tolist()), set(labels[val].tolist())
        test_cls = set(s.test_classes.tolist())
        assert not train_cls & val_cls and not train_cls & test_cls and not val_cls & test_cls
        # every image is in exactly one of train / val / test
        assert len(train) + len(val) + len(s.test) == len(labels)
        assert set(train.tolist()) | set(val.tolist()) | set(s.test.tolist()) == all_idx
        assert train.dtype == np.int64 and val.dtype == np.int64
    # each train/val image is validated in exactly one fold
    vals = np.concatenate([v for _, v in s.folds])
    assert sorted(vals.tolist()) == sorted(s.trainval.tolist())


def test_test_fraction_rounding():
    labels = np.arange(10)
    s = class_disjoint_splits(labels, test_fraction=0.3, num_folds=2)
    assert len(s.test_classes) == 3  # floor(10 * 0.7) = 7 train/val classes despite float error
    s = class_disjoint_splits(labels, test_fraction=0.25, num_folds=2)
    assert len(s.test_classes) == 3  # floor(7.5) = 7


def test_errors():
    with pytest.raises(ValueError, match="num_folds"):
        class_disjoint_splits(np.arange(6), num_folds=4)  # 3 train/val classes < 4 folds
    with pytest.raises(ValueError, match="num_folds"):
        class_disjoint_splits(np.arange(20), num_folds=1)
    with pytest.raises(ValueError, match="test_fraction"):
        class_disjoint_splits(np.arange(20), test_fraction=1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        class_disjoint_splits(np.arange(20), test_fraction=0.0)


def test_save_load_round_trip(tmp_path):
    s = class_disjoint_splits(_labels(17, seed=4), num_folds=4)
    path = s.save(tmp_path / "sub" / "split.json")
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temp file left
    t = Split.load(path)
    assert t.test.tolist() == s.test.tolist() and t.test.dtype == np.int64
    assert t.test_classes.tolist() == s.test_classes.tolist()
    assert len(t.folds) == 4 and t.num_folds == 4
    for (a, b), (c, d) in zip(s.folds, t.folds):
        assert a.tolist() == c.tolist() and b.tolist() == d.tolist()
    assert [g.tolist() for g in t.fold_classes] == [g.tolist() for g in s.fold_classes]
    assert t.query is None and t.meta == s.meta
    assert json.loads(path.read_text())["meta"]["num_folds"] == 4


def _fake_inshop():
    # 8 train items (2 images each), 4 test items with query/gallery images
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11])
    is_query = np.zeros(24, bool)
    is_gallery = np.zeros(24, bool)
    is_query[16::2] = True
    is_gallery[17::2] = True
    return types.SimpleNamespace(name="inshop", labels=labels, is_query=is_query, is_gallery=is_gallery)


def test_protocol_splits_query_gallery_branch():
    ds = _fake_inshop()
    s = protocol_splits(ds, test_fraction=0.5, num_folds=4)
    assert s.test.tolist() == list(range(16, 24))
    assert s.query.tolist() == list(range(16, 24, 2)) and s.gallery.tolist() == list(range(17, 24, 2))
    assert s.test_classes.tolist() == [8, 9, 10, 11]
    assert [g.tolist() for g in s.fold_classes] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    for i, (train, val) in enumerate(s.folds):
        assert set(ds.labels[val].tolist()) == set(s.fold_classes[i].tolist())
        assert len(train) == 12 and not set(train.tolist()) & set(val.tolist())
        assert max(train.max(), val.max()) < 16
    # survives a round trip with its query/gallery
    t = Split.from_dict(json.loads(json.dumps(s.to_dict())))
    assert t.query.tolist() == s.query.tolist() and t.gallery.tolist() == s.gallery.tolist()


def test_protocol_splits_without_query_gallery_uses_classes():
    labels = _labels(12, seed=2)
    ds = types.SimpleNamespace(name="toy", labels=labels, is_query=None, is_gallery=None)
    s = protocol_splits(ds, 0.5, 3)
    ref = class_disjoint_splits(labels, 0.5, 3)
    assert s.test.tolist() == ref.test.tolist() and s.query is None


def test_protocol_splits_rejects_shared_classes():
    ds = _fake_inshop()
    ds.labels = ds.labels.copy()
    ds.labels[16] = 0  # a query image of a training item
    with pytest.raises(ValueError, match="class-disjoint"):
        protocol_splits(ds, num_folds=4)


def test_sop_uses_its_official_class_disjoint_split(tmp_path):
    """SOP ships Ebay_train.txt / Ebay_test.txt: the protocol's test set is Ebay_test.txt's classes, not the upper half
    of the sorted classes (on the fixture: test classes 7 and 50, where sorted halves would give 10 and 50)."""
    from test_data import make_sop
    from xml_plugin.data.real import StanfordOnlineProducts
    make_sop(tmp_path)
    ds = StanfordOnlineProducts(tmp_path)
    split = protocol_splits(ds, num_folds=2)
    names = [ds.class_names[c].split("/")[1] for c in split.test_classes]
    assert sorted(names, key=int) == ["7", "50"]
    assert sorted(split.test.tolist()) == [3, 4, 5]  # the three rows of Ebay_test.txt (image ids 4, 5, 6)
    train_names = sorted({ds.class_names[c].split("/")[1] for g in split.fold_classes for c in g}, key=int)
    assert train_names == ["3", "10"]
    assert split.query is None and split.meta["official_test_set"]
    halves = class_disjoint_splits(ds.labels, num_folds=2)  # what cutting the sorted classes would have given
    assert sorted(ds.class_names[c].split("/")[1] for c in halves.test_classes) != sorted(names)
