"""Report tables (summarize, write_report, compare) and the protocol's plots."""
import csv
import json
import math
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import stats

from xml_plugin.protocol import plots
from xml_plugin.protocol.report import (CSV_COLUMNS, EMBEDDINGS, METRICS, compare, paired_differences,
                                        read_report_csv, summarize, write_report)


def _records(dataset, method, values_by_metric, embeddings=EMBEDDINGS):
    """One record per (value, embedding, metric); concatenated values are shifted by +0.02."""
    out = []
    for metric, values in values_by_metric.items():
        for e in embeddings:
            for seed, v in enumerate(values):
                out.append(dict(dataset=dataset, method=method, embedding=e, metric=metric, seed=seed,
                                value=v + (0.02 if e == "concatenated" else 0.0)))
    return out


def _fake_records(dataset="cub", methods=(("baseline", 0.20), ("xml", 0.23)), n=4, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for method, base in methods:
        recs += _records(dataset, method, {m: list(base + 0.01 * i + rng.normal(0, 0.005, n))
                                           for i, m in enumerate(METRICS)})
    return recs


def test_summarize_ci_matches_student_t_formula():
    sample = [0.21, 0.25, 0.22, 0.19, 0.24]
    rows = summarize(_records("cub", "baseline", {"r_precision": sample}, embeddings=("separate",)))
    assert len(rows) == 1
    x = np.array(sample)
    expected = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    assert rows[0]["n"] == 5
    assert rows[0]["mean"] == pytest.approx(x.mean())
    assert rows[0]["ci95"] == pytest.approx(expected, rel=1e-12)
    # the same interval as scipy's own t.interval
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert rows[0]["ci95"] == pytest.approx((hi - lo) / 2)


def test_summarize_single_value_has_nan_ci_and_order():
    recs = (_records("sop", "xml", {"mean_average_precision_at_r": [0.3], "precision_at_1": [0.6]})
            + _records("cub", "xml", {"precision_at_1": [0.5, 0.6]})
            + _records("cub", "baseline", {"precision_at_1": [0.4, 0.5]}))
    rows = summarize(recs)
    keys = [(r["dataset"], r["method"], r["embedding"], r["metric"]) for r in rows]
    assert keys == [("cub", "xml", "separate", "precision_at_1"), ("cub", "xml", "concatenated", "precision_at_1"),
                    ("cub", "baseline", "separate", "precision_at_1"),
                    ("cub", "baseline", "concatenated", "precision_at_1"),
                    ("sop", "xml", "separate", "precision_at_1"),
                    ("sop", "xml", "separate", "mean_average_precision_at_r"),
                    ("sop", "xml", "concatenated", "precision_at_1"),
                    ("sop", "xml", "concatenated", "mean_average_precision_at_r")]
    sop = [r for r in rows if r["dataset"] == "sop"]
    assert all(r["n"] == 1 and math.isnan(r["ci95"]) for r in sop)
    with pytest.raises(ValueError, match="embedding"):
        summarize([dict(dataset="cub", method="x", embedding="both", metric="r_precision", value=0.1)])


def test_write_report_csv_md_tex(tmp_path):
    recs = _fake_records() + _records("cub", "gsp", {m: [0.9] for m in METRICS})  # gsp: n=1, best everywhere
    rows = summarize(recs)
    diffs = paired_differences(recs, "baseline")
    md = write_report(tmp_path, rows, "CUB", notes="Budget: 50 trials.", diffs=diffs)
    # csv: exact columns, one line per row, NaN written as empty
    with open(tmp_path / "report.csv", newline="") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == CSV_COLUMNS
    assert len(table) - 1 == len(rows) + len(diffs) == 3 * 2 * 3 + 2 * 2 * 3
    table = [line for line in table if not line[7]]  # the means (difference rows name their reference)
    gsp_lines = [line for line in table[1:] if line[1] == "gsp"]
    assert gsp_lines and all(line[5] == "" and line[6] == "1" for line in gsp_lines)
    back = [r for r in read_report_csv(tmp_path / "report.csv") if not r["reference"]]
    assert [r["mean"] for r in back] == pytest.approx([r["mean"] for r in rows])
    # markdown: written file equals returned text; a row per method; best (gsp, 90.00/92.00) in bold without interval
    assert (tmp_path / "report.md").read_text() == md
    assert "Budget: 50 trials." in md
    main_table = md.split("\n## cub\n")[1].split("Paired differences")[0]
    method_lines = [line for line in main_table.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    assert [line.split("|")[1].strip() for line in method_lines] == ["baseline", "xml", "gsp"]
    # bold exactly where the paired interval (recomputed here with scipy) lies above 0: xml everywhere (+3 points,
    # noise 0.5), gsp nowhere (one reproduction: no interval), however high its mean
    for metric in METRICS:
        for emb in EMBEDDINGS:
            pick = lambda m: [r["value"] for r in recs if (r["method"], r["metric"], r["embedding"]) == (m, metric, emb)]
            d = np.array(pick("xml")) - np.array(pick("baseline"))
            lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
            assert lo > 0
    assert md.count("**") // 2 == 6 + 6  # the 6 xml cells of the main table, the 6 of the difference table
    assert "**90.00" not in md and "**92.00" not in md
    xml_main = [line for line in md.splitlines() if line.startswith("| xml |")][0]
    assert xml_main.count("**") == 12
    assert "| gsp | Sep. |" in md and "no difference detected" in md
    xml_row = rows[[r["method"] for r in rows].index("xml")]
    cell = f"{100 * xml_row['mean']:.2f} ± {100 * xml_row['ci95']:.2f}"
    assert cell in method_lines[1]
    # tex
    tex = (tmp_path / "report.tex").read_text()
    _check_latex(tex)
    assert r"\textbf{90.00}" not in tex and tex.count(r"\textbf{") == 12


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_write_report_holm_attribution_bootstrap_and_searches(tmp_path):
    """The new paired rows: p_value / p_adjusted (recomputed here with scipy and a Holm step), verdicts in report.md
    Holm-adjusted for the secondary cells, the bootstrap beside the primary endpoint, the attribution table, the
    verdict over searches; compare() bolds by the same verdicts."""
    rng = np.random.default_rng(7)
    n = 5
    recs = []
    for method, shift in (("baseline", 0.0), ("xml", 0.006)):
        for e in EMBEDDINGS:
            for metric in METRICS:
                noise = rng.normal(0, 0.004, n)
                recs += [dict(dataset="cub", method=method, embedding=e, metric=metric, seed=s,
                              value=0.2 + 0.01 * s + (shift + noise[s] if method == "xml" else 0.0)) for s in range(n)]
    rows, diffs = summarize(recs), paired_differences(recs, "baseline")
    # attribution: "xml - baseline at xml's parameters", here a smaller effect
    attr_recs = [dict(r, value=r["value"] - (0.008 if r["method"] == "xml" else 0.0)) for r in recs]
    attribution = paired_differences(attr_recs, "baseline", comparison="equal_params")
    bootstrap = [dict(dataset="cub", method="xml", embedding="concatenated", metric="mean_average_precision_at_r",
                      reference="baseline", comparison="equal_budget", mean=0.01, n=n, boot_low=-0.0123,
                      boot_high=0.0345, boot_resamples=1000)]
    md = write_report(tmp_path, rows, "CUB", diffs=diffs, attribution=attribution, bootstrap=bootstrap)
    table = _csv_rows(tmp_path / "report.csv")
    assert tuple(table[0]) == CSV_COLUMNS[:len(table[0])] and len(CSV_COLUMNS) == len(table[0])
    paired = [r for r in table if r["reference"]]
    assert len(paired) == 2 * 2 * 3 and {r["comparison"] for r in paired} == {"equal_budget", "equal_params"}
    assert all(r["comparison"] == "" for r in table if not r["reference"])
    for comparison, source in (("equal_budget", recs), ("equal_params", attr_recs)):
        mine = [r for r in paired if r["comparison"] == comparison]
        p = []
        for r in mine:
            pick = lambda m: [x["value"] for x in source if (x["method"], x["embedding"], x["metric"])
                              == (m, r["embedding"], r["metric"])]
            p.append(stats.ttest_rel(pick("xml"), pick("baseline")).pvalue)
            assert float(r["p_value"]) == pytest.approx(p[-1], rel=1e-9)
        # Holm by hand over the 6 cells: sorted, (m - j) p_(j), running maximum
        order, m, running, holm = np.argsort(p), len(p), 0.0, [0.0] * len(p)
        for j, i in enumerate(order):
            running = max(running, min(1.0, (m - j) * p[i]))
            holm[i] = running
        assert [float(r["p_adjusted"]) for r in mine] == pytest.approx(holm, rel=1e-9)
        assert [r["endpoint"] for r in mine].count("primary") == 1
        prim = next(r for r in mine if r["endpoint"] == "primary")
        assert (prim["embedding"], prim["metric"]) == ("concatenated", "mean_average_precision_at_r")
    # the bootstrap's columns sit in the primary equal-budget row only
    booted = [r for r in paired if r["boot_resamples"]]
    assert len(booted) == 1 and booted[0]["comparison"] == "equal_budget" and booted[0]["endpoint"] == "primary"
    assert float(booted[0]["boot_low"]) == -0.0123 and int(booted[0]["boot_resamples"]) == 1000
    # report.md: the headline first, with the seed interval, the bootstrap beside it and the search caveat
    head = md.split("\n## cub\n")[0]
    assert "## Primary endpoint: MAP@R Concat." in head and "[-1.23, +3.45] (1000 resamples)" in head
    prim = next(d for d in diffs if d["endpoint"] == "primary")
    assert f"| cub | xml − baseline | {100 * prim['mean']:+.2f} ± {100 * prim['ci95']:.2f} |" in head
    assert "not covered (one search)" in head
    assert "not the search's own randomness" in head
    # verdicts shown: the interval's for the primary, Holm's (marked) for the others
    budget_table = md.split("Paired differences with `baseline`")[1].split("Attribution")[0]
    for d in diffs:
        shown = d["verdict"] if d["endpoint"] == "primary" else (
            ("better" if d["mean"] > 0 else "worse") if d["p_adjusted"] < 0.05 else "no difference detected")
        mark = "" if d["endpoint"] == "primary" else "†"
        assert f"{100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f} {shown}{mark}" in budget_table
    assert "Holm-adjusted p-values" in md
    overturned = [d for d in diffs if d["verdict"] == "better" and d["shown_verdict"] != "better"]
    assert overturned and any(d["shown_verdict"] == "better" for d in diffs)  # Holm changed some verdicts, not all
    # the attribution table, in md and tex
    attr_table = md.split("Attribution")[1]
    assert "| Method − baseline at the method's parameters |" in attr_table
    assert all(f"{100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f}" in attr_table for d in attribution)
    tex = (tmp_path / "report.tex").read_text()
    _check_latex(tex)
    assert "attribution (equal parameters)" in tex and r"Method $-$ baseline at the method's parameters" in tex
    # read back: the new columns parse; compare() bolds where report.md's verdict is better
    back = [r for r in read_report_csv(tmp_path / "report.csv") if r["reference"]]
    assert {r["comparison"] for r in back} == {"equal_budget", "equal_params"}
    assert sum(r["boot_resamples"] == 1000 for r in back) == 1
    cmp_md, _ = compare([tmp_path])
    xml_line = next(line for line in cmp_md.splitlines() if line.startswith("| xml |"))
    better = [d for d in diffs if (d["verdict"] if d["endpoint"] == "primary" else
                                   ("better" if d["mean"] > 0 and d["p_adjusted"] < 0.05 else "")) == "better"]
    assert xml_line.count("**") == 2 * len(better)


def test_write_report_verdict_over_searches(tmp_path):
    rng = np.random.default_rng(8)
    recs = []
    for search, shift in ((0, 0.012), (1, 0.001)):
        for method in ("baseline", "xml"):
            for e in EMBEDDINGS:
                recs += [dict(dataset="cub", method=method, embedding=e, metric="mean_average_precision_at_r", seed=s,
                              search=search, value=0.2 + 0.01 * s + (shift + rng.normal(0, 0.002) if method == "xml"
                                                                      else 0.0)) for s in range(4)]
    diffs = paired_differences(recs, "baseline")
    from xml_plugin.protocol.verdicts import over_searches_rows
    over = over_searches_rows(diffs)
    md = write_report(tmp_path, summarize(recs), "two searches", diffs=diffs, over_searches=over)
    prim = next(o for o in over if o["endpoint"] == "primary")
    head = md.split("\n## cub\n")[0]
    assert f"{100 * prim['mean']:+.2f} ± {100 * prim['ci95']:.2f} (2 searches)" in head
    assert "not the search's own randomness" not in head
    assert "| xml (search 0) | Sep. |" in md and "| xml (search 1) | Concat. |" in md
    assert "Verdicts over searches" in md
    table = _csv_rows(tmp_path / "report.csv")
    assert sorted(r["search"] for r in table if r["comparison"] == "equal_budget") == ["0", "0", "1", "1"]
    rows = [r for r in table if r["comparison"] == "over_searches"]
    assert len(rows) == 2 and all(r["n"] == "2" and r["search"] == "" for r in rows)
    # the headline verdict is the one over searches (its interval contains the search noise)
    assert prim["shown_verdict"] in [line for line in head.splitlines() if line.startswith("| cub |")][0]


def test_read_report_csv_of_the_earlier_format(tmp_path):
    (tmp_path / "report.csv").write_text(
        "dataset,method,embedding,metric,mean,ci95,n,reference,verdict\n"
        "cub,xml,separate,r_precision,0.25,0.01,3,,\n"
        "cub,xml,separate,r_precision,0.02,0.01,3,baseline,better\n")
    mean, diff = read_report_csv(tmp_path / "report.csv")
    assert mean["comparison"] == "" and diff["comparison"] == "equal_budget" and diff["endpoint"] is None
    assert math.isnan(diff["p_adjusted"]) and diff["boot_resamples"] is None
    md, _ = compare([tmp_path])  # its verdict (no Holm in that file) still makes the cell bold
    assert "**25.00 ± 1.00**" in md


def _check_latex(tex):
    depth = 0
    for ch in re.sub(r"\\[{}]", "", tex):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") >= 1
    for body in re.findall(r"\\begin\{tabular\}\{(\w+)\}(.*?)\\end\{tabular\}", tex, flags=re.S):
        spec, content = body
        ncols = len(spec)
        for line in content.splitlines():
            if not line.endswith(r"\\"):
                continue
            spans = sum(int(k) for k in re.findall(r"\\multicolumn\{(\d+)\}", line))
            cells = line.count("&") + 1 - len(re.findall(r"\\multicolumn", line)) + spans
            assert cells == ncols, line
    assert r"\toprule" in tex and r"\bottomrule" in tex


def test_compare_two_experiments(tmp_path):
    a, b = tmp_path / "ms_cub", tmp_path / "ms_cars"
    write_report(a, summarize(_fake_records("cub", seed=1)), "a")
    write_report(b, summarize(_fake_records("cars", methods=(("baseline", 0.3), ("gsp", 0.35)), seed=2)), "b")
    (a / "experiment.json").write_text(json.dumps({"loss": "multi_similarity"}))
    (b / "experiment.json").write_text(json.dumps({"loss": "multi_similarity"}))
    md, tex = compare([a, b], labels={"gsp": "GSP"})
    lines = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    labels = [line.split("|")[1].strip() for line in lines]
    assert labels == ["multi_similarity", "multi_similarity + xml", "multi_similarity + GSP"]
    header = md.splitlines()[0]
    assert header.count("cub") == 6 and header.count("cars") == 6
    # baseline row is filled for both datasets; the xml row has no cars cells, the GSP row no cub cells
    assert "–" not in lines[0]
    assert lines[1].count("–") == 6 and lines[2].count("–") == 6
    _check_latex(tex)
    assert r"multi\_similarity + GSP" in tex
    assert r"\multicolumn{6}{c}{cub}" in tex and r"\multicolumn{6}{c}{cars}" in tex
    # names= overrides experiment.json; the same label in two folders for the same cell is an error
    md2, _ = compare([a], names=["triplet"])
    assert "| triplet + xml |" in md2
    with pytest.raises(ValueError, match="names="):
        compare([a, a])


def test_compare_missing_report(tmp_path):
    write_report(tmp_path / "done", summarize(_fake_records()), "done")
    (tmp_path / "running").mkdir()
    with pytest.raises(FileNotFoundError, match=r"running[/\\]report\.csv.*finish"):
        compare([tmp_path / "done", tmp_path / "running"])


# ----------------------------------------------------------------------------- plots

def _check_png(path, min_size=(200, 150)):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        assert im.width >= min_size[0] and im.height >= min_size[1]
        assert len(set(im.convert("L").getdata())) > 2  # something was drawn


def _fake_trials(seed=0):
    rng = np.random.default_rng(seed)
    trials = []
    for method, base in (("baseline", 0.20), ("xml", 0.22)):
        for n in range(20):
            state = ["COMPLETE", "PRUNED", "FAIL"][n % 7 == 3 and 2 or (n % 5 == 4 and 1 or 0)]
            value = base + rng.normal(0, 0.01) if state == "COMPLETE" else (base - 0.03 if n % 2 else None)
            trials.append(dict(number=n, value=value, state=state, method=method,
                               params=dict(lam=float(10 ** rng.uniform(-2, 1)), lr=float(rng.uniform(1e-4, 1e-3)),
                                           assignment=["hard", "soft"][n % 2])))
    return trials


def test_plot_history_and_param(tmp_path):
    trials = _fake_trials()
    _check_png(plots.plot_history(trials, tmp_path / "history.png"))
    _check_png(plots.plot_param(trials, "assignment", tmp_path / "assignment.png"))
    import matplotlib.pyplot as plt
    assert plt.get_fignums() == []  # figures are closed
    # log x axis only for a positive parameter spanning more than 20x
    seen = {}
    real_save = plots._save

    def spy(fig, path):
        seen[path.name] = fig.axes[0].get_xscale()
        return real_save(fig, path)
    plots._save = spy
    try:
        plots.plot_param(trials, "lam", tmp_path / "lam.png")
        plots.plot_param(trials, "lr", tmp_path / "lr.png")
    finally:
        plots._save = real_save
    assert seen == {"lam.png": "log", "lr.png": "linear"}
    _check_png(tmp_path / "lam.png")


def test_plot_metrics(tmp_path):
    rows = summarize(_fake_records("cub") + _fake_records("cars", seed=3))
    _check_png(plots.plot_metrics(rows, tmp_path / "metrics.png"), min_size=(600, 400))


def test_plot_retrieval(tmp_path):
    def card(colour):
        im = Image.new("RGB", (60, 80), "white")
        ImageDraw.Draw(im).ellipse([10, 10, 50, 70], fill=colour)
        return im
    colours = ["red", "blue", "green"]
    queries, labels = [card(c) for c in colours], [0, 1, 2]
    neighbours = [[card(colours[(i + j) % 3]) for j in range(4)] for i in range(3)]
    neighbour_labels = [[(i + j) % 3 for j in range(4)] for i in range(3)]
    path = plots.plot_retrieval(queries, labels, neighbours, neighbour_labels, tmp_path / "retrieval.png", k=3)
    _check_png(path, min_size=(300, 300))
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    green, red = np.array([0x2C, 0xA0, 0x2C]), np.array([0xD6, 0x27, 0x28])
    assert (np.abs(pixels - green).sum(1) < 30).sum() > 100  # right-neighbour frames
    assert (np.abs(pixels - red).sum(1) < 30).sum() > 100  # wrong-neighbour frames
    with pytest.raises(ValueError, match="k=0"):
        plots.plot_retrieval(queries, labels, neighbours, neighbour_labels, tmp_path / "x.png", k=0)
