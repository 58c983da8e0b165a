"""powerful-benchmarker (PB) users: ``run.py --from_pb`` on PB-format config folders written here from PB's documented
format (its config_* docs, command-line and YAML syntax pages), PB's merge flags, its search ranges."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from xml_plugin import config as C
from xml_plugin import pb_compat as P

from conftest import run_main

# PB's documented default config folder (one file per category), with a with_small.yaml that uses ~APPLY~
PB_FOLDER = {
    "config_general/default.yaml": """
trainer:
  MetricLossOnly:
    iterations_per_epoch: 100
    dataloader_num_workers: 2
    batch_size: 32
    freeze_trunk_batchnorm: True
    label_hierarchy_level: 0
    loss_weights: null
    set_min_label_to_zero: True
num_epochs_train: 1000
save_interval: 2
patience: 9
check_untrained_accuracy: True
""",
    "config_general/with_small.yaml": """
trainer~APPLY~2:
  iterations_per_epoch: 8
num_epochs_train: 3
""",
    "config_dataset/default.yaml": """
dataset:
  CUB200:
    download: True
splits_to_eval: [val]
split_manager:
  MLRCSplitManager:
    test_size: 0.5
    test_start_idx: 0.5
    num_training_partitions: 4
    num_training_sets: 4
""",
    "config_models/default.yaml": """
models:
  trunk:
    bninception:
      pretrained: imagenet
  embedder:
    MLP:
      layer_sizes:
        - 64
""",
    "config_loss_and_miners/default.yaml": """
loss_funcs:
  metric_loss:
    MultiSimilarityLoss:
      alpha~LOG_BAYESIAN~: [0.01, 100]
      beta~LOG_BAYESIAN~: [0.01, 100]
      base~BAYESIAN~: [0, 1]
sampler:
  MPerClassSampler:
    m: 4
mining_funcs:
  post_gradient_miner:
    MultiSimilarityMiner:
      epsilon: 0.1
""",
    "config_optimizers/default.yaml": """
optimizers:
  trunk_optimizer:
    RMSprop:
      lr: 0.000001
      weight_decay: 0.0001
      momentum: 0.9
  embedder_optimizer:
    RMSprop:
      lr: 0.00001
      weight_decay: 0.0001
      momentum: 0.9
""",
    "config_transforms/default.yaml": """
transforms:
  train:
    Resize:
      size: 256
    RandomResizedCrop:
      scale: 0.16 1
      ratio: 0.75 1.33
      size: 227
    RandomHorizontalFlip:
      p: 0.5
  eval:
    Resize:
      size: 256
    CenterCrop:
      size: 227
""",
    "config_eval/default.yaml": """
eval_normalize_embeddings: True
eval_batch_size: 64
eval_metric_for_best_epoch: mean_average_r_precision
eval_pca: null
""",
    "config_factories/default.yaml": "factories:\n  model: {ModelFactory: {}}\n",
}


def write_folder(root: Path, files) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_pb_folder_translates_and_its_command_passes_print_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pb = write_folder(tmp_path / "pb_cub", PB_FOLDER)
    code, out, err = run_main(capsys, ["--from_pb", str(pb), "--config_general", "[default,", "with_small]",
                                       "--from_pb_out", str(tmp_path / "mine"), "--bayes_opt_iters", "3",
                                       "--experiment_folder", str(tmp_path / "exps")])
    assert code == 0, err
    # every untranslatable key listed with its reason
    for key, reason in (("dataset.CUB200.download", "no downloads"), ("save_interval", "every epoch"),
                        ("check_untrained_accuracy", "no equivalent"), ("factories", "no equivalent"),
                        ("eval_pca", "no equivalent")):
        assert any(line.startswith(f"- `{key}`") and reason in line for line in out.splitlines()), key
    assert (tmp_path / "mine" / P.REPORT).read_text() in out + "\n"
    command = shlex.split(out.split("run it here with:")[1].strip())
    assert command[:2] == ["python", "run.py"] and "--experiment_name" in command
    assert command[command.index("--bayes_opt_iters") + 1] == "3"  # the user's other flags are kept
    # the translated files, read back through the printed command with every check a real run makes
    code, out, err = run_main(capsys, command[2:] + ["--print_config"])
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["general"]["n_trials"] == 3
    assert cfg["loss"]["name"] == "multi_similarity"
    space = C.search_space(cfg)
    assert space["loss.options.alpha"] == {"search": "float", "low": 0.01, "high": 100, "log": True}
    assert space["loss.options.base"] == {"search": "float", "low": 0, "high": 1}
    assert set(space) == {"loss.options.alpha", "loss.options.beta", "loss.options.base"}  # PB's ranges alone
    assert cfg["miner"] == {"name": "multi_similarity", "options": {"epsilon": 0.1}}
    assert cfg["sampler"] == {"name": "m_per_class", "options": {"m": 4}}
    # one optimizer: the embedder's class and options (PB's alone, not this project's defaults), the trunk's lr apart
    assert cfg["optimizer"] == {"name": "RMSprop", "options": {"lr": 1e-5, "weight_decay": 1e-4, "momentum": 0.9,
                                                              "trunk_lr": 1e-6}}
    assert cfg["trunk"]["name"] == "bninception" and cfg["trunk"]["pretrained"] is True
    assert cfg["embedder"]["size"] == 64
    assert cfg["trainer"]["batch_size"] == 32 and cfg["trainer"]["freeze_bn"] is True
    assert cfg["trainer"]["iterations_per_epoch"] == 8 and cfg["trainer"]["max_epochs"] == 3  # with_small merged last
    assert cfg["trainer"]["patience"] == 9 and cfg["trainer"]["num_workers"] == 2
    assert cfg["dataset"]["name"] == "cub200" and cfg["dataset"]["split"] == "mlrc"
    assert cfg["dataset"]["num_folds"] == 4 and cfg["dataset"]["test_fraction"] == 0.5
    assert cfg["transforms"]["image_size"] == 227 and cfg["transforms"]["train"] == {"scale": [0.16, 1.0], "flip": True,
                                                                                                    "pad": None}
    assert cfg["transforms"]["eval"]["mode"] == "center_crop" and cfg["transforms"]["eval"]["short_side"] == 256
    assert cfg["eval"]["batch_size"] == 64
    assert not (tmp_path / "exps").exists()  # --print_config wrote nothing


def test_translation_again_into_its_own_folder_but_not_into_another(tmp_path, capsys):
    pb = write_folder(tmp_path / "pb", PB_FOLDER)
    out = tmp_path / "mine"
    assert run_main(capsys, ["--from_pb", str(pb), "--from_pb_out", str(out)])[0] == 0
    assert run_main(capsys, ["--from_pb", str(pb), "--from_pb_out", str(out)])[0] == 0  # an earlier translation
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_main(capsys, ["--from_pb", str(pb), "--from_pb_out", str(other)])
    assert code == 2 and "not an earlier translation" in err and err.count("\n") == 1


def test_nothing_translatable_exits_2_listing_the_keys(tmp_path, capsys):
    pb = write_folder(tmp_path / "pb", {"config_factories/default.yaml": "factories:\n  model: {ModelFactory: {}}\n",
                                        "config_general/default.yaml": "save_interval: 2\n"})
    code, out, err = run_main(capsys, ["--from_pb", str(pb), "--from_pb_out", str(tmp_path / "o")])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "nothing translates" in err and "factories" in err and "save_interval" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run_main(capsys, ["--from_pb", str(tmp_path / "absent")])
    assert code == 2 and "not a powerful-benchmarker config folder" in err
    code, _, err = run_main(capsys, ["--from_pb", str(pb), "--config_general", "with_x"])
    assert code == 2 and "with_x" in err


def test_pb_merge_follows_pbs_documented_examples():
    # cl_syntax: ~OVERRIDE~ at any level, ~DELETE~
    base = {"optimizers": {"trunk_optimizer": {"RMSprop": {"lr": 1e-6}}, "embedder_optimizer": {"Adam": {"lr": 0.01}}}}
    assert P.pb_merge(base, {"optimizers": {"trunk_optimizer~OVERRIDE~": {"Adam": {"lr": 0.01}}}}) == {
        "optimizers": {"trunk_optimizer": {"Adam": {"lr": 0.01}}, "embedder_optimizer": {"Adam": {"lr": 0.01}}}}
    assert P.pb_merge(base, {"optimizers": {"embedder_optimizer~DELETE~": {}}}) == {
        "optimizers": {"trunk_optimizer": {"RMSprop": {"lr": 1e-6}}}}
    # a plain merge keeps both classes (PB's own warning)
    merged = P.pb_merge(base, {"optimizers": {"trunk_optimizer": {"Adam": {"lr": 0.01}}}})
    assert set(merged["optimizers"]["trunk_optimizer"]) == {"RMSprop", "Adam"}
    # ~APPLY~3: every mapping three levels down
    assert P.pb_merge(base, {"optimizers~APPLY~3": {"lr": 0.005}}) == {
        "optimizers": {"trunk_optimizer": {"RMSprop": {"lr": 0.005}}, "embedder_optimizer": {"Adam": {"lr": 0.005}}}}
    # ~SWAP~1 of the only key, ~SWAP~2 with an explicit mapping
    trainer = {"trainer": {"MetricLossOnly": {"batch_size": 32}}}
    assert P.pb_merge(trainer, {"trainer~SWAP~1": {"Mine": {}}}) == {"trainer": {"Mine": {"batch_size": 32}}}
    tf = {"transforms": {"train": {"Resize": {"size": 256}, "RandomHorizontalFlip": {"p": 0.5}}}}
    assert P.pb_merge(tf, {"transforms~SWAP~2": {"RandomHorizontalFlip": "RandomVerticalFlip"}}) == {
        "transforms": {"train": {"Resize": {"size": 256}, "RandomVerticalFlip": {"p": 0.5}}}}
    # flags inside a value merged into nothing still apply
    assert P.pb_merge({}, {"a": {"b~OVERRIDE~": {"c": 1}}}) == {"a": {"b": {"c": 1}}}


def test_search_ranges_become_markers_and_bad_ranges_are_listed():
    left = []
    got = P.search_ranges({"x~BAYESIAN~": [0, 1], "y~LOG_BAYESIAN~": [1e-4, 1e-2], "n~INT_BAYESIAN~": [2, 9.0],
                           "bad~LOG_BAYESIAN~": [0, 1], "worse~BAYESIAN~": [3, 1], "deep": {"z~BAYESIAN~": [1, 2]}},
                          "", left)
    assert got == {"x": {"search": "float", "low": 0, "high": 1},
                   "y": {"search": "float", "low": 1e-4, "high": 1e-2, "log": True},
                   "n": {"search": "int", "low": 2, "high": 9}, "deep": {"z": {"search": "float", "low": 1, "high": 2}}}
    assert all(C.is_search_marker(v) for v in (got["x"], got["y"], got["n"]))
    assert [k for k, _ in left] == ["bad~LOG_BAYESIAN~", "worse~BAYESIAN~"]


def _translate(tree):
    return P.translate({"config_x": tree})


def test_optimizers_loss_lr_and_what_one_optimizer_cannot_hold():
    t = _translate({"optimizers": {"trunk_optimizer": {"SGD": {"lr": 0.1, "momentum": 0.5}},
                                   "embedder_optimizer": {"Adam": {"lr": 1e-3}},
                                   "metric_loss_optimizer": {"Adam": {"lr~LOG_BAYESIAN~": [1e-5, 1e-1]}}}})
    assert t.config["optimizer"] == {"name": "Adam", "options~replace": {
        "lr": 1e-3, "trunk_lr": 0.1, "loss_lr": {"search": "float", "low": 1e-5, "high": 1e-1, "log": True}}}
    left = dict(t.left)
    assert "optimizers.trunk_optimizer.SGD.momentum" in left and "optimizers.trunk_optimizer.SGD" in left


def test_what_has_no_equivalent_is_listed():
    t = _translate({"loss_funcs": {"metric_loss": {"NoSuchLoss": {}}, "classifier_loss": {"CrossEntropyLoss": {}}},
                    "trainer": {"TrainWithClassifier": {"batch_size": 32}},
                    "sampler": None,
                    "models": {"trunk": {"inception_v4": {}}, "embedder": {"MLP": {"layer_sizes": [512, 128]}}},
                    "batch_size~INT_BAYESIAN~": [32, 256],
                    "transforms": {"train": {"ColorJitter": {"brightness": 0.2},
                                             "RandomResizedCrop": {"size": 224, "ratio": "1 2"}}},
                    "lr_schedulers": {"trunk_scheduler_by_epoch": {"StepLR": {"step_size": 2}}}})
    left = dict(t.left)
    assert "no loss 'NoSuchLoss'" in left["loss_funcs.metric_loss"]
    assert "one metric loss" in left["loss_funcs.classifier_loss"]
    assert "MetricLossOnly" in left["trainer.TrainWithClassifier"]
    assert "random sampling" in left["sampler"]
    assert "no trunk 'inception_v4'" in left["models.trunk.inception_v4"]
    assert "one layer" in left["models.embedder.MLP"]
    assert "search range on trainer.batch_size" in left["batch_size"]
    assert "no equivalent transform" in left["transforms.train.ColorJitter"]
    assert "aspect ratios" in left["transforms.train.RandomResizedCrop"]
    assert "lr_scheduler" in left["lr_schedulers"]
    assert not t.config  # nothing written for any of them


def test_older_pb_keys_identity_embedder_nested_distance_and_default_split():
    t = _translate({"batch_size": 64, "test_size": 0.5, "num_training_partitions": 3,
                    "training_method": "MetricLossOnly",
                    "dataset": {"Cars196": {}}, "models": {"embedder": {"Identity": {}}},
                    "split_manager": {"ClassDisjointSplitManager": {"test_size": 0.4, "test_start_idx": 0.5}},
                    "loss_funcs": {"metric_loss": {"ContrastiveLoss": {"pos_margin": 0.1,
                                                                       "distance": {"CosineSimilarity": {}}}}}})
    assert t.config["trainer"]["batch_size"] == 64 and t.config["dataset"]["name"] == "cars196"
    assert t.config["dataset"]["num_folds"] == 3
    assert t.config["dataset"]["test_fraction"] == 0.4  # the split manager's own, merged after the top-level one
    assert "test_start_idx = test_size" in dict(t.left)["split_manager.ClassDisjointSplitManager.test_start_idx"]
    assert "split" not in t.config["dataset"]  # ClassDisjointSplitManager is the default scheme
    assert t.config["embedder"] == {"name": "none", "size": None}
    assert t.config["loss"] == {"name": "contrastive", "options~replace": {
        "pos_margin": 0.1, "distance": {"name": "cosine_similarity", "options": {}}}}
    C.check_keys(C.merge(C.load(), t.config))
