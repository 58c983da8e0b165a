"""Several searches per method (``general.searches``) and the automatic attribution, on a tiny experiment: the
studies and budgets of each search, the sampler seeds, the reference reproduced at the other method's parameters,
the verdict over searches recomputed from reproductions.csv with scipy, and a rerun that trains nothing."""
from __future__ import annotations

import csv
import math

import numpy as np
import optuna
import pytest
from scipy import stats

from xml_plugin import config as C
from xml_plugin.protocol.experiment import method_config
from xml_plugin.protocol.names import attribution_label, owns_study, study_name

from conftest import as_cli_args, run_main, tiny_overrides

NAME = "two"
FAST = {"general.searches": 2, "general.n_trials": 2, "general.reproductions": 2, "trainer.iterations_per_epoch": 2,
        "trainer.max_epochs": 1, "embedder.size": 4}
# XML's alpha in another range than the baseline's: the shared key's best values differ, so the attribution trains
XML_ALPHA = ["--method_overrides.xml.loss.options.alpha", "{search: float, low: 5, high: 6}"]
BASE_KEYS = {"loss.options.alpha", "loss.options.beta", "loss.options.base"}


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_searches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("searches")
    argv = ["--experiment_name", NAME, "--no_progress"] + as_cli_args(tiny_overrides(tmp, **FAST)) + XML_ALPHA
    return tmp, argv


def _complete(study):
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def test_study_names_of_searches_and_attributions_are_the_experiments_own():
    assert study_name("e", "xml", "search") == "e.xml.search"  # search 0: the name experiments always had
    assert study_name("e", "xml", "search", 2) == "e.xml.search-s2"
    label = attribution_label("baseline", "xml")
    assert study_name("e", label, "reproductions", 1) == "e.baseline@xml.reproductions-s1"
    for study in ("e.xml.search", "e.xml.search-s2", "e.baseline@xml.reproductions", "e.baseline@xml.reproductions-s1"):
        assert owns_study("e", study), study
    for study in ("e.y.xml.search", "e.xml.search-s0", "e.xml.search-2", "e.xml.searches", "e.xml.search-s1x",
                  "e.xml.search.s1"):
        assert not owns_study("e", study), study


def test_two_searches_attribution_verdict_over_searches_and_resume(two_searches, capsys):
    tmp, argv = two_searches
    code, out, err = run_main(capsys, argv)
    assert code == 0, err[-3000:]
    folder = tmp / "experiments" / NAME
    storage = f"sqlite:///{folder / 'optuna.db'}"
    names = set(optuna.get_all_study_names(storage))
    assert names == {f"{NAME}.{m}.{part}{suffix}" for m in ("baseline", "xml", "baseline@xml")
                     for part in ("search", "reproductions") for suffix in ("", "-s1")
                     if not (m == "baseline@xml" and part == "search")}

    def load(label, part, s):
        return optuna.load_study(study_name=study_name(NAME, label, part, s), storage=storage)

    best = {}
    for s in (0, 1):
        for method in ("baseline", "xml"):  # the exact budget in every search
            done = _complete(load(method, "search", s))
            assert sorted(t.user_attrs["slot"] for t in done) == [0, 1], (method, s)
            best[(method, s)] = dict(max(done, key=lambda t: t.value).params)
            reps = _complete(load(method, "reproductions", s))
            assert sorted(t.user_attrs["seed"] for t in reps) == [1000, 2000]  # the same seeds in every search
        # the reference reproduced at XML's values of the keys both search, with the same seeds
        attributed = _complete(load("baseline@xml", "reproductions", s))
        assert sorted(t.user_attrs["seed"] for t in attributed) == [1000, 2000]
        expect = {k: v for k, v in best[("xml", s)].items() if k in BASE_KEYS}
        assert all(t.user_attrs["params"] == expect for t in attributed)
        assert 5 <= expect["loss.options.alpha"] <= 6
    # search 1's sampler has its own seed, general.seed + 1000003: its first proposal is that of a fresh TPE sampler
    # with that seed (the search space as the config marks it)
    overrides = tiny_overrides(tmp, **FAST)
    space = C.search_space(method_config(C.load({}, overrides, presets=C.presets_for({}, overrides)), "baseline"))
    probe = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=1_000_003, n_startup_trials=1))
    trial = probe.ask()
    first = {path: C.suggest(trial, path, marker) for path, marker in space.items()}
    slot0 = next(t for t in load("baseline", "search", 1).get_trials() if t.user_attrs.get("slot") == 0
                 and t.state == optuna.trial.TrialState.COMPLETE)
    assert slot0.params == pytest.approx(first)
    slot0_search0 = next(t for t in _complete(load("baseline", "search", 0)) if t.user_attrs["slot"] == 0)
    assert slot0_search0.params != slot0.params

    # every paired number of report.csv recomputed from reproductions.csv
    reps = _csv(folder / "reproductions.csv")
    assert list(reps[0]) == ["dataset", "method", "reproduction", "seed", "fold", "embedding", "metric", "value",
                             "search"]
    values = {}
    for r in reps:
        if r["embedding"] != "fold":
            key = (r["method"], r["search"], r["embedding"], r["metric"])
            values.setdefault(key, {})[r["seed"]] = float(r["value"])
    report = _csv(folder / "report.csv")
    paired = [r for r in report if r["reference"]]
    assert {r["comparison"] for r in paired} == {"equal_budget", "equal_params", "over_searches"}
    per_search = {}
    checked = 0
    for r in paired:
        if r["comparison"] == "over_searches":
            continue
        other = "baseline" if r["comparison"] == "equal_budget" else "baseline@xml"
        a, b = values[("xml", r["search"], r["embedding"], r["metric"])], values[(other, r["search"], r["embedding"],
                                                                                  r["metric"])]
        d = np.array([a[s] - b[s] for s in sorted(a)])
        assert r["search"] in ("0", "1") and int(r["n"]) == len(d) == 2
        assert float(r["mean"]) == pytest.approx(d.mean(), abs=1e-12)
        if d.std() > 0:
            assert float(r["p_value"]) == pytest.approx(stats.ttest_rel(list(a.values()), [b[s] for s in a]).pvalue,
                                                        rel=1e-9)
            checked += 1
        if r["comparison"] == "equal_budget":
            per_search.setdefault((r["embedding"], r["metric"]), {})[r["search"]] = d.mean()
    assert checked
    over = [r for r in paired if r["comparison"] == "over_searches"]
    assert {(r["embedding"], r["metric"]) for r in over} == set(per_search)
    for r in over:  # the mean of the two searches' mean differences, its t-interval over the 2 searches
        m = np.array([per_search[(r["embedding"], r["metric"])][s] for s in ("0", "1")])
        assert r["search"] == "" and r["n"] == "2" and float(r["mean"]) == pytest.approx(m.mean(), abs=1e-12)
        half = stats.t.ppf(0.975, 1) * m.std(ddof=1) / math.sqrt(2)
        assert float(r["ci95"] or "nan") == pytest.approx(half, rel=1e-9, abs=1e-15)
    boot = [r for r in paired if r["boot_resamples"]]
    assert sorted(r["search"] for r in boot) == ["0", "1"] and all(r["endpoint"] == "primary" for r in boot)
    md = (folder / "report.md").read_text()
    assert "(2 searches)" in md and "Verdicts over searches" in md and "xml search 1" in md
    assert "One search per method" not in md and "Attribution: each method against `baseline`" in md

    # rerunning trains nothing, proposes nothing and writes the same report
    runs = sorted((folder / "runs").rglob("result.json"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    before, log_lines = (folder / "report.csv").read_text(), len((folder / "log.txt").read_text().splitlines())
    code, out, err = run_main(capsys, argv)
    assert code == 0, err[-3000:]
    assert [p.stat().st_mtime_ns for p in sorted((folder / "runs").rglob("result.json"))] == stamps
    assert (folder / "report.csv").read_text() == before
    assert len((folder / "log.txt").read_text().splitlines()) == log_lines
