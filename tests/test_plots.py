"""plots.py on generated run folders with known numbers: every figure is a valid PNG (and PDF),
Table 1 (one row per method family) and its group means equal hand computations, the correlations
and their exact p-values equal an independent enumeration, results are chosen by their recorded
settings (README "Result files"), differences between two different attacks are refused, and missing
inputs skip a figure with one line. The result files are written by evaluate.py's and flatness.py's
own functions, so plots.py is tested on exactly their format."""
import csv
import itertools
import json
import math
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import pytest
import scipy.stats

import evaluate
import flatness
import plots
from common import UsageError
from conftest import run_script

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (folder, args, test RErr %, train RErr %, ES RErr %, RLoss, avg flatness, worst flatness, AutoAttack?)
# Test RErr / train / ES / flatness are rows of the paper's Table 1.
RUNS = [
    ("unlabeled", {"method": "unlabeled", "unlabeled_fraction": 0.7}, 48.9, 43.2, 48.9, 1.60, 0.32, 1.20, True),
    ("cyclic", {"lr_schedule": "cyclic", "epochs": 30}, 53.6, 35.4, 53.6, 1.75, 0.35, 1.50, True),
    ("awp", {"method": "awp", "xi": 0.005}, 54.3, 43.1, 53.6, 1.80, 0.35, 2.68, True),
    ("trades", {"method": "trades", "beta": 9}, 56.7, 15.8, 53.4, 2.10, 0.57, 2.25, True),
    ("wd", {"wd": 0.05}, 58.1, 32.8, 54.8, 2.40, 0.50, None, True),   # no worst-case flatness file
    ("mart", {"method": "mart", "beta": 6}, 61.0, 20.8, 54.7, 3.10, 0.73, 3.17, False),  # PGD only
    ("at", {}, 62.8, 10.7, 54.6, 3.90, 1.21, 6.48, True),
]
BASE_ARGS = {"method": "at", "epochs": 150, "lr": 0.05, "wd": 5e-4, "epsilon": 8 / 255, "lr_schedule": "multistep",
             "label_smoothing": 0.0, "label_noise": 0.0, "clip": 0.0, "ema": 0.0, "act": "relu", "autoaugment": False,
             "optimizer": "sgd", "batch_size": 128, "attack_steps": 7, "width": 16, "train_subset": 2000, "seed": 0,
             "momentum": 0.9, "nesterov": False, "versions": {"torch": "x"}}
OURS = {"source": "ours", "args": {}}  # load_model's info for a checkpoint of ours


def write(path, obj):
    path.write_text(json.dumps(obj))


def eval_file(folder, ckpt, rerr, rloss, train_rerr=None, autoattack=True, epoch=150, flags=()):
    """An evaluate.py result of folder/ckpt, written by evaluate.py's own functions: PGD RErr 2 points
    below AutoAttack's (or `rerr` itself without AutoAttack)."""
    args = evaluate.parse_args([str(folder / ckpt), *flags] + ([] if train_rerr is None else ["--train"])
                               + ([] if autoattack else ["--no-autoattack"]))
    args.data_dir = "/data"
    settings, non_default = evaluate.eval_settings(args, OURS)
    pgd = {"rloss": rloss, "rerr": rerr - 0.02 if autoattack else rerr, "rloss_correct": rloss / 2,
           "rloss_incorrect": rloss * 2, "n_correct": 800, "n_incorrect": 200, "n": args.n_eval}
    aa = {"rerr": rerr, "rerr_any": rerr, "n": args.n_eval, "max_linf": 8 / 255} if autoattack else None
    result = {"epoch": epoch, "clean": {"loss": 0.5, "err": 0.2, "n": 10000}, "pgd": pgd, "autoattack": aa}
    if train_rerr is not None:
        result["train"] = {"pgd": {**pgd, "rloss": rloss / 3, "rerr": train_rerr},
                           "autoattack": {**aa, "rerr": train_rerr} if autoattack else None}
    path = evaluate.result_path(folder, settings)
    evaluate.write_result(path, settings, non_default, "0" * 64, result)
    return path


def flat_file(folder, ckpt, mode, epoch=150, flags=(), **result):
    """A flatness.py result of folder/ckpt for `mode`, written by flatness.py's own functions."""
    args = flatness.parse_args([str(folder / ckpt), "--mode", mode, *flags])
    args.data_dir = "/data"
    settings, non_default = flatness.flatness_settings(args, OURS, mode)
    n = {"average": args.n_eval, "worst": args.n_eval, "landscape": args.n_landscape, "hessian": args.n_hessian}[mode]
    path = evaluate.result_path(folder, settings)
    evaluate.write_result(path, settings, non_default, "0" * 64, {"n": n, "epoch": epoch, **result})
    return path


def flat_value(folder, ckpt, mode, value, reference, epoch=150, flags=()):
    """Average- or worst-case flatness `value` over the reference RLoss `reference`."""
    return flat_file(folder, ckpt, mode, epoch, flags, value=value, reference=reference,
                     values=[reference + value] * 10)


def metrics_lines(epochs=30, best=12):
    lines = []
    for e in range(1, epochs + 1):
        m = {"epoch": e, "lr": 0.05, "train_loss": 2.2 - 1.5 * e / epochs, "train_err": 0.8 - 0.6 * e / epochs,
             "train_time_s": 1.0, "test_clean_loss": 1.0, "test_clean_err": 0.3,
             "test_rloss": 2.0 + 0.05 * abs(e - best), "test_rerr": 0.55 + 0.005 * abs(e - best),
             "test_rloss_correct": 1.5, "test_rloss_incorrect": 3.0 + 0.02 * e, "test_n": 1280, "time_s": 1.2}
        if e % 3 == 0 or e == epochs:
            m.update(es_rerr=0.56 + 0.004 * abs(e - best), es_rloss=2.0)
        lines.append(json.dumps(m))
    return "\n".join(lines) + "\n"


def landscape(folder, offset=0.0, flags=()):
    s = np.linspace(-1, 1, 51)
    return flat_file(folder, "ckpt_last.pt", "landscape", flags=flags, s=s.tolist(),
                     random={"robust": [(3 + offset + 2 * s**2 + 0.1 * k).tolist() for k in range(10)],
                             "clean": [(0.5 + s**2).tolist() for _ in range(10)]},
                     adversarial={"robust": [(3 + offset + 8 * s**2).tolist() for _ in range(10)]})


def make_runs(root):
    """Seven Table 1 rows with evaluation and flatness results; the AT baseline also has per-snapshot
    flatness and Hessians, landscapes (also of its ×2 / ×0.5 rescaled copies) and a rescaled Hessian; plus
    one unreadable file, one file without settings and one run without results."""
    for name, extra, test, train, es, rloss, avg, worst, aa in RUNS:
        d = root / name
        d.mkdir(parents=True)
        write(d / "args.json", {**BASE_ARGS, **extra})
        (d / "metrics.jsonl").write_text(metrics_lines())
        eval_file(d, "ckpt_last.pt", test / 100, rloss, train / 100, aa)
        eval_file(d, "ckpt_best.pt", es / 100, rloss * 0.6, None, aa, epoch=60)
        flat_value(d, "ckpt_last.pt", "average", avg, rloss)
        flat_value(d, "ckpt_best.pt", "average", avg / 2, rloss * 0.6, 60)
        # train-example and clean-loss flatness are told apart by their settings
        flat_value(d, "ckpt_last.pt", "average", avg * 0.8, rloss / 3, flags=["--subset", "train-eval"])
        flat_value(d, "ckpt_last.pt", "average", 9.0, 0.5, flags=["--loss", "clean"])
        if worst is not None:
            flat_value(d, "ckpt_last.pt", "worst", worst, rloss)
    at = root / "at"
    for e in (5, 10, 15, 20, 25, 30):
        ck = f"ckpt_epoch{e:03d}.pt"
        flat_value(at, ck, "average", 0.1 * e, 1 + 0.05 * e, e)
        flat_value(at, ck, "worst", 0.2 * e, 1 + 0.05 * e, e)
        flat_file(at, ck, "hessian", e, eigenvalue=100.0 * e)
    landscape(at)
    landscape(at, 0.2, flags=["--scale", "2"])
    landscape(at, 0.4, flags=["--scale", "0.5"])
    # a rescaled copy (--scale 2, the §3.2 check) must not replace the run's own values
    flat_value(at, "ckpt_last.pt", "average", 99.0, 3.9, flags=["--scale", "2"])
    flat_file(at, "ckpt_last.pt", "hessian", flags=["--scale", "2"], eigenvalue=1.0)
    (at / "eval_broken.json").write_text("{not json")
    write(at / "eval.json", {"pgd": {"rloss": 1.0}, "checkpoint": "ckpt_last.pt"})  # the format before settings
    empty = root / "no_results"
    empty.mkdir()
    write(empty / "args.json", {**BASE_ARGS, "label_noise": 0.4})
    return root


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    root = make_runs(tmp_path_factory.mktemp("runs"))
    out = tmp_path_factory.mktemp("figures")
    summary = plots.main([str(root), "--out", str(out), "--formats", "png", "--dpi", "50"])  # PDF: below
    return root, out, summary


FIGURES = ["fig1_rloss_vs_flatness", "fig2_robust_overfitting", "fig4_landscape", "fig5_training_curves",
           "fig6_flatness_over_training_at", "fig8_rloss_flatness", "fig9_generalisation"]


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # something is drawn


@pytest.mark.parametrize("name", FIGURES)
def test_every_figure_is_a_valid_png(drawn, name):
    _, out, summary = drawn
    assert_png(out / f"{name}.png")
    assert str(out / f"{name}.png") in summary["written"]


def test_fig7_draws_one_trend_line_per_swept_method(tmp_path, monkeypatch):
    """Fig. 7 needs sweeps: TRADES β ∈ {1, 3, 9} and label noise ∈ {0.2, 0.4} plus the baseline."""
    points = [{"run": f"r{i}", "label": lab, "family": fam, "sweep": v, "marker": "o", "rloss": y, "flat_avg": x}
              for i, (lab, fam, v, x, y) in enumerate([
                  ("TRADES β=1", "TRADES", 1, 1.0, 3.0), ("TRADES β=3", "TRADES", 3, 0.8, 2.5),
                  ("TRADES β=9", "TRADES", 9, 0.5, 2.0), ("AT label-noise=0.2", "AT label-noise", 0.2, 0.9, 3.2),
                  ("AT label-noise=0.4", "AT label-noise", 0.4, 0.4, 2.2), ("AT", "AT", 0, 1.2, 3.9)])]
    points.append({"run": "no_flatness", "label": "AT wd=0.05", "family": "AT wd", "sweep": 0.05, "marker": "o",
                   "rloss": 2.0})
    colours = plots.family_colours(points)
    assert colours["AT"] == plots.GREY
    written, log = [], plots.Log()
    monkeypatch.setitem(plots.SAVE, "formats", ("png", "pdf"))
    plots.fig7(points, colours, tmp_path, log, written)
    assert_png(tmp_path / "fig7_hyperparameters.png")
    assert (tmp_path / "fig7_hyperparameters.pdf").read_bytes()[:5] == b"%PDF-"
    assert log.lines == ["fig7: left out: no_flatness (no average-case flatness of ckpt_last.pt)"]


def test_labels_say_method_and_differing_flags(drawn):
    _, _, summary = drawn
    labels = {r["run"]: r["label"] for r in summary["runs"]}
    # cyclic's 30 epochs (the paper's for that schedule) is run length, not what the row varies
    assert labels == {"at": "AT", "awp": "AWP ξ=0.005", "cyclic": "AT schedule=cyclic",
                      "mart": "MART β=6", "trades": "TRADES β=9", "unlabeled": "AT+unlabeled fraction=0.7",
                      "wd": "AT wd=0.05", "no_results": "AT label-noise=0.4"}


def test_table1_order_sources_and_group_means(drawn):
    _, out, _ = drawn
    t = json.loads((out / "table1.json").read_text())
    assert [r["run"] for r in t["rows"]] == ["unlabeled", "cyclic", "awp", "trades", "wd", "mart", "at"]
    assert [r["rerr_test_source"] for r in t["rows"]] == ["AutoAttack"] * 5 + ["PGD", "AutoAttack"]
    # np.percentile([48.9, 53.6, 54.3, 56.7, 58.1, 61.0, 62.8], 30) = 53.6 + 0.8·0.7 = 54.16 → 54;
    # 70th: 58.1 + 0.2·2.9 = 58.68 → 59 (rounded to whole percent, as the paper's 57 / 60)
    assert t["percentiles"] == pytest.approx([54.16, 58.68])
    assert t["thresholds"] == [54.0, 59.0]
    g = {x["group"]: x for x in t["groups"]}
    assert [g[k]["n"] for k in ("Good", "Average", "Poor")] == [2, 3, 2]
    assert g["Good"]["rerr_test"] == pytest.approx((48.9 + 53.6) / 2)
    assert g["Good"]["rerr_train"] == pytest.approx((43.2 + 35.4) / 2)
    assert g["Good"]["train_minus_test"] == pytest.approx(((43.2 - 48.9) + (35.4 - 53.6)) / 2)
    assert g["Average"]["rerr_test"] == pytest.approx((54.3 + 56.7 + 58.1) / 3)
    assert g["Average"]["flat_avg"] == pytest.approx((0.35 + 0.57 + 0.50) / 3)
    assert g["Average"]["flat_worst"] == pytest.approx((2.68 + 2.25) / 2)  # wd has no worst-case file
    assert g["Average"]["rerr_es"] == pytest.approx((53.6 + 53.4 + 54.8) / 3)
    assert g["Poor"]["es_minus_test"] == pytest.approx(((54.7 - 61.0) + (54.6 - 62.8)) / 2)
    md = (out / "table1.md").read_text()
    assert "| 1 | AT+unlabeled fraction=0.7 | 48.9 | 43.2 (−5.7) | 0.32 | 1.20 | 48.9 (+0.0) | Good |" in md
    assert "| 6 | MART β=6 | 61.0† |" in md  # PGD-only values are marked
    assert "**Good** (mean of 2; RErr < 54 %) | 51.2 |" in md or "**Good** (mean of 2; RErr < 54 %) | 51.3 |" in md
    assert "54.16 % / 58.68 %" in md
    with open(out / "table1.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows[:7]] == ["unlabeled", "cyclic", "awp", "trades", "wd", "mart", "at"]
    assert float(rows[6]["flat_worst"]) == pytest.approx(6.48)
    assert rows[7]["label"] == "Good (mean of 2)" and float(rows[7]["rerr_test"]) == pytest.approx(51.25)


def enumerated_p(x, y, corr):
    """Two-sided permutation p-value by brute force: scipy's coefficient for every pairing of x with y."""
    observed = abs(corr(x, y).statistic)
    return np.mean([abs(corr([x[i] for i in perm], y).statistic) >= observed - 1e-12
                    for perm in itertools.permutations(range(len(x)))])


def test_correlations_equal_scipy_with_exact_p_values(drawn):
    """Coefficients are scipy's; for n ≤ 8 the p-values are exact (all n! pairings), above scipy's."""
    _, out, _ = drawn
    c = json.loads((out / "correlations.json").read_text())
    rloss = [r[5] for r in RUNS]
    avg = [r[6] for r in RUNS]
    pr, sr = scipy.stats.pearsonr(rloss, avg), scipy.stats.spearmanr(rloss, avg)
    got = c["last"]["rloss_vs_flat_avg"]
    assert got["n"] == 7 and got["p_method"] == "exact permutation test (all 5040 pairings)"
    assert got["pearson_r"] == pytest.approx(pr.statistic) and got["spearman_rho"] == pytest.approx(sr.statistic)
    assert got["pearson_p"] == pytest.approx(enumerated_p(avg, rloss, scipy.stats.pearsonr))
    assert got["spearman_p"] == pytest.approx(enumerated_p(avg, rloss, scipy.stats.spearmanr))
    worst = [(r[5], r[7]) for r in RUNS if r[7] is not None]
    pr = scipy.stats.pearsonr([w[0] for w in worst], [w[1] for w in worst])
    assert c["last"]["rloss_vs_flat_worst"]["n"] == 6
    assert c["last"]["rloss_vs_flat_worst"]["pearson_r"] == pytest.approx(pr.statistic)
    rerr = [r[2] / 100 for r in RUNS]
    assert c["last"]["rerr_vs_flat_avg"]["pearson_r"] == pytest.approx(scipy.stats.pearsonr(rerr, avg).statistic)
    # with the early-stopped checkpoints: 7 more points (RLoss × 0.6, flatness / 2); n = 14: scipy's p
    both = c["last_and_es"]["rloss_vs_flat_avg"]
    x = avg + [a / 2 for a in avg]
    y = rloss + [r * 0.6 for r in rloss]
    assert both["n"] == 14 and both["pearson_r"] == pytest.approx(scipy.stats.pearsonr(y, x).statistic)
    assert both["pearson_p"] == pytest.approx(scipy.stats.pearsonr(y, x).pvalue) and "scipy" in both["p_method"]


def test_a_perfect_correlation_of_few_models_has_its_exact_p_value():
    """ρ = 1 over 4 models: scipy's t-distribution says p = 0; of the 24 pairings only the observed one
    reaches |r| = 1 (Pearson: the x are not evenly spaced), the observed and the reversed one |ρ| = 1."""
    x, y = [1.0, 2.0, 3.0, 5.0], [2.0, 4.0, 6.0, 10.0]
    assert scipy.stats.pearsonr(x, y).pvalue == 0.0
    c = plots.correlation(x, y)
    assert c["pearson_r"] == pytest.approx(1.0) and c["spearman_rho"] == pytest.approx(1.0)
    assert c["pearson_p"] == pytest.approx(1 / 24) and c["spearman_p"] == pytest.approx(2 / 24)


def test_result_files_identified_by_their_settings(drawn):
    """Clean and train-example flatness are not mistaken for the robust test flatness, nor a rescaled
    model's for the model's; per-epoch results give Fig. 6's series (the Hessian too); a file without
    settings and an unreadable one are skipped with one line each."""
    _, _, summary = drawn
    at = next(r for r in summary["runs"] if r["run"] == "at")
    assert at["last"]["flat_avg"] == pytest.approx(1.21)
    assert at["last"]["flat_avg_train"] == pytest.approx(1.21 * 0.8)
    assert at["last"]["flat_avg_clean"] == pytest.approx(9.0)
    assert "hessian" not in at["last"]  # only the rescaled Hessian exists for ckpt_last.pt
    assert at["best"]["rerr"] == pytest.approx(0.546) and at["best"]["flat_avg"] == pytest.approx(0.605)
    assert at["es_epoch"] == 12  # first minimum of es_rerr (epochs 12 has |e − best| = 0)
    series = at["over_epochs"]
    assert [r["epoch"] for r in series] == [5, 10, 15, 20, 25, 30, 150]
    assert series[2]["flat_avg"] == pytest.approx(1.5) and series[2]["hessian"] == pytest.approx(1500)
    assert series[2]["rloss"] == pytest.approx(1.75)  # the flatness file's reference RLoss
    assert any("eval_broken.json: not readable JSON" in line for line in summary["skipped"])
    assert any("eval.json: no 'settings'" in line for line in summary["skipped"])
    assert any("no_results has no evaluation" in line for line in summary["skipped"])
    assert any(line.startswith("skip fig7: needs a hyper-parameter sweep") for line in summary["skipped"])
    # the runs a figure leaves out, one line each (fig6: a figure per run, the others named once)
    assert "fig6: left out: awp, cyclic, mart, no_results, trades, unlabeled, wd (flatness of fewer than 2 " \
        "snapshots: flatness.py --epochs)" in summary["skipped"]
    assert "fig9: left out of the panels that need it: no_results (no evaluation of ckpt_last.pt and no flatness " \
        "on train examples (--subset train-eval) and no average-case flatness of ckpt_last.pt)" in summary["skipped"]


def test_fig4_draws_rescaled_landscapes_dashed_over_the_original(drawn, tmp_path):
    """The ×0.5 and ×2 landscapes of AT (§3.2) are drawn dash-dotted / dashed in the original's colour; one measured
    with other settings besides the scale is left out with one line."""
    root, _, _ = drawn
    runs = plots.find_runs(root, plots.Log())
    log = plots.Log()
    curves = plots.fig4(runs, tmp_path, log, [])
    assert [(label, style) for label, _, style, _ in curves] == \
        [("AT", "-"), ("AT ×0.5 (rescaled)", "-."), ("AT ×2 (rescaled)", "--")]
    no_landscape = "fig4: left out: awp, cyclic, mart, no_results, trades, unlabeled, wd (no landscape of ckpt_last.pt)"
    assert len({colour for _, colour, _, _ in curves}) == 1 and log.lines == [no_landscape]
    at = root / "at"
    other = landscape(at, 0.6, flags=["--scale", "3", "--directions", "2"])
    try:
        curves = plots.fig4(plots.find_runs(root, plots.Log()), tmp_path, log, [])
    finally:
        other.unlink()
    assert "AT ×3 (rescaled)" not in [c[0] for c in curves]
    assert len(log.lines) == 3 and "×3 landscape of at has other settings" in log.lines[1]


def test_ema_runs_use_the_ema_evaluation(tmp_path):
    """Weight averaging is evaluated as the averaged model: the --use-ema results win."""
    d = tmp_path / "ema"
    d.mkdir()
    write(d / "args.json", {**BASE_ARGS, "ema": 0.9975})
    eval_file(d, "ckpt_last.pt", 0.70, 3.0)
    eval_file(d, "ckpt_last.pt", 0.60, 2.0, flags=["--use-ema"])
    flat_value(d, "ckpt_last.pt", "average", 1.0, 3.0)
    flat_value(d, "ckpt_last.pt", "average", 0.4, 2.0, flags=["--use-ema"])
    run = plots.load_run(d, plots.Log())
    m = plots.measures(run, "last")
    assert m["rerr"] == pytest.approx(0.60) and m["rloss"] == pytest.approx(2.0) and m["flat_avg"] == pytest.approx(0.4)
    assert plots.describe(run["args"], {})[0] == "AT EMA=0.9975"


def test_a_quick_measurement_beside_the_default_one_is_not_chosen(tmp_path):
    """Several results of one checkpoint: the paper's protocol wins over a quick or variant one, even one
    on more images; among variants the one on more images. Only recorded fields decide."""
    d = tmp_path / "at"
    d.mkdir()
    write(d / "args.json", BASE_ARGS)
    eval_file(d, "ckpt_last.pt", 0.60, 2.0)
    eval_file(d, "ckpt_last.pt", 0.90, 9.9, flags=["--n-eval", "2000", "--restarts", "1"])
    flat_value(d, "ckpt_last.pt", "average", 1.0, 2.0)
    flat_value(d, "ckpt_last.pt", "average", 7.0, 2.0, flags=["--n-eval", "2000", "--samples", "3"])
    assert len(list(d.glob("eval_last_*.json"))) == len(list(d.glob("flatness_average_last_*.json"))) == 2
    m = plots.measures(plots.load_run(d, plots.Log()), "last")
    assert m["rloss"] == pytest.approx(2.0) and m["flat_avg"] == pytest.approx(1.0)
    assert m["rloss_attack"] == "PGD-20×10" and m["rerr_n"] == 1000

    for f in d.glob("*_last_*.json"):  # only variants: the one on more images
        if not json.loads(f.read_text())["non_default"]:
            f.unlink()
    flat_value(d, "ckpt_last.pt", "average", 3.0, 2.0, flags=["--n-eval", "500"])
    eval_file(d, "ckpt_last.pt", 0.80, 5.0, flags=["--n-eval", "500"])
    m = plots.measures(plots.load_run(d, plots.Log()), "last")
    assert m["flat_avg"] == pytest.approx(7.0) and m["rloss"] == pytest.approx(9.9)


def test_differences_between_different_attacks_are_refused(tmp_path):
    """ckpt_last.pt evaluated with PGD-20×10, ckpt_best.pt only with PGD-20×2 (both with AutoAttack):
    Table 1's ES − test RErr and Fig. 9's last − ES RLoss are left out, each with one line naming both;
    the same settings on both sides give both differences."""
    d = tmp_path / "runs" / "at"
    d.mkdir(parents=True)
    write(d / "args.json", BASE_ARGS)
    eval_file(d, "ckpt_last.pt", 0.60, 3.0, 0.3)
    best = eval_file(d, "ckpt_best.pt", 0.50, 2.0, epoch=60, flags=["--restarts", "2"])
    flat_value(d, "ckpt_last.pt", "average", 1.0, 3.0)
    flat_value(d, "ckpt_best.pt", "average", 0.5, 2.0, epoch=60)
    summary = plots.main([str(tmp_path / "runs"), "--out", str(tmp_path / "fig"), "--formats", "png", "--dpi", "30"])
    (row,) = json.loads((tmp_path / "fig" / "table1.json").read_text())["rows"]
    assert row["rerr_es"] == pytest.approx(50.0) and row["es_minus_test"] is None
    assert row["train_minus_test"] == pytest.approx(30.0 - 60.0)  # one evaluation: always comparable
    assert "last_minus_es" not in summary["runs"][0]["last"]
    refused = [line for line in summary["skipped"] if "settings differ: restarts" in line]
    assert len(refused) == 2
    both = ("last measured with PGD-20×10 + AutoAttack-standard on 1000 images, best with PGD-20×2 + "
            "AutoAttack-standard on 1000 images")
    assert refused == [f"skip fig9 RLoss(last) − RLoss(ES) of at: {both} (settings differ: restarts)",
                       f"skip Table 1 ES − test RErr of at: {both} (settings differ: restarts)"]

    best.unlink()
    eval_file(d, "ckpt_best.pt", 0.50, 2.0, epoch=60)
    summary = plots.main([str(tmp_path / "runs"), "--out", str(tmp_path / "fig"), "--formats", "png", "--dpi", "30"])
    (row,) = json.loads((tmp_path / "fig" / "table1.json").read_text())["rows"]
    assert row["es_minus_test"] == pytest.approx(-10.0)
    assert summary["runs"][0]["last"]["last_minus_es"] == pytest.approx(1.0)
    assert not [line for line in summary["skipped"] if "settings differ" in line]


def test_table1_has_one_row_per_method_family(tmp_path):
    """Label noise 0.2 and 0.4 are one family: one row, the run with the lower test RErr (label noise's is
    read first, TRADES' last: no position wins); the 30 % / 70 %
    thresholds and group means are over the rows; the correlations over every run."""
    root = tmp_path / "runs"
    for name, extra, rerr, rloss, flat in (("at", {}, 0.62, 3.9, 1.2), ("ln0.2", {"label_noise": 0.2}, 0.55, 2.5, 0.5),
                                           ("ln0.4", {"label_noise": 0.4}, 0.58, 3.0, 0.8),
                                           ("trades", {"method": "trades", "beta": 6}, 0.57, 2.2, 0.6),
                                           ("trades9", {"method": "trades", "beta": 9}, 0.56, 2.1, 0.55),
                                           ("wd", {"wd": 0.05}, 0.59, 2.4, 0.4)):
        d = root / name
        d.mkdir(parents=True)
        write(d / "args.json", {**BASE_ARGS, **extra})
        eval_file(d, "ckpt_last.pt", rerr, rloss)
        flat_value(d, "ckpt_last.pt", "average", flat, rloss)
    summary = plots.main([str(root), "--out", str(tmp_path / "fig"), "--formats", "png", "--dpi", "30"])
    t = json.loads((tmp_path / "fig" / "table1.json").read_text())
    assert [(r["run"], r["family"], r["family_runs"]) for r in t["rows"]] == [
        ("ln0.2", "AT label-noise", 2), ("trades9", "TRADES", 2), ("wd", "AT wd", 1), ("at", "AT", 1)]
    # the percentiles of the 4 rows (55.9 / 59.3 → 56 / 59), not of the 6 runs (56.5 / 58.5 → 56 / 58)
    assert t["percentiles"] == pytest.approx([55.9, 59.3]) and t["thresholds"] == [56.0, 59.0]
    g = {x["group"]: x for x in t["groups"]}
    assert [g[k]["n"] for k in ("Good", "Average", "Poor")] == [1, 1, 2]
    assert g["Poor"]["rerr_test"] == pytest.approx((59.0 + 62.0) / 2)
    assert "| 1 | AT label-noise=0.2 (best of 2) | 55.0 |" in (tmp_path / "fig" / "table1.md").read_text()
    c = json.loads((tmp_path / "fig" / "correlations.json").read_text())
    assert c["last"]["rloss_vs_flat_avg"]["n"] == 6 == len(summary["runs"])


def test_missing_inputs_skip_with_a_message(tmp_path, capsys):
    """A run with only args.json and metrics.jsonl: the curves are drawn, the rest is skipped
    with one line each that names what is missing."""
    d = tmp_path / "runs" / "at"
    d.mkdir(parents=True)
    write(d / "args.json", BASE_ARGS)
    (d / "metrics.jsonl").write_text(metrics_lines(10, 4) + "garbage\n")
    out = tmp_path / "fig"
    summary = plots.main([str(tmp_path / "runs"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert_png(out / "fig2_robust_overfitting.png")
    assert (out / "fig2_robust_overfitting.pdf").read_bytes()[:5] == b"%PDF-"
    assert (out / "fig5_training_curves.png").exists()
    for expected in ("skip fig1: needs runs with an evaluation (RLoss) and average-case flatness",
                     "skip fig4: no landscape", "skip fig6: no run has flatness of at least 2 snapshots",
                     "skip fig7: needs a hyper-parameter sweep", "skip fig8: needs runs with an evaluation",
                     "skip fig9: needs", "skip table1: no run has an evaluation", "unparsable line(s)"):
        assert expected in printed, expected
        assert any(expected in line for line in summary["skipped"])
    for name in ("fig1_rloss_vs_flatness", "fig4_landscape", "fig7_hyperparameters", "fig8_rloss_flatness"):
        assert not (out / f"{name}.png").exists()
    c = json.loads((out / "correlations.json").read_text())
    assert c["last"]["rloss_vs_flat_avg"]["n"] == 0 and "pearson_r" not in c["last"]["rloss_vs_flat_avg"]



def test_one_run_folder_and_bad_input(tmp_path, drawn, capsys):
    """A single run folder as input; svg output; bad input is one line and exit code 1."""
    root, _, _ = drawn
    plots.main([str(root / "wd"), "--out", str(tmp_path / "f"), "--formats", "svg", "--dpi", "40"])
    printed = capsys.readouterr().out
    assert "| 1 | AT wd=0.05 | 58.1 |" in printed and "skip fig2: no AT baseline run" in printed
    assert (tmp_path / "f" / "fig8_rloss_flatness.svg").exists()
    assert not list((tmp_path / "f").glob("*.png"))
    bad = run_script("plots.py", tmp_path / "nowhere", check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'} does not exist; give the folder "
                                              "that holds the run folders (e.g. runs/)"]
    with pytest.raises(UsageError, match="--formats takes png, pdf and/or svg"):
        plots.main([str(root), "--formats", "gif"])


def test_exact_thresholds(drawn):
    _, _, summary = drawn
    points = [{"run": r["run"], "label": r["label"], "family": r["family"], **r["last"]} for r in summary["runs"]]
    es_points = [{"run": r["run"], "label": r["label"], **r["best"]} for r in summary["runs"] if r["best"]]
    t = plots.table1(points, es_points, exact_thresholds=True)
    assert t["thresholds"] == pytest.approx([54.16, 58.68]) and not t["rounded"]
    assert [g["n"] for g in t["groups"]] == [2, 3, 2]
    t = plots.table1(points[:1], [])
    assert len(t["rows"]) == 1 and t["rows"][0]["rerr_es"] is None


def test_split_fits_in_fig8_use_linregress_on_each_side():
    """The two Fig. 8 lines are least-squares fits of the points left / right of RLoss 2.3."""
    fig, ax = plt.subplots()
    x, y = [1.0, 1.5, 2.0], [50.0, 52.0, 55.0]
    fit = plots.fit_line(ax, x, y)
    ref = scipy.stats.linregress(x, y)
    assert fit.slope == pytest.approx(ref.slope) and fit.intercept == pytest.approx(ref.intercept)
    line = ax.lines[0].get_xydata()
    assert line[0, 0] == 1.0 and line[1, 0] == 2.0
    assert line[1, 1] == pytest.approx(ref.intercept + 2 * ref.slope)
    assert plots.fit_line(ax, [2.0, 2.0], [1.0, 2.0]) is None  # no x spread: no line
    plt.close(fig)
    assert math.isclose(plots.shade((0.5, 0.5, 0.5), 0.5)[0], 0.25)


def test_paper_script_commands_parse(tmp_path):
    """scripts/paper.sh (DRY_RUN=1 prints the commands): every training, evaluation and flatness
    command it would run parses with that script's own argparse, flags and values included."""
    import importlib
    import shlex
    import subprocess
    from conftest import ROOT
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "paper.sh")], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "SWEEPS": "1", "RUNS": str(tmp_path / "runs"),
                               "PYTHON": "python"})
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line)[1:] for line in proc.stdout.splitlines() if line.startswith("python ")]
    scripts = Counter(c[0] for c in commands)
    assert scripts["plots.py"] == 1 and scripts["train_trades.py"] == 4 and scripts["train_awp.py"] == 4
    # Table 1 rows without +Unlabeled, Fig. 4's Adam and small-batch models, the Fig. 7 sweeps
    assert sum(v for k, v in scripts.items() if k.startswith("train_")) == 18 + 2 + 17
    for script, *argv in commands:
        if script == "plots.py":
            continue
        module = importlib.import_module(script[:-3])
        args = module.parse_args(argv)
        if script.startswith("train_"):
            assert args.epochs in (150, 75, 30)
    assert ["train_trades.py", "--beta", "9"] == commands[[c[0] for c in commands].index("train_trades.py")][:3]
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "mini_paper.sh")]).returncode == 0


def test_an_es_checkpoint_at_the_last_epoch_is_not_counted_twice():
    """ckpt_best.pt of a run whose first ES minimum is its last epoch is ckpt_last.pt again."""
    def point(run, kind, epoch, i):
        return {"run": run, "kind": kind, "epoch": epoch, "rloss": 1.0 + i, "rerr": 0.5 + 0.01 * i,
                "flat_avg": 0.5 + i * i, "flat_worst": 1.0 + i}
    points = [point(f"r{i}", "last", 150, i) for i in range(4)]
    es = [point("r0", "best", 150, 0), point("r1", "best", 40, 0.5)]
    c = plots.correlations(points, es)
    assert c["last"]["rloss_vs_flat_avg"]["n"] == 4
    assert c["last_and_es"]["rloss_vs_flat_avg"]["n"] == 5
    assert "r0:best" not in c["last_and_es"]["rloss_vs_flat_avg"]["models"]


def test_a_row_never_mixes_the_averaged_and_the_plain_model(tmp_path):
    """An EMA run evaluated with --use-ema takes no flatness of the plain weights into its row."""
    d = tmp_path / "ema"
    d.mkdir()
    write(d / "args.json", {**BASE_ARGS, "ema": 0.9975})
    eval_file(d, "ckpt_last.pt", 0.60, 2.0, flags=["--use-ema"])
    flat_value(d, "ckpt_last.pt", "average", 99.0, 3.0)
    m = plots.measures(plots.load_run(d, plots.Log()), "last")
    assert m["rloss"] == pytest.approx(2.0) and "flat_avg" not in m


RB_INFO = {"source": "robustbench", "args": {"arch": "wrn-28-10"}}  # load_model's info for a RobustBench model


def rb_results(models, name, rloss=None, avg=None, worst=None):
    """evaluate.py / flatness.py --robustbench NAME --model-dir MODELS results, by their own functions."""
    source = ["--robustbench", name, "--model-dir", str(models)]
    if rloss is not None:
        args = evaluate.parse_args(source)
        args.data_dir = "/data"
        settings, non_default = evaluate.eval_settings(args, RB_INFO)
        pgd = {"rloss": rloss, "rerr": 0.4, "rloss_correct": rloss / 2, "rloss_incorrect": rloss * 2, "n": 1000}
        evaluate.write_result(evaluate.result_path(models, settings), settings, non_default, None,
                              {"epoch": None, "pgd": pgd, "autoattack": {"rerr": 0.45, "n": 1000}})
    for mode, value in (("average", avg), ("worst", worst)):
        if value is not None:
            args = flatness.parse_args(source + ["--mode", mode])
            args.data_dir = "/data"
            settings, non_default = flatness.flatness_settings(args, RB_INFO, mode)
            evaluate.write_result(evaluate.result_path(models, settings), settings, non_default, None,
                                  {"n": 1000, "epoch": None, "value": value, "reference": rloss or 1.0})


def test_robustbench_models_are_triangles_in_fig1(drawn, tmp_path, monkeypatch, capsys):
    """--robustbench-dir MODELS: every RobustBench model measured into MODELS is a ▲ in Fig. 1 (labelled by its
    name, apart from the runs' fit), never a run: not in Table 1 nor the correlations. Results of other models in
    that folder are ignored; a model without flatness is named in one line."""
    root, _, _ = drawn
    models = tmp_path / "models"
    models.mkdir()
    rb_results(models, "Carmon2019Unlabeled", rloss=1.3, avg=0.25, worst=0.9)
    rb_results(models, "Rice2020Overfitting", rloss=1.7, avg=0.4)
    rb_results(models, "Standard", rloss=9.0)  # evaluated only
    eval_file(models, "ckpt_last.pt", 0.5, 2.0)  # a checkpoint of ours lying there: not a RobustBench model
    drawn_fig1 = []
    fig1 = plots.fig1
    monkeypatch.setattr(plots, "fig1", lambda *a, **k: drawn_fig1.extend(fig1(*a, **k)))
    legends, save = {}, plots.save
    monkeypatch.setattr(plots, "save", lambda fig, out, name, *a, **k: legends.update(
        {name: [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]})
        or save(fig, out, name, *a, **k))
    out = tmp_path / "fig"
    summary = plots.main([str(root), "--out", str(out), "--formats", "png", "--dpi", "40", "--robustbench-dir",
                          str(models)])
    assert "RobustBench (public, early-stopped)" in legends["fig1_rloss_vs_flatness"]
    assert "AT" in legends["fig1_rloss_vs_flatness"]  # the families' entries stay beside it
    assert [(p["label"], p["marker"], p.get("rloss"), p.get("flat_avg"), p.get("flat_worst"))
            for p in summary["robustbench"]] == [("Carmon2019Unlabeled", "^", 1.3, 0.25, 0.9),
                                                 ("Rice2020Overfitting", "^", 1.7, 0.4, None),
                                                 ("Standard", "^", 9.0, None, None)]
    assert ("Carmon2019Unlabeled", "^") in drawn_fig1 and ("Rice2020Overfitting", "^") in drawn_fig1
    assert ("Standard", "^") not in drawn_fig1 and ("AT", "o") in drawn_fig1
    assert_png(out / "fig1_rloss_vs_flatness.png")
    assert any("RobustBench model Standard lacks average-case flatness" in line for line in summary["skipped"])
    t = json.loads((out / "table1.json").read_text())
    assert len(t["rows"]) == 7 and not any("robustbench" in r["run"] for r in t["rows"])
    assert json.loads((out / "correlations.json").read_text())["last"] == before_correlations(root)
    capsys.readouterr()
    with pytest.raises(UsageError, match="--robustbench-dir .* is not a folder"):
        plots.main([str(root), "--out", str(out), "--robustbench-dir", str(tmp_path / "nowhere")])


def before_correlations(root):
    """The correlations of the runs alone."""
    points = [{**plots.run_meta(r), **plots.measures(r, "last")} for r in plots.find_runs(root, plots.Log())]
    return json.loads(json.dumps(plots.correlations(points, [])["last"]))


# ---------------------------------------------------------------------------------------------
# Figures a reader of the paper recognises
# ---------------------------------------------------------------------------------------------
def test_too_few_points_say_so_instead_of_a_fit():
    fig, ax = plt.subplots()
    assert plots.fit_line(ax, [1.0, 2.0], [3.0, 4.0], "AT label-noise") is None  # two points: no fit
    assert plots.fit_line(ax, [1.0], [3.0], "TRADES") is None
    assert not ax.lines
    assert ax.fit_note.get_text() == ("AT label-noise: 2 distinct point(s), too few for a fit\n"
                                      "TRADES: 1 distinct point(s), too few for a fit")
    assert plots.fit_line(ax, [1.0, 2.0, 3.0], [3.0, 4.0, 6.0]) is not None and len(ax.lines) == 1
    plt.close(fig)


def test_fig2_colours_incorrect_green_and_correct_rose(drawn, monkeypatch):
    root, out, _ = drawn
    drawn_lines = {}
    real_close = plt.close

    def keep(fig=None):
        if fig is not None and hasattr(fig, "axes") and fig.axes:
            for line in fig.axes[0].lines:
                drawn_lines[line.get_label()] = line.get_color()
        real_close(fig)
    monkeypatch.setattr(plots.plt, "close", keep)
    run = next(r for r in plots.find_runs(root, plots.Log()) if r["name"].endswith("at"))
    plots.fig2(run, out, plots.Log(), [])
    assert drawn_lines["test, clean-incorrect examples"] == plots.GREEN
    assert drawn_lines["test, clean-correct examples"] == plots.ROSE


def test_many_runs_colour_the_table1_rows_and_grey_the_others(tmp_path):
    """Past MANY_POINTS runs (a sweep present), Fig. 1/8 draw Table 1's rows in colour with their labels and
    every other run small and grey, unlabelled, with one "Other runs" legend entry; the legend lies beside the
    axes, over no data."""
    points = [{"run": f"r{i}", "label": f"AT label-noise={i / 20:g}", "family": "AT label-noise", "sweep": i,
               "marker": "o", "rloss": 2 + i / 10, "flat_avg": 0.5 + i / 20, "rerr": 0.5 + i / 100,
               "rerr_source": "AutoAttack"}
              for i in range(plots.MANY_POINTS)]
    points.append({"run": "at", "label": "AT", "family": "AT", "sweep": 0, "marker": "o", "rloss": 4.0,
                   "flat_avg": 1.2, "rerr": 0.63, "rerr_source": "AutoAttack"})
    t = plots.table1(points, [], plots.Log())
    shown = plots.highlighted(points, {r["run"] for r in t["rows"]})
    assert [p["run"] for p in shown if not p["other"]] == ["r0", "at"]  # each family's best test RErr
    assert plots.highlighted(points[:3], set()) == [{**p, "other": False} for p in points[:3]]  # few: all colour
    colours = plots.family_colours(points)
    fig, ax = plt.subplots()
    plots.scatter(ax, shown, "flat_avg", "rloss", colours, annotate=True)
    plots.family_legend(ax, shown, colours, loc="upper left", bbox_to_anchor=(1.01, 1))
    faces = [tuple(c.get_facecolor()[0][:3]) for c in ax.collections]
    assert faces.count(tuple(plots.OTHER)) == plots.MANY_POINTS - 1  # AT keeps the baseline's darker grey
    assert [t.get_text() for t in ax.texts] == ["AT label-noise=0", "AT"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["AT", "AT label-noise", "Other runs", "AT variants"]
    plt.close(fig)
