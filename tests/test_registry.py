"""The name -> component registry: PML/torch built-ins, our own parts, a user's class, errors and specs."""
from __future__ import annotations

import inspect
import re

import pytest
import torch
from pytorch_metric_learning import distances, losses, miners, reducers, samplers

import xml_plugin
from xml_plugin import registry as R
from xml_plugin.registry import UnknownComponentError

PML_WRAPPERS = {"CrossBatchMemory", "MultipleLosses", "SelfSupervisedLoss"}


def _pml_loss_classes():
    out = []
    for attr in dir(losses):
        obj = getattr(losses, attr)
        if (inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and not attr.startswith("Base")
                and attr not in PML_WRAPPERS):
            out.append(attr)
    return out


def _snake(name: str) -> str:
    """Independent of the registry: split before each capital that starts a word (``NTXent`` -> ``nt_xent``)."""
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z0-9]+|[A-Z]+", name)
    return "_".join(w.lower() for w in words)


@pytest.fixture
def cleanup():
    """Names registered by a test, unregistered afterwards even when it fails."""
    added = []
    yield added
    for kind, name in added:
        try:
            R.unregister(kind, name)
        except UnknownComponentError:
            pass


def test_pml_loss_list_is_not_empty():
    names = _pml_loss_classes()
    assert "MultiSimilarityLoss" in names and "ContrastiveLoss" in names
    assert not PML_WRAPPERS & set(names)


@pytest.mark.parametrize("cls_name", _pml_loss_classes())
def test_every_pml_loss_resolves_by_class_and_snake_names(cls_name):
    cls = getattr(losses, cls_name)
    snake = _snake(cls_name)
    assert R.get("loss", cls_name) is cls
    assert R.get("loss", snake) is cls
    assert snake.endswith("_loss")
    assert R.get("loss", snake[: -len("_loss")]) is cls
    assert R.get("loss", cls_name.lower()) is cls  # case-insensitive


def test_multi_similarity_names():
    for n in ("MultiSimilarityLoss", "multi_similarity_loss", "multi_similarity", "Multi-Similarity"):
        assert R.get("loss", n) is losses.MultiSimilarityLoss
    assert R.canonical_name("loss", "MultiSimilarityLoss") == "multi_similarity"


def test_pml_wrappers_are_not_plain_losses():
    for cls_name in PML_WRAPPERS:
        with pytest.raises(UnknownComponentError):
            R.get("loss", cls_name)
    assert R.get("loss_wrapper", "pml_xbm") is losses.CrossBatchMemory  # PML's own, under its own name
    from xml_plugin.losses.xbn import CrossBatchMemoryXBM
    assert R.get("loss_wrapper", "xbm") is CrossBatchMemoryXBM  # the xbm method: checkpointable, PML-equal


def test_miners_samplers_distances_reducers():
    assert R.get("miner", "multi_similarity") is miners.MultiSimilarityMiner
    assert R.get("miner", "MultiSimilarityMiner") is miners.MultiSimilarityMiner
    assert R.get("miner", "triplet_margin_miner") is miners.TripletMarginMiner
    assert R.get("miner", "batch_hard") is miners.BatchHardMiner
    assert R.get("sampler", "m_per_class") is samplers.MPerClassSampler
    assert R.get("sampler", "MPerClassSampler") is samplers.MPerClassSampler
    assert R.get("distance", "cosine_similarity") is distances.CosineSimilarity
    assert R.get("distance", "LpDistance") is distances.LpDistance
    assert R.get("distance", "lp") is distances.LpDistance
    assert R.get("reducer", "mean") is reducers.MeanReducer
    assert R.get("reducer", "threshold_reducer") is reducers.ThresholdReducer
    # the same name in two kinds resolves per kind
    assert R.get("loss", "triplet_margin") is not R.get("miner", "triplet_margin")


def test_torch_optimizers_and_schedulers():
    assert R.get("optimizer", "Adam") is torch.optim.Adam
    assert R.get("optimizer", "adam") is torch.optim.Adam
    assert R.get("optimizer", "RMSprop") is torch.optim.RMSprop
    assert R.get("optimizer", "sgd") is torch.optim.SGD
    assert R.get("lr_scheduler", "cosine_annealing_lr") is torch.optim.lr_scheduler.CosineAnnealingLR
    assert R.get("lr_scheduler", "StepLR") is torch.optim.lr_scheduler.StepLR


def test_project_components():
    from xml_plugin.models.pooling import Pooling
    for name in ("xbm", "xml", "zsr", "xbn", "axbn"):
        wrapper = R.get("loss_wrapper", name)
        assert inspect.isclass(wrapper) and issubclass(wrapper, torch.nn.Module), name
        first = next(iter(inspect.signature(wrapper).parameters))
        assert first == "loss", f"{name}: a loss wrapper's first constructor argument is the loss, got {first}"
    assert R.get("loss_wrapper", "xml") is not R.get("loss_wrapper", "xbn")
    for name in ("gap", "gmp", "xml", "gsp"):
        pooling = R.get("pooling", name)
        assert issubclass(pooling, Pooling), name
    assert R.get("pooling", "xml").gives_histogram and not R.get("pooling", "gap").gives_histogram
    for name in ("cards", "kanji", "cub200", "cars196", "sop", "inshop"):
        assert callable(R.get("dataset", name)), name
    assert set(R.names("method")) >= {"baseline", "xml", "gsp", "xbm", "xbn", "axbn"}
    assert R.get("method", "xml")["loss_wrapper"]["name"] == "xml"
    assert R.get("method", "baseline") == {}  # the base config as it is


def test_describe_lists_every_kind():
    d = R.describe()
    assert set(d) == set(R.KINDS)
    assert "multi_similarity" in d["loss"] and "m_per_class" in d["sampler"] and "Adam" in d["optimizer"]
    assert d["loss"] == sorted(d["loss"])


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownComponentError) as info:
        R.get("loss", "multi_similarty")
    msg = str(info.value)
    assert "multi_similarty" in msg
    assert "Did you mean" in msg and "multi_similarity" in msg.split("Did you mean")[1].split("?")[0]
    assert isinstance(info.value, KeyError)  # catchable as a lookup failure
    with pytest.raises(UnknownComponentError, match="gsp"):
        R.get("pooling", "gsq")
    with pytest.raises(UnknownComponentError) as info:
        R.get("optimizer", "adamm")
    assert "Adam" in str(info.value)


def test_unknown_kind_and_non_string_name():
    with pytest.raises(ValueError, match="kind"):
        R.get("losses", "contrastive")
    with pytest.raises(ValueError, match="kind"):
        R.register("not_a_kind", object, name="x")
    with pytest.raises(TypeError):
        R.get("loss", 3)


class MyLoss(torch.nn.Module):
    def __init__(self, scale: float = 1.0, offset: float = 0.0):
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, embeddings, labels):
        return self.scale * embeddings.pow(2).mean() + self.offset


def test_user_class_registers_builds_and_unregisters(cleanup):
    with pytest.raises(UnknownComponentError):
        R.get("loss", "my")
    xml_plugin.register("loss", MyLoss)
    cleanup.append(("loss", "MyLoss"))
    for n in ("MyLoss", "my_loss", "my"):
        assert R.get("loss", n) is MyLoss
    assert "my" in R.names("loss")
    built = xml_plugin.build("loss", {"name": "my_loss", "options": {"scale": 2.0}}, offset=0.5)
    assert isinstance(built, MyLoss) and built.scale == 2.0 and built.offset == 0.5
    out = built(torch.ones(3, 4), torch.zeros(3))
    assert float(out) == pytest.approx(2.5)
    xml_plugin.unregister("loss", "my_loss")
    for n in ("MyLoss", "my_loss", "my"):
        with pytest.raises(UnknownComponentError):
            R.get("loss", n)
    with pytest.raises(UnknownComponentError):
        R.unregister("loss", "my")
    # the built-ins are untouched
    assert R.get("loss", "multi_similarity") is losses.MultiSimilarityLoss


def test_decorator_form_and_explicit_name(cleanup):
    @R.register("pooling", name="my_pool", aliases=["mp"])
    class MyPool(torch.nn.Module):
        gives_histogram = False
    cleanup.append(("pooling", "my_pool"))
    assert MyPool.__name__ == "MyPool"  # the decorator returns the class itself
    assert R.get("pooling", "my_pool") is MyPool
    assert R.get("pooling", "mp") is MyPool
    assert R.get("pooling", "MyPool") is MyPool
    assert R.canonical_name("pooling", "mp") == "my_pool"

    @R.register("miner")
    class FancyMiner:
        pass
    cleanup.append(("miner", "fancy"))
    assert R.get("miner", "fancy_miner") is FancyMiner and R.get("miner", "fancy") is FancyMiner


def test_register_overwrite_rules(cleanup):
    class A:
        pass

    class B:
        pass
    R.register("reducer", A, name="test_reducer_x")
    cleanup.append(("reducer", "test_reducer_x"))
    with pytest.raises(ValueError, match="already registered"):
        R.register("reducer", B, name="test_reducer_x", overwrite=False)
    assert R.get("reducer", "test_reducer_x") is A
    R.register("reducer", B, name="test_reducer_x")
    assert R.get("reducer", "test_reducer_x") is B
    # the replaced class's own aliases no longer point anywhere
    with pytest.raises(UnknownComponentError):
        R.get("reducer", "A")


def test_register_dict_method(cleanup):
    overlay = {"pooling": {"name": "gmp"}, "loss_wrapper": None}
    R.register("method", overlay, name="gmp_baseline")
    cleanup.append(("method", "gmp_baseline"))
    assert R.get("method", "gmp_baseline") == overlay
    with pytest.raises(ValueError, match="needs a name"):
        R.register("method", {"pooling": "gap"})


def test_build_rejects_unknown_options_naming_valid_ones(cleanup):
    R.register("loss", MyLoss, name="my_strict")
    cleanup.append(("loss", "my_strict"))
    with pytest.raises(R.UnknownOptionError) as info:
        R.build("loss", {"name": "my_strict", "scael": 2.0})
    msg = str(info.value)
    assert "scael" in msg and "scale" in msg and "offset" in msg
    assert isinstance(info.value, xml_plugin.config.ConfigError)  # bad input: the CLI exits with 2
    # PML classes take **kwargs and pass them down: the message still names the chain's options
    with pytest.raises(R.UnknownOptionError) as info:
        R.build("loss", {"name": "multi_similarity", "options": {"alpah": 2.0}})
    msg = str(info.value)
    assert "alpah" in msg and "alpha" in msg and "distance" in msg


def test_build_pml_and_torch_components():
    loss = R.build("loss", {"name": "contrastive", "options": {"pos_margin": 0.1, "neg_margin": 0.7}})
    assert isinstance(loss, losses.ContrastiveLoss) and loss.neg_margin == 0.7
    miner = R.build("miner", "multi_similarity", epsilon=0.2)
    assert isinstance(miner, miners.MultiSimilarityMiner) and miner.epsilon == 0.2
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = R.build("optimizer", {"name": "adam", "lr": 0.05}, params)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.05
    sampler = R.build("sampler", {"name": "m_per_class", "options": {"m": 2}}, [0, 0, 1, 1, 2, 2], length_before_new_iter=6)
    assert sorted(iter(sampler)) == list(range(6))


def test_split_spec_forms():
    assert R.split_spec("gap") == ("gap", {})
    assert R.split_spec({"name": "xml", "options": {"lam": 1.0}}) == ("xml", {"lam": 1.0})
    assert R.split_spec({"name": "xml", "lam": 1.0}) == ("xml", {"lam": 1.0})
    # inline keys win over ``options`` and ``options: null`` is empty
    assert R.split_spec({"name": "xml", "options": {"lam": 1.0}, "lam": 2.0}) == ("xml", {"lam": 2.0})
    assert R.split_spec({"name": "gap", "options": None}) == ("gap", {})
    spec = {"name": "xml", "options": {"lam": 1.0}}
    R.split_spec(spec)[1]["lam"] = 5.0
    assert spec["options"]["lam"] == 1.0  # the spec is not aliased
    with pytest.raises(ValueError, match="name"):
        R.split_spec({"options": {}})
    with pytest.raises(TypeError):
        R.split_spec(3)


def test_snake_case():
    assert R.snake_case("MultiSimilarityLoss") == "multi_similarity_loss"
    assert R.snake_case("NTXentLoss") == "nt_xent_loss"
    assert R.snake_case("MPerClassSampler") == "m_per_class_sampler"


def test_user_registration_before_first_lookup_wins(monkeypatch):
    """A name the user registers before the built-ins load (first lookup) is not replaced by PML's class."""
    R.get("loss", "contrastive")  # make sure everything is loaded, then simulate a fresh registry with the user's entry
    monkeypatch.setattr(R, "_entries", {k: {} for k in R.KINDS})
    monkeypatch.setattr(R, "_aliases", {k: {} for k in R.KINDS})
    monkeypatch.setattr(R, "_populated", False)

    class Mine:
        pass
    R.register("loss", Mine, name="contrastive")
    assert R.get("loss", "contrastive") is Mine  # this lookup loads the built-ins
    assert R.get("loss", "triplet_margin") is losses.TripletMarginLoss
    assert R.get("optimizer", "adam") is torch.optim.Adam
    # after loading, registering replaces as usual
    R.register("loss", losses.ContrastiveLoss, name="contrastive")
    assert R.get("loss", "contrastive") is losses.ContrastiveLoss


def test_nested_distance_and_reducer_specs_build_the_same_objects_as_pml_by_hand():
    from pytorch_metric_learning import distances, reducers
    spec = {"name": "multi_similarity", "options": {"alpha": 3.0, "distance": {"name": "lp_distance", "options": {
        "power": 2}}, "reducer": "mean"}}
    ours = R.build("loss", spec)
    by_hand = losses.MultiSimilarityLoss(alpha=3.0, distance=distances.LpDistance(power=2),
                                         reducer=reducers.MeanReducer())
    assert isinstance(ours.distance, distances.LpDistance) and ours.distance.power == 2
    assert isinstance(ours.reducer, reducers.MeanReducer)
    torch.manual_seed(0)
    emb, labels = torch.randn(16, 8), torch.arange(4).repeat_interleave(4)
    assert torch.equal(ours(emb, labels), by_hand(emb, labels))
    # the default (cosine similarity, AvgNonZeroReducer) gives another value: the nested spec did something
    assert not torch.equal(R.build("loss", {"name": "multi_similarity", "options": {"alpha": 3.0}})(emb, labels),
                           by_hand(emb, labels))


def test_option_names_are_checked_with_close_matches_also_when_nested():
    with pytest.raises(R.UnknownOptionError, match="did you mean alpha"):
        R.check_option_names("loss", {"name": "multi_similarity", "options": {"alfa": 1}})
    with pytest.raises(R.UnknownOptionError, match="power"):
        R.check_option_names("loss", {"name": "contrastive", "options": {"distance": {"name": "lp_distance",
                                                                                      "options": {"powr": 1}}}})
    R.check_option_names("optimizer", {"name": "Adam", "options": {"lr": 1e-3, "trunk_lr": 1e-4}}, ("trunk_lr",))


def test_nested_dict_specs_build_the_loss_pml_builds_by_hand():
    spec = {"name": "multi_similarity", "options": {"distance": {"name": "cosine_similarity"},
                                                    "reducer": {"name": "mean"}}}
    ours = R.build("loss", spec)
    by_hand = losses.MultiSimilarityLoss(distance=distances.CosineSimilarity(), reducer=reducers.MeanReducer())
    torch.manual_seed(1)
    emb, labels = torch.randn(20, 6), torch.arange(5).repeat_interleave(4)
    assert type(ours.reducer) is reducers.MeanReducer and type(ours.distance) is distances.CosineSimilarity
    assert torch.equal(ours(emb, labels), by_hand(emb, labels))
    # another nested reducer gives PML's value for that reducer, which differs: the nested spec is what is used
    summed = R.build("loss", {"name": "multi_similarity", "options": {"reducer": {"name": "sum"}}})(emb, labels)
    assert torch.equal(summed, losses.MultiSimilarityLoss(reducer=reducers.SumReducer())(emb, labels))
    assert not torch.equal(summed, by_hand(emb, labels))


def test_any_option_named_after_a_kind_takes_a_nested_spec(cleanup):
    class WithEmbedder:
        def __init__(self, embedder=None, label="x"):
            self.embedder, self.label = embedder, label

    R.register("loss", WithEmbedder, name="with_embedder")
    cleanup.append(("loss", "with_embedder"))
    built = R.build("loss", {"name": "with_embedder", "options": {
        "embedder": {"name": "conv1x1", "options": {"in_channels": 4, "size": 3}}, "label": {"no": "name key"}}})
    assert built.embedder.proj.weight.shape == (3, 4, 1, 1)
    assert built.label == {"no": "name key"}  # a mapping without 'name' is an ordinary value
    with pytest.raises(UnknownComponentError, match="conv1x1"):
        R.build("loss", {"name": "with_embedder", "options": {"embedder": {"name": "conv1x2"}}})


def test_check_options_turns_constructor_refusals_into_config_errors():
    CE = xml_plugin.config.ConfigError
    R.check_options("loss", {"name": "multi_similarity", "options": {"alpha": 2.0, "distance": {
        "name": "cosine_similarity"}, "reducer": {"name": "mean"}}})  # fine: no error
    with pytest.raises(CE) as info:  # PML: "Imbalance must be between 0 and 1"
        R.check_options("loss", {"name": "ranked_list", "options": {"margin": 0.4, "Tn": 1, "imbalance": 2}})
    msg = str(info.value)
    assert "ranked_list" in msg and "imbalance=2" in msg and "Imbalance must be between 0 and 1" in msg
    assert "margin" not in msg and "\n" not in msg
    with pytest.raises(CE, match="large_margin_softmax.*distance.*CosineSimilarity"):
        R.check_options("loss", {"name": "large_margin_softmax", "options": {"distance": {"name": "lp_distance"}}})
    with pytest.raises(CE, match="lp_distance.*is_inverted"):  # inside a nested spec: the nested component is named
        R.check_options("loss", {"name": "contrastive", "options": {"distance": {
            "name": "lp_distance", "options": {"is_inverted": True}}}})
    with pytest.raises(CE, match="Adam.*lr=-1.*Invalid learning rate"):
        R.check_options("optimizer", {"name": "Adam", "options": {"lr": -1}})
    with pytest.raises(CE, match="needs more options.*Tn"):
        R.check_options("loss", {"name": "ranked_list", "options": {"margin": 0.4}})
    with pytest.raises(R.UnknownOptionError, match="did you mean step_size"):
        R.check_options("lr_scheduler", {"name": "StepLR", "options": {"step_sise": 2}, "step": "epoch"}, ("step",))
    R.check_options("lr_scheduler", {"name": "StepLR", "options": {"step_size": 2}, "step": "epoch"}, ("step",))
    # a search marker is a value the constructor cannot judge: names are checked, values left to the trial
    R.check_options("loss", {"name": "ranked_list", "options": {"margin": 0.4, "Tn": 1, "imbalance": {
        "search": "float", "low": 0.0, "high": 1.0}}})


def test_check_options_runs_constructors_only(cleanup):
    """An error inside a user's component at run time, or a bug in its constructor, is not bad input."""
    class Buggy(torch.nn.Module):
        def __init__(self, scale=1.0):
            super().__init__()
            self.scale = float(scale)
            if self.scale == 3.0:
                raise TypeError("a bug in the constructor")

        def forward(self, embeddings, labels, indices_tuple=None):
            raise ValueError("a bug at run time")

    R.register("loss", Buggy, name="buggy")
    cleanup.append(("loss", "buggy"))
    R.check_options("loss", {"name": "buggy", "options": {"scale": 2.0}})  # forward never runs
    with pytest.raises(TypeError, match="a bug in the constructor"):
        R.check_options("loss", {"name": "buggy", "options": {"scale": 3.0}})


# --------------------------------------------------------------------------------------------------------------------
# register(kind, module): powerful-benchmarker's "register every class of a module"

def _user_module(tmp_path, name, source):
    """A module written to a file and imported, as a user's ``my_losses.py``."""
    import importlib.util
    import sys
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


LOSS_MODULE = '''
import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction, ContrastiveLoss  # imported: not registered again
from pytorch_metric_learning.miners import BaseMiner


class BaseOfMine(BaseMetricLossFunction):
    """A base class of the user's own: not a component."""


class PairGapLoss(BaseOfMine):
    def __init__(self, gap=0.1, **kwargs):
        super().__init__(**kwargs)
        self.gap = gap


class NTWeirdLoss(BaseMetricLossFunction):
    pass


class PlainModuleLoss(torch.nn.Module):
    def forward(self, embeddings, labels):
        return embeddings.sum() * 0


class HardestMiner(BaseMiner):
    pass


class Helper:
    pass


def helper_function():
    return 1
'''


def test_register_module_registers_every_fitting_class_under_single_class_names(tmp_path, cleanup):
    mod = _user_module(tmp_path, "pb_style_losses", LOSS_MODULE)
    before = set(R.names("loss"))
    contrastive = R.get("loss", "contrastive")
    assert xml_plugin.register("loss", mod) is mod
    cleanup += [("loss", "pair_gap"), ("loss", "nt_weird"), ("loss", "plain_module")]
    assert set(R.names("loss")) - before == {"pair_gap", "nt_weird", "plain_module"}  # not the Base*, miner, helper
    assert R.get("loss", "contrastive") is contrastive  # an imported PML class is left as it was
    for cls_name, snake, short in (("PairGapLoss", "pair_gap_loss", "pair_gap"), ("NTWeirdLoss", "nt_weird_loss",
                                                                                   "nt_weird")):
        cls = getattr(mod, cls_name)
        assert snake == _snake(cls_name)  # the names a single-class registration gives, derived independently
        assert R.get("loss", cls_name) is R.get("loss", snake) is R.get("loss", short) is cls
    assert R.build("loss", {"name": "pair_gap", "options": {"gap": 0.3}}).gap == 0.3
    # the same module as miners: only the miner
    before = set(R.names("miner"))
    xml_plugin.register("miner", mod)
    cleanup.append(("miner", "hardest"))
    assert set(R.names("miner")) - before == {"hardest"} and R.get("miner", "HardestMiner") is mod.HardestMiner


def test_register_module_kinds(tmp_path, cleanup):
    mod = _user_module(tmp_path, "pb_style_parts", '''
import torch
from torch.utils.data import Sampler


class TinyPooling(torch.nn.Module):
    pass


class EveryOtherSampler(Sampler):
    def __init__(self, labels, batch_size=2, length_before_new_iter=4):
        self.n = length_before_new_iter

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self):
        return self.n


class SlowSGD(torch.optim.SGD):
    pass
''')
    xml_plugin.register("sampler", mod)
    xml_plugin.register("optimizer", mod)
    xml_plugin.register("pooling", mod)
    cleanup += [("sampler", "every_other"), ("optimizer", "slow_sgd"), ("pooling", "tiny")]
    assert R.get("sampler", "every_other") is mod.EveryOtherSampler
    assert R.get("optimizer", "SlowSGD") is mod.SlowSGD
    with pytest.raises(UnknownComponentError):
        R.get("optimizer", "tiny_pooling")  # an nn.Module is no optimizer
    assert R.get("pooling", "tiny") is mod.TinyPooling
    with pytest.raises(UnknownComponentError):  # poolings are nn.Modules: the optimizer is not one
        R.get("pooling", "slow_sgd")


def test_register_module_with_nothing_registrable_is_refused(tmp_path):
    mod = _user_module(tmp_path, "pb_nothing", "class Helper:\n    pass\n\n\ndef build():\n    return 1\n")
    before = R.describe()
    with pytest.raises(ValueError, match=r"register\('loss', module pb_nothing\).*no loss class.*Helper"):
        xml_plugin.register("loss", mod)
    with pytest.raises(R.NothingToRegisterError):
        xml_plugin.register("trunk", mod)
    with pytest.raises(ValueError, match="own names"):
        xml_plugin.register("loss", _user_module(tmp_path, "pb_named", LOSS_MODULE), name="mine")
    assert R.describe() == before  # nothing registered by a refused call


def test_register_module_through_import_nothing_registrable_exits_2(tmp_path, capsys):
    from conftest import run_main
    (tmp_path / "pb_empty_losses.py").write_text("class NotALoss:\n    pass\n")
    user = tmp_path / "register_them.py"
    user.write_text("import sys\nsys.path.insert(0, %r)\nimport pb_empty_losses\nimport xml_plugin\n"
                    "xml_plugin.register('loss', pb_empty_losses)\n" % str(tmp_path))
    code, out, err = run_main(capsys, ["--import", str(user), "--list"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "pb_empty_losses" in err and "NotALoss" in err
