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


# --------------------------------------------------------------------------------------------------------------------
# dataset.split: mlrc, the Reality Check's scheme (powerful-benchmarker's MLRCSplitManager)

def _mlrc_reference(trainval_classes, num_folds, test_size=0.5):
    """Fold memberships written from the scheme's definition, over a class list of N = M / (1 - test_size) classes:
    split lengths val = int(N (1 - test_size) / K), test = int(N test_size), train = N - val - test; fold p starts at
    position int(p / K * M) of the M sorted train/val classes; train is the wrapped range of `train` positions from
    there, val the wrapped range of `val` positions after it; a wrapped range [a, b] of class ids holds the ids with
    a <= id <= b, or id >= a or id <= b when it wraps."""
    ids = sorted(int(c) for c in trainval_classes)
    m = len(ids)
    n = int(round(m / (1 - test_size)))
    lengths = {"val": int(n * (1.0 / num_folds) * (1 - test_size)), "test": int(n * test_size)}
    lengths["train"] = n - lengths["val"] - lengths["test"]

    def rule(start, length):
        a, b = ids[start % m], ids[(start + length - 1) % m]
        return (lambda x: a <= x <= b) if a < b else (lambda x: x >= a or x <= b)

    folds = []
    for p in range(num_folds):
        start = int((float(p) / num_folds) * m)
        in_train, in_val = rule(start, lengths["train"]), rule(start + lengths["train"], lengths["val"])
        folds.append(([x for x in ids if in_train(x)], [x for x in ids if in_val(x)]))
    return folds


def _benchmark(name):
    """The class lists of the three benchmarks: CUB 200 and Cars 196 classes halved by sorted id (100/100, 98/98),
    SOP 22,634 classes with its official test set (Ebay_test.txt: the classes from 11,318 on, 0-based)."""
    if name == "cub200":
        labels = np.repeat(np.arange(200), 2)
        return types.SimpleNamespace(name=name, labels=labels), 100
    if name == "cars196":
        labels = np.repeat(np.arange(196), 2)
        return types.SimpleNamespace(name=name, labels=labels), 98
    labels = np.arange(22634)
    return types.SimpleNamespace(name=name, labels=labels, test_mask=labels >= 11318), 11318


@pytest.mark.parametrize("name", ["cub200", "cars196", "sop"])
def test_mlrc_folds_match_the_scheme_definition(name):
    ds, n_trainval = _benchmark(name)
    s = protocol_splits(ds, test_fraction=0.5, num_folds=4, scheme="mlrc")
    classes = np.unique(ds.labels)
    assert s.test_classes.tolist() == classes[n_trainval:].tolist()  # the test set is the default split's
    assert s.test_classes.tolist() == protocol_splits(ds, 0.5, 4).test_classes.tolist()
    assert s.meta["scheme"] == "mlrc"
    reference = _mlrc_reference(classes[:n_trainval], 4)
    assert len(s.folds) == 4
    for (train, val), (ref_train, ref_val), group in zip(s.folds, reference, s.fold_classes):
        assert sorted(set(ds.labels[train].tolist())) == ref_train
        assert sorted(set(ds.labels[val].tolist())) == ref_val
        assert sorted(group.tolist()) == ref_val
        assert not set(ref_train) & set(ref_val) and len(ref_train) + len(ref_val) == n_trainval
        assert not set(train.tolist()) & set(s.test.tolist())


def test_mlrc_on_cars_leaves_two_classes_unvalidated():
    """Cars196's 98 train/val classes: 24-class validation folds starting after 74 training classes at 0, 24, 49, 73,
    so classes 24 and 73 are never validated (the default split validates every class once, folds of 25/25/24/24)."""
    ds, _ = _benchmark("cars196")
    s = protocol_splits(ds, 0.5, 4, scheme="mlrc")
    assert [len(g) for g in s.fold_classes] == [24, 24, 24, 24]
    assert s.fold_classes[0].tolist() == list(range(74, 98)) and s.fold_classes[1].tolist() == list(range(24))
    validated = set(np.concatenate(s.fold_classes).tolist())
    assert set(range(98)) - validated == {24, 73}
    default = protocol_splits(ds, 0.5, 4)
    assert [len(g) for g in default.fold_classes] == [25, 25, 24, 24]
    assert set(np.concatenate(default.fold_classes).tolist()) == set(range(98))


def test_mlrc_on_cub_validates_the_default_groups_in_another_order():
    ds, _ = _benchmark("cub200")
    mlrc = protocol_splits(ds, 0.5, 4, scheme="mlrc").fold_classes
    default = protocol_splits(ds, 0.5, 4).fold_classes
    assert [g.tolist() for g in mlrc] == [default[i].tolist() for i in (3, 0, 1, 2)]


def test_scheme_is_recorded_only_when_not_the_default_and_unknown_schemes_fail():
    from xml_plugin.config import ConfigError
    labels = np.arange(20)
    assert "scheme" not in class_disjoint_splits(labels).meta  # splits.json of the default scheme unchanged
    assert protocol_splits(types.SimpleNamespace(name="t", labels=labels), scheme=None).to_dict() == \
        class_disjoint_splits(labels).to_dict() | {"meta": {**class_disjoint_splits(labels).meta, "dataset": "t"}}
    with pytest.raises(ConfigError, match="dataset.split 'mlcr'.*default, mlrc"):
        class_disjoint_splits(labels, scheme="mlcr")
    with pytest.raises(ValueError, match="num_folds"):
        class_disjoint_splits(np.arange(6), num_folds=4, scheme="mlrc")  # 3 train/val classes < 4 folds
