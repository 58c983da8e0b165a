"""The fair-comparison protocol end to end on tiny data: search budgets, reproductions, report, resume after kill -9,
NaN trials, several workers sharing one storage (SQLite here; PostgreSQL when XML_PLUGIN_TEST_POSTGRES_URL is set)."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch

import xml_plugin
from xml_plugin import config as C
from xml_plugin.protocol import slots
from xml_plugin.engine.diagnostics import EMBEDDING_KEYS
from xml_plugin.protocol.experiment import Experiment

from conftest import as_cli_args, tiny_overrides

REPO = Path(__file__).resolve().parent.parent
TINY = Path(__file__).resolve().parent / "tiny.py"


def _trials(exp, method, part="search"):
    """The trials of a study as any Optuna client sees them (no set-up of the experiment needed)."""
    return optuna.load_study(study_name=f"{exp.name}.{method}.{part}", storage=exp.storage_url).get_trials(deepcopy=False)


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_full_job_budgets_reproductions_report(tiny_cfg):
    cfg = tiny_cfg(**{"general.n_trials": 3})
    exp = Experiment(cfg, "full", progress=False)
    md = exp.run()
    # the same budget for every method: both search multi-similarity's keys, XML also its lambda
    xml_done = [t for t in _trials(exp, "xml") if t.state == optuna.trial.TrialState.COMPLETE]
    base_done = [t for t in _trials(exp, "baseline") if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(xml_done) == 3 and len(base_done) == 3
    assert {t.user_attrs["slot"] for t in xml_done} == {t.user_attrs["slot"] for t in base_done} == {0, 1, 2}
    loss_keys = {"loss.options.alpha", "loss.options.beta", "loss.options.base"}
    assert all(set(t.params) == loss_keys for t in base_done)
    assert all(set(t.params) == loss_keys | {"loss_wrapper.options.lam"} for t in xml_done)
    assert all(0.01 <= t.params["loss_wrapper.options.lam"] <= 10 and 0.01 <= t.params["loss.options.alpha"] <= 50
               for t in xml_done)
    assert "Unequal budgets" not in md
    # each trial's value is the mean of its folds' validation MAP@R
    for t in xml_done:
        folds = [t.user_attrs[f"fold{f}"]["mean_average_precision_at_r"] for f in range(4)]
        assert t.value == pytest.approx(sum(folds) / 4)
    reps = [t for t in _trials(exp, "xml", "reproductions") if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["seed"] for t in reps) == [1000, 2000]
    report = _csv(exp.folder / "report.csv")
    rows = [r for r in report if not r["reference"] and r["metric"] not in EMBEDDING_KEYS]
    assert list(rows[0])[:9] == ["dataset", "method", "embedding", "metric", "mean", "ci95", "n", "reference", "verdict"]
    # the embedding-space measures: one mean row per method and measure, over the 2 reproductions
    space = [r for r in report if r["metric"] in EMBEDDING_KEYS]
    assert {(r["method"], r["metric"]) for r in space} == {(m, k) for m in ("baseline", "xml") for k in EMBEDDING_KEYS}
    assert {r["n"] for r in space} == {"2"} and {r["embedding"] for r in space} == {"concatenated"}
    # one search: the headline says the verdict does not cover the search; the bootstrap interval is beside it
    assert "not covered (one search)" in md and "does not cover" not in md.split("## ")[0]
    assert "One search per method: the verdict covers the reproductions' seeds" in md
    primary = [r for r in report if r["reference"] and r["comparison"] == "equal_budget" and r["endpoint"] == "primary"]
    assert len(primary) == 1 and primary[0]["boot_resamples"] == "1000"
    assert float(primary[0]["boot_low"]) <= float(primary[0]["boot_high"])
    # attribution: both searches drew the same shared values first (every trial scores 1.0, the first is the best), so
    # the baseline at XML's parameters is the baseline itself and the equal-parameter rows equal the equal-budget ones
    assert exp.search_summary("xml")["best"]["loss.options.alpha"] == exp.search_summary("baseline")["best"][
        "loss.options.alpha"]
    by = {(r["comparison"], r["embedding"], r["metric"]): r for r in report if r["reference"]}
    attributed = [k for k in by if k[0] == "equal_params"]
    assert attributed and all(by[k]["mean"] == by[("equal_budget",) + k[1:]]["mean"] for k in attributed)
    assert "Attribution: each method against `baseline`" in md
    metrics = ["precision_at_1", "r_precision", "mean_average_precision_at_r"] + [
        f"recall_at_{k}" for k in cfg["eval"]["recall_at"]]  # the tiny test set is larger than 8: every K is kept
    assert sorted({r["metric"] for r in rows}) == sorted(metrics)
    assert len(rows) == 2 * 2 * len(metrics) and {r["n"] for r in rows} == {"2"}
    # the separate mean is the mean over reproductions of the folds' mean
    sep = [r for r in rows if r["method"] == "xml" and r["embedding"] == "separate" and r["metric"] == "precision_at_1"][0]
    expect = sum(t.user_attrs["separate"]["precision_at_1"] for t in reps) / 2
    assert float(sep["mean"]) == pytest.approx(expect)
    assert "baseline" in md and "xml" in md and (exp.folder / "report.tex").is_file()
    for name in ("optimization_history.png", "final_metrics.png", "retrieval_xml.png", "objective_vs_lam.png"):
        assert (exp.folder / name).stat().st_size > 1000, name
    assert (exp.folder / "splits.json").is_file() and (exp.folder / "config.yaml").is_file()
    # the studies are standard Optuna studies: the optuna command line lists them with their trial counts
    optuna_cli = Path(sys.executable).parent / "optuna"
    if optuna_cli.is_file():
        listing = subprocess.run([str(optuna_cli), "studies", "--storage", exp.storage_url, "-f", "json"],
                                 capture_output=True, text=True, timeout=120)
        assert listing.returncode == 0, listing.stderr[-2000:]
        studies = {s["name"]: s["n_trials"] for s in __import__("json").loads(listing.stdout)}
        assert studies["full.xml.search"] == len(_trials(exp, "xml")) and "full.baseline.reproductions" in studies
    # rerunning the finished job trains nothing and makes the same report
    before = (exp.folder / "report.csv").read_text()
    runs = sorted(p for p in (exp.folder / "runs").rglob("result.json"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    Experiment(cfg, "full", progress=False).run()
    assert (exp.folder / "report.csv").read_text() == before
    assert [p.stat().st_mtime_ns for p in runs] == stamps


def test_nonfinite_trials_fail_with_reason_and_the_study_goes_on(tiny_cfg):
    class SometimesNan(torch.nn.Module):
        def __init__(self, explode: bool = False):
            super().__init__()
            self.explode = explode
            self.inner = xml_plugin.build("loss", "multi_similarity")

        def forward(self, embeddings, labels, indices_tuple=None):
            loss = self.inner(embeddings, labels, indices_tuple)
            return loss * float("nan") if self.explode else loss

    xml_plugin.register("loss", SometimesNan, name="sometimes_nan")
    try:
        cfg = tiny_cfg(**{"general.methods": ["baseline"], "general.n_trials": 4, "general.reproductions": 1,
                          "loss": {"name": "sometimes_nan",
                                   "options": {"explode": {"search": "categorical", "choices": [False, True]}}}})
        exp = Experiment(cfg, "nan", progress=False)
        exp.run()
        trials = [t for t in _trials(exp, "baseline") if t.user_attrs.get("fail_reason") != "surplus"]
        failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert failed and done and len(failed) + len(done) == 4
        assert all(t.params["loss.options.explode"] for t in failed)
        assert all(t.user_attrs["fail_reason"].startswith("nonfinite") and "nan" in t.user_attrs["fail_reason"] for t in failed)
        assert not any(t.params["loss.options.explode"] for t in done)
    finally:
        xml_plugin.unregister("loss", "sometimes_nan")


def test_slots_are_claimed_once_even_when_two_trials_race(tmp_path):
    storage = slots.make_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1)
    study = optuna.create_study(study_name="s", storage=storage)
    a, b = study.ask(), study.ask()  # two workers asked at the same time
    assert slots.claim(study, a, 2) == 0
    assert slots.claim(study, b, 2) == 1
    c = study.ask()
    assert slots.claim(study, c, 2) is None  # budget of 2 exhausted
    assert study.trials[c.number].user_attrs["fail_reason"] == "surplus"
    # a rival that claimed the same slot with a smaller number wins
    d = study.ask()
    d.set_user_attr("slot", 0)
    assert slots.claim(study, d, 3) is None


def _tiny_cmd(tmp_path, name, *extra):
    return [sys.executable, str(TINY), "--experiment_name", name, "--no_progress",
            *as_cli_args(tiny_overrides(tmp_path, **{"trainer.max_epochs": 3, "trainer.iterations_per_epoch": 10})),
            *extra]


def _wait_for(pred, timeout, what):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def test_kill_9_mid_trial_then_resume_gives_the_uninterrupted_report(tmp_path):
    clean = subprocess.run(_tiny_cmd(tmp_path / "a", "job"), cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    folder = tmp_path / "b" / "experiments" / "job"
    proc = subprocess.Popen(_tiny_cmd(tmp_path / "b", "job"), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:  # kill -9 in the middle of an XML search trial: some folds done, one with a checkpoint
        _wait_for(lambda: len(list((folder / "runs" / "xml").glob("*/result.json"))) >= 1
                  and list((folder / "runs" / "xml").glob("*/checkpoint.pt")), 300, "a mid-trial checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    exp_cfg = C.load({}, tiny_overrides(tmp_path / "b"))
    exp = Experiment(exp_cfg, "job", progress=False)
    assert any(t.state == optuna.trial.TrialState.RUNNING for t in _trials(exp, "xml"))
    resumed = subprocess.run(_tiny_cmd(tmp_path / "b", "job"), cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (folder / "report.csv").read_text() == (tmp_path / "a" / "experiments" / "job" / "report.csv").read_text()
    trials = _trials(exp, "xml")
    assert len([t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]) == 2
    died = [t for t in trials if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("fail_reason") != "surplus"]
    assert len(died) == 1  # the killed trial was failed, and retried with its slot and parameters
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == died[0].number]
    assert retried and retried[0].params == died[0].params and retried[0].user_attrs["slot"] == died[0].user_attrs["slot"]


def _storage_urls(tmp_path):
    urls = [f"sqlite:///{tmp_path / 'shared.db'}"]
    if os.environ.get("XML_PLUGIN_TEST_POSTGRES_URL"):
        urls.append(os.environ["XML_PLUGIN_TEST_POSTGRES_URL"])
    return urls


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_share_the_work_one_killed(tmp_path, backend):
    if backend == "postgresql":
        url = os.environ.get("XML_PLUGIN_TEST_POSTGRES_URL")
        if not url:
            pytest.skip("set XML_PLUGIN_TEST_POSTGRES_URL (bash .ci/run starts a PostgreSQL server and sets it)")
    else:
        url = f"sqlite:///{tmp_path / 'shared.db'}"
    name = f"w{uuid.uuid4().hex[:8]}"  # a fresh study name in a shared database
    cmd = _tiny_cmd(tmp_path, name, "--storage", url, "--general.n_trials", "4")
    w1 = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    w2 = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "experiments" / name
    try:
        _wait_for(lambda: list((folder / "runs" / "xml").glob("*/checkpoint.pt")) if (folder / "runs" / "xml").is_dir()
                  else False, 300, "an XML trial in progress")
        w2.send_signal(signal.SIGKILL)  # one worker dies mid-trial
        w2.wait()
        out, err = w1.communicate(timeout=900)
        assert w1.returncode == 0, err[-3000:]
    finally:
        for w in (w1, w2):
            if w.poll() is None:
                w.kill()
    cfg = C.load({}, tiny_overrides(tmp_path, **{"general.storage": url, "general.n_trials": 4}))
    exp = Experiment(cfg, name, progress=False)
    xml_trials = _trials(exp, "xml")
    complete = [t for t in xml_trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4 and sorted(t.user_attrs["slot"] for t in complete) == [0, 1, 2, 3]
    base = [t for t in _trials(exp, "baseline") if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["slot"] for t in base) == [0, 1, 2, 3]  # the same budget as XML
    reps = [t for t in _trials(exp, "xml", "reproductions") if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["slot"] for t in reps) == [0, 1]
    rows = [r for r in _csv(folder / "report.csv") if not r["reference"] and r["metric"] not in EMBEDDING_KEYS]
    assert len(rows) == 2 * 2 * (3 + len(cfg["eval"]["recall_at"])) and {r["n"] for r in rows} == {"2"}


def test_workers_creating_a_new_storage_at_once_do_not_crash(tmp_path):
    # several processes open the same new SQLite file at the same moment: the schema creation races
    code = ("import sys, time; from xml_plugin.protocol import slots; import optuna; "
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "  # all start at the same instant
            "s = slots.make_storage(sys.argv[1]); "
            "optuna.create_study(study_name='x', storage=s, load_if_exists=True); print('ok')")
    url = f"sqlite:///{tmp_path / 'new.db'}"
    start = str(time.time() + 8)
    procs = [subprocess.Popen([sys.executable, "-c", code, url, start], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-500:] for o in outs]
    assert all(o[0].strip() == "ok" for o in outs)


def test_a_failed_reproduction_is_reported_and_left_out(tiny_cfg, monkeypatch):
    from xml_plugin.engine import train as T
    cfg = tiny_cfg(**{"general.methods": ["baseline"], "general.reproductions": 2})
    exp = Experiment(cfg, "repfail", progress=False)
    real = T.train_fold

    def flaky(ccfg, ctx, tr, va, run_dir, seed, **kw):
        if seed == 2000:  # the second reproduction's seed
            raise T.NonFiniteLossError("training loss is nan at epoch 0, iteration 0")
        return real(ccfg, ctx, tr, va, run_dir, seed, **kw)
    monkeypatch.setattr(T, "train_fold", flaky)
    exp.run()
    rows = _csv(exp.folder / "report.csv")
    assert rows and {r["n"] for r in rows} == {"1"}  # only the successful reproduction is averaged
    reps = _trials(exp, "baseline", "reproductions")
    assert sorted(t.state.name for t in reps) == ["COMPLETE", "FAIL"]


def test_reproductions_csv_recomputes_means_and_paired_intervals(tiny_cfg):
    """Every number of report.csv follows from reproductions.csv (recomputed here with scipy), and the verdicts
    follow from the paired intervals."""
    import numpy as np
    from scipy import stats

    cfg = tiny_cfg(**{"general.n_trials": 1, "general.reproductions": 3, "trainer.iterations_per_epoch": 2,
                      "trainer.max_epochs": 1, "embedder.size": 4})
    exp = Experiment(cfg, "paired", progress=False)
    md = exp.run()
    reps = _csv(exp.folder / "reproductions.csv")
    assert list(reps[0]) == ["dataset", "method", "reproduction", "seed", "fold", "embedding", "metric", "value",
                             "search"] and {r["search"] for r in reps} == {""}  # one search
    values = {}
    for r in reps:
        values.setdefault((r["method"], r["embedding"], r["metric"]), {}).setdefault(r["seed"], []).append(
            (r["fold"], float(r["value"])))
    # separate = the mean of the four fold models' metrics of that reproduction
    for (method, emb, metric), by_seed in values.items():
        if emb != "separate":
            continue
        for seed, ((fold, v),) in by_seed.items():
            folds = [x for f, x in values[(method, "fold", metric)][seed]]
            assert fold == "" and len(folds) == 4 and v == pytest.approx(np.mean(folds), abs=1e-12)
    report = _csv(exp.folder / "report.csv")
    means = [r for r in report if not r["reference"]]
    diffs = [r for r in report if r["reference"]]
    assert means and diffs and {r["reference"] for r in diffs} == {"baseline"} and {r["method"] for r in diffs} == {"xml"}
    for r in means:
        x = np.array([v for [(f, v)] in values[(r["method"], r["embedding"], r["metric"])].values()])
        assert len(x) == int(r["n"]) == 3
        assert float(r["mean"]) == pytest.approx(x.mean(), abs=1e-12)
        if x.std() > 0:
            lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
            assert float(r["ci95"]) == pytest.approx((hi - lo) / 2, rel=1e-9)
    nontrivial = 0
    assert {r["comparison"] for r in diffs} == {"equal_budget", "equal_params"}
    for r in diffs:  # equal_params: XML against the baseline at XML's parameters, rows baseline@xml
        a = values[("xml", r["embedding"], r["metric"])]
        b = values[("baseline" if r["comparison"] == "equal_budget" else "baseline@xml", r["embedding"], r["metric"])]
        d = np.array([a[s][0][1] - b[s][0][1] for s in sorted(a)])  # paired by seed
        assert float(r["mean"]) == pytest.approx(d.mean(), abs=1e-12)
        if d.std() > 0:
            nontrivial += 1
            lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
            assert float(r["ci95"]) == pytest.approx((hi - lo) / 2, rel=1e-9)
            assert r["verdict"] == ("better" if lo > 0 else "worse" if hi < 0 else "no difference detected")
    assert nontrivial  # the tiny run is not degenerate: some differences vary between seeds
    assert "Paired differences with `baseline`" in md and "| xml | Sep. |" in md


def test_search_none_and_a_loss_with_nothing_to_search_run_every_method_once(tiny_cfg):
    for name, extra in (("none", {"search.mode": "none"}), ("npairs", {"loss": {"name": "n_pairs"}})):
        cfg = tiny_cfg(**{"general.reproductions": 1, "general.n_trials": 3, **extra})
        exp = Experiment(cfg, name, progress=False)
        md = exp.run()
        for method in ("baseline", "xml"):
            trials = [t for t in _trials(exp, method) if t.user_attrs.get("fail_reason") != "surplus"]
            assert len(trials) == 1 and trials[0].params == {}, (name, method)
        # the markers' defaults were used: XML's lambda its marker default in config_methods/xml.yaml (0.1), alpha PML's 2.0
        xml = exp.method_config("xml")
        assert xml["loss_wrapper"]["options"]["lam"] == 0.1
        if name == "none":
            assert xml["loss"]["options"]["alpha"] == 2.0
        assert "Unequal budgets" not in md and "nothing searched" in md


def test_unequal_budgets_are_reported_in_bold(tiny_cfg):
    cfg = tiny_cfg(**{"general.reproductions": 1, "general.n_trials": 2, "search.mode": "all",
                      "loss": {"name": "n_pairs"}})  # baseline has nothing to search, xml has lambda
    exp = Experiment(cfg, "unequal", progress=False)
    md = exp.run()
    assert "**Unequal budgets" in md and "baseline: 1" in md and "xml: 2" in md
    assert md.index("**Unequal budgets") < md.index("| Method |")


def _protocol_imports():
    """{module: the protocol modules it imports} for every file of xml_plugin/protocol (imports inside functions
    included), read with ``ast`` without importing anything."""
    import ast
    folder = REPO / "xml_plugin" / "protocol"
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import y / from . import x, y
                    targets = [node.module] if node.module else [a.name for a in node.names]
                elif node.level == 0 and (node.module or "").startswith("xml_plugin.protocol"):
                    rest = node.module.removeprefix("xml_plugin.protocol").lstrip(".")
                    targets = [rest.split(".")[0]] if rest else [a.name for a in node.names]
                else:
                    targets = []
                found |= {t.split(".")[0] for t in targets if t.split(".")[0] in modules}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[2] for a in node.names
                          if a.name.startswith("xml_plugin.protocol.") and a.name.split(".")[2] in modules}
        graph[name] = found - {name}
    return graph


def test_layout_protocol_imports_run_one_way():
    graph = _protocol_imports()
    # sanity of the parser: edges that exist
    assert {"state", "identity", "search", "reproductions", "verdicts"} <= graph["experiment"]
    assert "verdicts" in graph["report"] and "state" in graph["search"]
    done, active, cycle = set(), [], []

    def visit(node):
        if node in active:
            cycle.extend(active[active.index(node):] + [node])
            return True
        if node in done:
            return False
        active.append(node)
        if any(visit(n) for n in sorted(graph[node])):
            return True
        active.pop()
        done.add(node)
        return False
    assert not any(visit(n) for n in sorted(graph)), " -> ".join(cycle)
    # the state is at the bottom; statistics, report writers and plots take plain data, never the experiment
    above_state = {"experiment", "identity", "search", "reproductions", "evaluate_saved", "reproduce_results"}
    assert not graph["state"] & above_state
    for plain in ("verdicts", "report", "plots", "measures"):
        assert not graph[plain] & (above_state | {"state", "workers", "slots"}), (plain, graph[plain])
