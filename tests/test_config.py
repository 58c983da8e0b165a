"""Layered YAML configs: merge rules, loading in order, command-line overrides, search markers, the shipped files."""
from __future__ import annotations

import copy
import inspect
import math
import re
import time
from pathlib import Path

import optuna
import pytest
import yaml

from xml_plugin import config as C
from xml_plugin import registry as R
from xml_plugin.protocol.experiment import method_config

SHIPPED = Path(__file__).resolve().parent.parent / "benchmark_configs"


def write(root: Path, category: str, name: str, data) -> Path:
    path = root / category / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# ------------------------------------------------------------------------------------------- merge

def test_merge_is_recursive_and_leaves_inputs_alone():
    base = {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "f": [1, 2]}
    over = {"a": {"c": {"d": 20}, "x": 5}, "f": [3]}
    out = C.merge(base, over)
    assert out == {"a": {"b": 1, "c": {"d": 20, "e": 3}, "x": 5}, "f": [3]}  # lists are replaced, not appended
    assert base == {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "f": [1, 2]}
    out["a"]["c"]["e"] = 99
    over["a"]["x"] = 6
    assert base["a"]["c"]["e"] == 3 and out["a"]["x"] == 5  # no shared sub-objects


def test_merge_replace_and_delete():
    base = {"opt": {"name": "Adam", "options": {"lr": 1, "weight_decay": 2}}, "miner": {"name": "ms"}}
    out = C.merge(base, {"opt": {"options~replace": {"lr": 5}}, "miner~delete": None})
    assert out == {"opt": {"name": "Adam", "options": {"lr": 5}}}
    # a plain value replaces a mapping and the other way round
    assert C.merge({"a": {"b": 1}}, {"a": 3}) == {"a": 3}
    assert C.merge({"a": 3}, {"a": {"b": 1}}) == {"a": {"b": 1}}
    assert C.merge({"a": 1}, {"zzz~delete": None}) == {"a": 1}  # deleting an absent key is fine


def test_merge_applies_markers_inside_new_mappings():
    """``~replace``/``~delete`` never survive as literal keys, also where there was nothing to merge into."""
    out = C.merge({"loss_wrapper": None}, {"loss_wrapper": {"name": "x", "options~replace": {"a": 1}, "b~delete": None}})
    assert out == {"loss_wrapper": {"name": "x", "options": {"a": 1}}}
    out = C.merge({}, {"a~replace": {"b": {"c~replace": 2}}})
    assert out == {"a": {"b": {"c": 2}}}


def test_search_markers_are_leaves():
    marker = {"search": "float", "low": 0.1, "high": 1.0}
    # a marker replaces a mapping instead of being merged into it
    assert C.merge({"lam": {"low": 5, "other": 1}}, {"lam": marker}) == {"lam": marker}
    # a mapping over a marker replaces it too (no half-marker)
    assert C.merge({"lam": marker}, {"lam": {"value": 2}}) == {"lam": {"value": 2}}
    assert C.merge({"lam": marker}, {"lam": 0.5}) == {"lam": 0.5}
    other = {"search": "int", "low": 1, "high": 4}
    assert C.merge({"lam": marker}, {"lam": other}) == {"lam": other}
    # the same through an override
    assert C.apply_override({"lam": {"low": 9, "x": 1}}, "lam", marker) == {"lam": marker}


# ---------------------------------------------------------------------------------------- loading

@pytest.fixture
def root(tmp_path):
    r = tmp_path / "configs"
    write(r, "config_general", "default", {"general": {"n_trials": 8, "seed": 0}, "trainer": {"batch_size": 32}})
    write(r, "config_general", "fast", {"general": {"n_trials": 2}, "trainer": {"lr": 0.1}})
    write(r, "config_general", "faster", {"general": {"n_trials": 1}})
    write(r, "config_loss_and_miners", "default", {"loss": {"name": "ms", "options": {"alpha": 2}}})
    return r


def test_load_defaults_then_selection_in_order(root):
    cfg = C.load(root=root)
    assert cfg == {"general": {"n_trials": 8, "seed": 0}, "trainer": {"batch_size": 32},
                   "loss": {"name": "ms", "options": {"alpha": 2}}}
    cfg = C.load({"config_general": ["fast"]}, root=root)
    assert cfg["general"] == {"n_trials": 2, "seed": 0} and cfg["trainer"] == {"batch_size": 32, "lr": 0.1}
    assert C.load({"config_general": ["fast", "faster"]}, root=root)["general"]["n_trials"] == 1
    assert C.load({"config_general": ["faster", "fast"]}, root=root)["general"]["n_trials"] == 2
    # naming default again does not re-apply it after the others
    assert C.load({"config_general": ["fast", "default"]}, root=root)["general"]["n_trials"] == 2


def test_overrides_come_last(root):
    cfg = C.load({"config_general": ["fast"]}, [("general.n_trials", 5), ("loss.options", {"beta": 1}),
                                                 ("trainer~delete", None)], root=root)
    assert cfg["general"]["n_trials"] == 5
    assert cfg["loss"]["options"] == {"alpha": 2, "beta": 1}
    assert "trainer" not in cfg


def test_unknown_config_name_names_the_file_and_close_matches(root):
    with pytest.raises(C.ConfigError) as info:
        C.load({"config_general": ["fats"]}, root=root)
    msg = str(info.value)
    assert str(root / "config_general" / "fats.yaml") in msg
    assert "fast" in msg.split("Did you mean")[1]
    with pytest.raises(C.ConfigError, match="categories"):
        C.load({"config_nothing": ["x"]}, root=root)


def test_environment_variable_sets_the_config_root(root, monkeypatch):
    monkeypatch.setenv("XML_PLUGIN_CONFIG_ROOT", str(root))
    assert C.available("config_general") == ["default", "fast", "faster"]
    assert C.load()["loss"]["name"] == "ms"


def test_yaml_file_must_hold_a_mapping(root):
    write(root, "config_general", "listy", "- a\n- b\n")
    with pytest.raises(C.ConfigError, match="mapping"):
        C.load({"config_general": ["listy"]}, root=root)
    write(root, "config_general", "empty", "# only a comment\n")
    assert C.load({"config_general": ["empty"]}, root=root)["general"]["n_trials"] == 8


def test_yaml_reads_exponent_floats(root):
    write(root, "config_general", "lr", "trainer:\n  lr: 1e-3\n  eps: 2.5E+2\n  name: e5\n")
    t = C.load({"config_general": ["lr"]}, root=root)["trainer"]
    assert t["lr"] == pytest.approx(1e-3) and isinstance(t["lr"], float)
    assert t["eps"] == 250.0 and t["name"] == "e5"


# -------------------------------------------------------------------------------------- overrides

def test_parse_overrides_forms():
    got = C.parse_overrides(["--a.b", "1", "--c.d=0.5", "--general.methods", "baseline", "xml", "--miner~delete",
                             "--loss", "{name: contrastive, options: {pos_margin: 0.1}}", "--x.y", "-3", "-0.25",
                             "--m", "-1", "--lr", "1e-4", "--flag", "true", "--none", "null", "--s=a=b"])
    assert got == [("a.b", 1), ("c.d", 0.5), ("general.methods", ["baseline", "xml"]), ("miner~delete", None),
                   ("loss", {"name": "contrastive", "options": {"pos_margin": 0.1}}), ("x.y", [-3, -0.25]),
                   ("m", -1), ("lr", 1e-4), ("flag", True), ("none", None), ("s", "a=b")]
    assert isinstance(got[7][1], float)


@pytest.mark.parametrize("argv, match", [
    (["--a.b"], "needs a value"),
    (["--a.b", "--c", "1"], "needs a value"),
    (["value"], "unexpected argument"),
    (["--", "1"], "unexpected argument"),
    (["--x~delete", "3"], "no value"),
])
def test_parse_overrides_errors(argv, match):
    with pytest.raises(C.ConfigError, match=match):
        C.parse_overrides(argv)


def test_apply_override_modes():
    cfg = {"loss": {"name": "ms", "options": {"alpha": 2}}, "miner": None}
    assert C.apply_override(cfg, "loss.options", {"beta": 3})["loss"]["options"] == {"alpha": 2, "beta": 3}
    assert C.apply_override(cfg, "loss.options~replace", {"beta": 3})["loss"]["options"] == {"beta": 3}
    assert C.apply_override(cfg, "loss.options.alpha~delete")["loss"]["options"] == {}
    assert C.apply_override(cfg, "new.deep.key", 1)["new"] == {"deep": {"key": 1}}
    assert C.apply_override(cfg, "miner.options.epsilon", 0.1)["miner"] == {"options": {"epsilon": 0.1}}
    assert C.apply_override(cfg, "absent.path~delete") == cfg
    assert cfg == {"loss": {"name": "ms", "options": {"alpha": 2}}, "miner": None}  # not modified in place
    with pytest.raises(C.ConfigError, match="path"):
        C.apply_override(cfg, "a..b", 1)


def test_get_and_set_path():
    cfg = {"a": {"b": {"c": 1}}}
    assert C.get_path(cfg, "a.b.c") == 1 and C.get_path(cfg, "a.x", "dflt") == "dflt"
    assert C.get_path(cfg, "a.b.c.d") is None
    C.set_path(cfg, "a.z.w", 2)
    assert cfg["a"]["z"] == {"w": 2}


# ------------------------------------------------------------------------------------ search space

LAM = {"search": "float", "low": 0.01, "high": 10.0, "log": True}


def test_search_space_paths_and_order():
    cfg = {"search": {"seed": 0},  # the config section called ``search`` is not a marker
           "loss": {"name": "ms", "options": {"alpha": {"search": "float", "low": 0.0, "high": 1.0}}},
           "pooling": {"options": {"k": {"search": "categorical", "choices": [16, 32]}}},
           "trainer": {"batch_size": {"search": "int", "low": 16, "high": 64, "step": 16}}}
    space = C.search_space(cfg)
    assert list(space) == ["loss.options.alpha", "pooling.options.k", "trainer.batch_size"]
    assert space["pooling.options.k"]["choices"] == [16, 32]


def test_search_space_inside_method_overlays():
    cfg = C.load()
    assert C.search_space(cfg) == {}
    xml = C.search_space(method_config(cfg, "xml"))
    assert list(xml) == ["loss_wrapper.options.lam"] and xml["loss_wrapper.options.lam"]["log"] is True
    assert list(C.search_space(method_config(cfg, "gsp"))) == ["loss_wrapper.options.weight"]
    assert C.search_space(method_config(cfg, "baseline")) == {}
    ms = C.load({"config_loss_and_miners": ["multi_similarity"]})
    both = C.search_space(method_config(ms, "xml"))
    assert set(both) == {"loss.options.alpha", "loss.options.beta", "loss.options.base", "loss_wrapper.options.lam"}


@pytest.mark.parametrize("loss, keys", [
    ("multi_similarity", {"alpha", "beta", "base"}), ("contrastive", {"pos_margin", "neg_margin"}),
    ("TripletMarginLoss", {"margin"}), ("nt_xent", {"temperature"}), ("proxy_anchor", {"margin", "alpha"}),
    ("arc_face", {"margin", "scale"}), ("lifted_structure", {"pos_margin", "neg_margin"}), ("sup_con", {"temperature"}),
    ("n_pairs", set()),  # nothing to search: every method then runs once
])
def test_the_loss_search_space_is_picked_for_the_loss(loss, keys):
    overrides = [("loss.name", loss)]
    cfg = C.load({}, overrides, presets=C.presets_for({}, overrides))
    space = C.search_space(cfg)
    assert {k.removeprefix("loss.options.") for k in space} == keys
    defaults = C.resolve(cfg)["loss"]["options"]
    cls = R.get("loss", loss)
    import inspect
    params = inspect.signature(cls).parameters
    for key, marker in space.items():  # every range holds the loss's own default, which --search none uses
        name = key.removeprefix("loss.options.")
        assert params[name].default == pytest.approx(defaults[name])
        assert marker["low"] <= defaults[name] <= marker["high"]
    # a value the user fixes is not searched; the others still are
    if keys:
        first = sorted(keys)[0]
        fixed = overrides + [(f"loss.options.{first}", 0.25)]
        cfg = C.load({}, fixed, presets=C.presets_for({}, fixed))
        assert {k.removeprefix("loss.options.") for k in C.search_space(cfg)} == keys - {first}


def test_multi_similarity_space_holds_the_reality_checks_best_values():
    space = C.search_space(C.load({"config_loss_and_miners": ["multi_similarity"]}))
    for alpha, beta, base in ((0.01, 50.60, 0.56), (14.35, 75.83, 0.66), (8.49, 57.38, 0.41)):  # CUB, Cars, SOP
        for key, value in (("alpha", alpha), ("beta", beta), ("base", base)):
            m = space[f"loss.options.{key}"]
            assert m["low"] <= value <= m["high"], (key, value)


@pytest.mark.parametrize("marker, match", [
    ({"search": "float", "low": 1.0, "high": 1.0}, "low must be < high"),
    ({"search": "int", "low": 5, "high": 2}, "low must be < high"),
    ({"search": "float", "low": 0.0, "high": 1.0, "log": True}, "log"),
    ({"search": "float", "low": -1.0, "high": 1.0, "log": True}, "log"),
    ({"search": "float", "high": 1.0}, "low"),
    ({"search": "categorical"}, "choices"),
    ({"search": "categorical", "choices": []}, "choices"),
    ({"search": "flaot", "low": 0.1, "high": 1.0}, "flaot"),
])
def test_bad_markers_are_config_errors(marker, match):
    with pytest.raises(C.ConfigError, match=match) as info:
        C.search_space({"loss": {"options": {"p": marker}}})
    assert "loss.options.p" in str(info.value)


def test_resolve_with_params_and_defaults():
    cfg = {"a": {"lam": dict(LAM), "w": {"search": "float", "low": 0.0, "high": 1.0, "default": 0.3},
                 "k": {"search": "categorical", "choices": ["x", "y"]},
                 "n": {"search": "int", "low": 2, "high": 8, "log": True},
                 "m": {"search": "int", "low": 1, "high": 4}},
           "plain": 7}
    out = C.resolve(cfg)
    assert out["a"]["lam"] == pytest.approx(math.sqrt(0.01 * 10.0))  # geometric middle of a log range
    assert out["a"]["w"] == 0.3 and out["a"]["k"] == "x"
    assert out["a"]["n"] == 4 and isinstance(out["a"]["n"], int)
    assert out["a"]["m"] in (2, 3) and isinstance(out["a"]["m"], int)
    assert out["plain"] == 7 and C.search_space(out) == {}
    assert C.is_search_marker(cfg["a"]["lam"])  # the input keeps its markers
    out = C.resolve(cfg, {"a.lam": 0.5, "a.k": "y"})
    assert out["a"]["lam"] == 0.5 and out["a"]["k"] == "y" and out["a"]["w"] == 0.3
    with pytest.raises(C.ConfigError, match="a.typo"):
        C.resolve(cfg, {"a.typo": 1})


def test_suggest_with_an_optuna_trial():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = {"loss_wrapper": {"options": {"lam": dict(LAM)}},
           "pooling": {"options": {"k": {"search": "categorical", "choices": [16, 32, 64]}}},
           "trainer": {"batch_size": {"search": "int", "low": 16, "high": 64, "step": 16},
                       "p": {"search": "float", "low": 0.0, "high": 1.0, "step": 0.25}}}
    space = C.search_space(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(12):
        trial = study.ask()
        params = {path: C.suggest(trial, path, m) for path, m in space.items()}
        assert set(trial.params) == set(space)  # the dotted paths are the Optuna parameter names
        assert 0.01 <= params["loss_wrapper.options.lam"] <= 10.0
        assert params["pooling.options.k"] in (16, 32, 64)
        assert params["trainer.batch_size"] in (16, 32, 48, 64)
        assert params["trainer.p"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        concrete = C.resolve(cfg, params)
        assert concrete["trainer"]["batch_size"] == params["trainer.batch_size"]
        study.tell(trial, params["loss_wrapper.options.lam"])
        seen.append(params["loss_wrapper.options.lam"])
    dist = study.trials[0].distributions["loss_wrapper.options.lam"]
    assert isinstance(dist, optuna.distributions.FloatDistribution) and dist.log
    assert len(set(seen)) > 1


# ---------------------------------------------------------------------------------- shipped files

ALL_YAML = sorted(SHIPPED.glob("*/*.yaml"))


def test_shipped_layout():
    folders = {p.name for p in SHIPPED.iterdir() if p.is_dir()}
    assert folders == set(C.CATEGORIES) | {"config_methods"}
    for category in C.CATEGORIES:
        assert (SHIPPED / category / "default.yaml").is_file(), category


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_yaml_loads(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and (data or path.parent.name == "config_methods"), path
    assert C.load_yaml(path) == data
    C.search_space(C.merge({}, data))  # its markers (if any) are valid
    if path.parent.name in C.CATEGORIES:
        C.load({path.parent.name: [path.stem]}, root=SHIPPED)


def test_default_config_names_registered_components():
    cfg = C.load(root=SHIPPED)
    for kind in ("loss", "pooling", "optimizer", "trunk", "embedder", "sampler", "dataset"):
        R.get(kind, R.split_spec(cfg[kind] if kind != "dataset" else cfg["dataset"])[0])
    assert set(cfg["general"]["methods"]) <= set(R.names("method"))


def _accepts(obj, options):
    params = inspect.signature(obj).parameters
    return any(p.kind == p.VAR_KEYWORD for p in params.values()) or set(options) <= set(params)


@pytest.mark.parametrize("method", sorted(p.stem for p in (SHIPPED / "config_methods").glob("*.yaml")))
def test_every_method_overlay_merges_and_resolves(method):
    cfg = method_config(C.load(root=SHIPPED), method)
    name, opts = R.split_spec(cfg["pooling"])
    pooling = R.get("pooling", name)
    assert _accepts(pooling, opts), (method, name, opts)
    if cfg["loss_wrapper"] is not None:
        wname, wopts = R.split_spec(cfg["loss_wrapper"])
        wrapper = R.get("loss_wrapper", wname)
        assert _accepts(wrapper, wopts), (method, wname, wopts)
        if getattr(wrapper, "needs_histograms", False):
            assert pooling.gives_histogram, method
    concrete = C.resolve(cfg)
    assert C.search_space(concrete) == {}
    assert "~" not in yaml.safe_dump(concrete)


def test_smoke_preset_is_smaller():
    base = C.load(root=SHIPPED)
    smoke = C.load({"config_general": ["smoke"]}, root=SHIPPED)
    assert smoke["general"]["n_trials"] < base["general"]["n_trials"]
    assert smoke["general"]["reproductions"] < base["general"]["reproductions"]
    assert smoke["trainer"]["iterations_per_epoch"] < base["trainer"]["iterations_per_epoch"]
    assert smoke["trainer"]["max_epochs"] < base["trainer"]["max_epochs"]
    assert smoke["cache"]["views"] <= base["cache"]["views"]
    assert smoke["transforms"]["image_size"] <= base["transforms"]["image_size"]
    # everything it does not mention stays as it was
    assert smoke["trainer"]["batch_size"] == base["trainer"]["batch_size"]
    assert smoke["loss"] == base["loss"] and smoke["general"]["methods"] == base["general"]["methods"]


@pytest.mark.parametrize("dataset", ["kanji", "cards", "sop"])
def test_smoke_preset_fits_every_dataset(dataset):
    cfg = C.load({"config_general": ["smoke"], "config_dataset": [dataset]}, root=SHIPPED)
    ds = cfg["dataset"]
    effective = {**(ds.get("options_for") or {}).get(dataset, {}), **ds["options"]}
    assert _accepts(R.get("dataset", ds["name"]), effective)
    if dataset == "cards":
        assert len(effective["decks"]) < 13  # smoke shrinks the cards build


def test_command_line_overrides_apply_after_the_overlays():
    cfg = C.load(overrides=[("method_overrides.xml.pooling.options.num_prototypes", 32)], root=SHIPPED)
    assert method_config(cfg, "xml")["pooling"]["options"]["num_prototypes"] == 32
    assert "method_overrides" not in method_config(cfg, "xml")
    assert method_config(cfg, "baseline")["pooling"] == {"name": "gap"}  # other methods untouched
    # the command line wins over the overlay: --loss_wrapper.options.lam 0.3 sets XML's lambda
    base = C.load(root=SHIPPED)
    overrides = [("loss_wrapper.options.lam", 0.3), ("trainer.batch_size", 64)]
    xml = method_config(base, "xml", overrides)
    assert xml["loss_wrapper"] == {"name": "xml", "options": {"lam": 0.3, "ridge": 1.0e-3}}
    assert xml["trainer"]["batch_size"] == 64
    # baseline has no loss wrapper: the lambda is not for it (no nameless section appears), the batch size is
    plain = method_config(base, "baseline", overrides)
    assert plain["loss_wrapper"] is None and plain["trainer"]["batch_size"] == 64
    # a whole new section with a name applies to every method, e.g. a miner
    mined = method_config(base, "baseline", [("miner.name", "multi_similarity")])
    assert mined["miner"] == {"name": "multi_similarity"}
    # --pooling gmp replaces the baseline's pooling, and XML's too (the command line comes last)
    assert method_config(base, "xml", [("pooling.name", "gmp")])["pooling"]["name"] == "gmp"


def test_xml_full_searches_only_xml_pooling():
    cfg = C.load({"config_search": ["xml_full"]}, root=SHIPPED)
    assert "pooling.options.num_prototypes" in C.search_space(method_config(cfg, "xml"))
    assert "loss_wrapper.options.lam" in C.search_space(method_config(cfg, "xml"))
    assert not C.search_space(method_config(cfg, "baseline"))
    assert not C.search_space(method_config(cfg, "xbn"))


def test_a_chosen_file_is_not_undone_by_another_category_default():
    # config_dataset/kanji.yaml sets transforms and cache keys; config_transforms/default.yaml comes later in the
    # category order but must not reset them
    cfg = C.load({"config_dataset": ["kanji"]}, root=SHIPPED)
    kanji = C.load_yaml(SHIPPED / "config_dataset" / "kanji.yaml")
    assert cfg["transforms"]["image_size"] == kanji["transforms"]["image_size"] == 128
    assert cfg["transforms"]["train"]["flip"] is False
    assert cfg["cache"]["views"] == kanji["cache"]["views"]
    # a chosen file of a later category still wins over an earlier chosen one
    cfg = C.load({"config_dataset": ["kanji"], "config_transforms": ["protocol227"]}, root=SHIPPED)
    assert cfg["transforms"]["image_size"] == 227


def test_sop_and_inshop_presets_give_xml_128_prototypes_and_others_64():
    from xml_plugin.protocol.experiment import method_config
    for dataset, m in (("sop", 128), ("inshop", 128), ("cub200", 64), ("cards", 64)):
        overrides = [("dataset.name", dataset)]
        cfg = C.load({}, overrides, presets=C.presets_for({}, overrides))
        assert method_config(cfg, "xml")["pooling"]["options"]["num_prototypes"] == m, dataset
        assert method_config(cfg, "baseline")["pooling"]["name"] == "gap"


def test_xml_full_searches_the_prior():
    from xml_plugin.protocol.experiment import method_config
    space = C.search_space(method_config(C.load({"config_search": ["xml_full"]}), "xml"))
    assert space["pooling.options.prior"]["choices"] == [0.0, 1.0, 10.0]


def test_gpu_paper_preset_is_the_reality_checks_setting():
    cfg = C.load({"config_general": ["gpu_paper"]}, [("dataset.name", "cub200")])
    C.check_keys(cfg)
    assert cfg["trunk"]["frozen_blocks"] == 0 and cfg["general"]["device"] == "cuda"
    assert cfg["optimizer"]["name"] == "RMSprop" and cfg["optimizer"]["options"]["lr"] == 1e-6
    assert cfg["general"]["n_trials"] == 50 and cfg["general"]["reproductions"] == 10
    assert cfg["transforms"]["image_size"] == 227 and cfg["trainer"]["batch_size"] == 32


@pytest.mark.parametrize("category", C.CATEGORIES)
def test_every_shipped_config_file_has_only_known_keys(category):
    for name in C.available(category):
        C.check_keys(C.load({category: [name]}))


def test_xml_full_keeps_the_data_sets_prototype_count_as_its_default():
    # config_search/xml_full.yaml searches num_prototypes without a default: unsearched, XML keeps the data set's count
    from xml_plugin.protocol.experiment import method_config
    for dataset, m in (("sop", 128), ("inshop", 128), ("cards", 64)):
        overrides = [("dataset.name", dataset)]
        selection = {"config_search": ["xml_full"]}
        cfg = C.load(selection, overrides, presets=C.presets_for(selection, overrides))
        xml = method_config(cfg, "xml")
        marker = C.search_space(xml)["pooling.options.num_prototypes"]
        assert marker["choices"] == [16, 32, 64, 128]
        assert C.resolve(xml)["pooling"]["options"]["num_prototypes"] == m, dataset


def test_a_marker_without_default_inherits_only_a_value_in_its_range():
    base = {"a": 0.25, "b": 7, "c": "x", "d": 3}
    over = {"a": {"search": "float", "low": 0.0, "high": 1.0},            # 0.25 in range: kept (the middle is 0.5)
            "b": {"search": "int", "low": 1, "high": 5},                  # 7 out of range: the middle, 3
            "c": {"search": "categorical", "choices": ["y", "z"]},        # not a choice: the first choice
            "d": {"search": "int", "low": 1, "high": 5, "default": 2}}    # an explicit default wins
    cfg = C.merge(base, over)
    assert C.resolve(cfg) == {"a": 0.25, "b": 3, "c": "y", "d": 2}


def test_oversubscription_advice_only_when_busy_and_multithreaded():
    from xml_plugin.protocol.experiment import oversubscription_advice
    assert oversubscription_advice(2, busy=0.3, cores=2) is None          # a quiet machine
    assert oversubscription_advice(1, busy=2.0, cores=2) is None          # already one thread
    assert oversubscription_advice(2, busy=None, cores=2) is None         # cannot tell
    advice = oversubscription_advice(2, busy=1.8, cores=2)                # other work keeps every core busy
    assert advice is not None and "--general.num_threads 1" in advice and "1.8 of the 2 cores" in advice


def test_busy_cores_sees_a_spinning_process():
    """A child process spinning on one core for 2 s: busy_cores reports at least about one busy core meanwhile."""
    import subprocess
    import sys
    from xml_plugin.protocol.experiment import busy_cores
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 2: pass"])
    try:
        time.sleep(0.3)
        busy = busy_cores(0.5)
    finally:
        child.wait()
    assert busy is not None and busy >= 0.8, busy


# --------------------------------------------------------------------------------------------------------------------
# powerful-benchmarker's syntax: ~OVERRIDE~ / ~DELETE~, the list form of --config_<category>, config files by path

def test_pb_flags_are_synonyms_of_replace_and_delete():
    base = {"opt": {"name": "Adam", "options": {"lr": 1, "weight_decay": 2}}, "miner": {"name": "ms"}, "a": 1}
    ours = C.merge(base, {"opt": {"options~replace": {"lr": 5}}, "miner~delete": None})
    pb = C.merge(base, {"opt": {"options~OVERRIDE~": {"lr": 5}}, "miner~DELETE~": {}})
    assert pb == ours == {"opt": {"name": "Adam", "options": {"lr": 5}}, "a": 1}
    assert C.merge({}, {"a~OVERRIDE~": {"b": {"c~OVERRIDE~": 2}}}) == {"a": {"b": {"c": 2}}}  # never literal keys
    assert C.apply_override(base, "opt.options~OVERRIDE~", {"momentum": 0.9})["opt"]["options"] == {"momentum": 0.9}
    assert "miner" not in C.apply_override(base, "miner~DELETE~")
    assert C.leaf_paths({"opt": {"options~OVERRIDE~": {"lr": 5}}}) == ["opt.options"]
    # on the command line, as PB writes them (its delete may carry an empty mapping)
    assert C.parse_overrides(["--optimizer.options~OVERRIDE~", "{lr: 0.01}", "--miner~DELETE~", "--x~DELETE~", "{}"]) == [
        ("optimizer.options~OVERRIDE~", {"lr": 0.01}), ("miner~DELETE~", None), ("x~DELETE~", None)]
    with pytest.raises(C.ConfigError, match="no value"):
        C.parse_overrides(["--x~DELETE~", "3"])


@pytest.mark.parametrize("key, words", [("trainer~APPLY~2", ["~APPLY~", "no equivalent", "--from_pb"]),
                                        ("transforms~SWAP~1", ["~SWAP~", "no equivalent"]),
                                        ("loss~replase", ["unknown flag", "~replace", "~OVERRIDE~"])])
def test_other_tilde_flags_are_config_errors(key, words):
    for call in (lambda: C.merge({}, {key: {"a": 1}}), lambda: C.apply_override({}, key, {"a": 1})):
        with pytest.raises(C.ConfigError) as err:
            call()
        assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("words, names", [
    (["default", "smoke"], ["default", "smoke"]),
    (["[default,", "smoke]"], ["default", "smoke"]),  # --config_general [default, smoke] split by the shell
    (["[default, smoke]"], ["default", "smoke"]),      # quoted
    (["[default,smoke]"], ["default", "smoke"]),
    (["[smoke]"], ["smoke"]),
])
def test_config_names_take_the_list_form(words, names):
    assert C.config_names(words) == names


@pytest.mark.parametrize("words", [["[default,"], ["[]"], ["[default, [x]]"], ["[a,", "{b: 1}]"]])
def test_config_names_refuse_broken_lists(words):
    with pytest.raises(C.ConfigError, match=r"\[default, with_x\]"):
        C.config_names(words)


def test_list_form_loads_the_same_as_names(root):
    assert C.load({"config_general": C.config_names(["[fast,", "faster]"])}, root=root) == \
        C.load({"config_general": ["fast", "faster"]}, root=root)


def test_config_given_by_path_is_read_as_it_is(root, tmp_path):
    own = tmp_path / "mine" / "quick.yaml"
    own.parent.mkdir()
    own.write_text("general: {n_trials: 7}\n")
    cfg = C.load({"config_general": ["fast", str(own)]}, root=root)
    assert cfg["general"]["n_trials"] == 7 and cfg["trainer"]["lr"] == 0.1  # after fast, over it
    with pytest.raises(C.ConfigError, match="no such file"):
        C.load({"config_general": [str(tmp_path / "absent.yaml")]}, root=root)


@pytest.mark.parametrize("path, value", [("general.experiment_folder", ["a", "b"]), ("dataset.root", ["x", "y"]),
                                         ("trainer.batch_size", [32, 64]), ("general.device", {"a": 1})])
def test_a_key_of_one_value_refuses_a_list(path, value):
    cfg = C.apply_override(C.load(), path, value)
    with pytest.raises(C.ConfigError, match=rf"^{re.escape(path)} takes one value"):
        C.check_keys(cfg)


def test_one_value_check_leaves_lists_markers_and_every_shipped_config_alone():
    C.check_keys(C.apply_override(C.load(), "trainer.batch_size", {"search": "int", "low": 16, "high": 64}))
    C.check_keys(C.apply_override(C.load(), "general.methods", ["baseline", "xml"]))
    for category in C.CATEGORIES:
        for name in C.available(category):
            C.check_keys(C.load({category: [name]}))


def test_pb_keys_point_at_the_translator():
    with pytest.raises(C.ConfigError, match="'loss_funcs' is a powerful-benchmarker key.*--from_pb"):
        C.check_keys({**C.load(), "loss_funcs": {"metric_loss": {"ContrastiveLoss": {}}}})


def test_a_later_null_option_keeps_identities():
    """transforms.train.pad was added as null after results existed: null leaves the run-folder key and the experiment
    fingerprint as they were without the key; true changes both."""
    from xml_plugin.protocol.configs import training_key, without_later_nulls
    from xml_plugin.protocol.identity import result_view
    from xml_plugin.protocol.experiment import method_config
    from xml_plugin.engine.io import stable_hash
    words = [("loss.name", "multi_similarity")]
    cfg = C.load({}, words, presets=C.presets_for({}, words))
    assert cfg["transforms"]["train"]["pad"] is None
    ccfg = C.resolve(method_config(cfg, "xml"))
    old = copy.deepcopy(ccfg)
    del old["transforms"]["train"]["pad"]  # the config as it was before the option existed
    assert stable_hash(training_key(ccfg)) == stable_hash(training_key(old))
    assert without_later_nulls(result_view(ccfg)) == result_view(old)
    assert ccfg["transforms"]["train"]["pad"] is None  # the config itself is not changed
    on = copy.deepcopy(ccfg)
    on["transforms"]["train"]["pad"] = True
    assert stable_hash(training_key(on)) != stable_hash(training_key(old))
    assert without_later_nulls(result_view(on)) != result_view(old)
