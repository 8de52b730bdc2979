"""plots.py on an ordinary runs/ folder: the README's quick start (train_at.py, 2 epochs) beside 1-epoch runs of
other methods, with args.json written from each training script's own argparse. The AT baseline is found and
labelled "AT" whatever its length, Fig. 2 is drawn, labels name what the paper varies (not run length), legends
show the markers the points use, tick labels never overlap, error axes end at 100 %, Table 1 has no empty
group, and every figure names the runs it left out."""
import importlib
import json

import matplotlib.pyplot as plt
import pytest
from PIL import Image

import plots
from test_plots import eval_file, flat_value, write

QUICK = ["--data-dir", "/data", "--width", "16", "--train-subset", "2000"]  # the README's quick start


def train_args(script, *flags):
    """args.json as `script` writes it: its own parse_args, with the quick start's width and subset."""
    return {**vars(importlib.import_module(script).parse_args(QUICK + list(flags))), "versions": {"torch": "x"}}


def metrics(test_rerr, train_err):
    return "".join(json.dumps({"epoch": e, "lr": 0.05, "train_loss": 2.5 - 0.3 * e, "train_err": tr,
                               "test_clean_err": 0.9, "test_rloss": 9.0 - e, "test_rerr": te, "test_rloss_correct": 0.5,
                               "test_rloss_incorrect": 10.0 - e, "test_n": 40}) + "\n"
                   for e, (te, tr) in enumerate(zip(test_rerr, train_err), 1))


# (folder, script, flags, test RErr per epoch, test RErr of ckpt_last.pt, RLoss, avg flatness, worst flatness):
# a tiny network after 1–2 epochs (RErr 90–100 %); worst-case flatness ~1e-4, whose plain tick labels
# ("0.0001", "0.0002", ...) used to run into one string
QUICK_START = [
    ("smoke", "train_at", ["--epochs", "2"], [1.0, 0.9], 0.90, 8.3, 15.5, 0.0001),
    ("trades", "train_trades", ["--epochs", "1"], [0.9], 0.90, 5.5, 17.8, 0.0003),
    ("awp", "train_awp", ["--epochs", "1"], [1.0], 1.00, 6.5, 16.4, 0.0006),
    ("ls", "train_at", ["--epochs", "1", "--label-smoothing", "0.3"], [1.0], 1.00, 6.3, 21.1, 0.0009),
    ("mart", "train_mart", ["--epochs", "1"], [1.0], 1.00, 6.2, None, None),  # evaluated, flatness not measured
]


def make_quick_start(root):
    for name, script, flags, curve, rerr, rloss, avg, worst in QUICK_START:
        d = root / name
        d.mkdir(parents=True)
        write(d / "args.json", train_args(script, *flags))
        (d / "metrics.jsonl").write_text(metrics(curve, [min(1.0, c + 0.05) for c in curve]))
        eval_file(d, "ckpt_last.pt", rerr, rloss, autoattack=False, epoch=len(curve))
        if avg is not None:
            flat_value(d, "ckpt_last.pt", "average", avg, rloss, epoch=len(curve))
            flat_value(d, "ckpt_last.pt", "worst", worst, rloss, epoch=len(curve))
    return root


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """plots.main on the quick-start folder; every figure kept open (name → Figure) for the tests to inspect."""
    root = make_quick_start(tmp_path_factory.mktemp("runs"))
    out = tmp_path_factory.mktemp("figures")
    figs, save, close = {}, plots.save, plt.close
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "save", lambda fig, o, name, *a, **k: figs.update({name: fig}) or save(fig, o, name, *a, **k))
        mp.setattr(plots.plt, "close", lambda fig=None: None)
        summary = plots.main([str(root), "--out", str(out), "--formats", "png", "--dpi", "40"])
    yield root, out, summary, figs
    for fig in figs.values():
        close(fig)


def test_the_quick_start_beside_one_epoch_method_runs_is_the_at_baseline(quick):
    """The 2-epoch train_at.py run is "AT" (grey, Table 1's AT row, Fig. 2), though most runs have 1 epoch."""
    _, out, summary, figs = quick
    runs = {r["run"]: r for r in summary["runs"]}
    assert {n: r["label"] for n, r in runs.items()} == {
        "smoke": "AT", "trades": "TRADES β=6", "awp": "AWP ξ=0.005", "ls": "AT label-smoothing=0.3", "mart": "MART β=6"}
    assert runs["smoke"]["family"] == "AT"
    assert summary["skipped"][0] == ("baseline: smoke (epochs=2, width=16, subset=2000, arch=resnet18, "
                                     "dataset=cifar10, batch=128, lr=0.05; the only plain AT run)")
    assert [r["run"] for r in summary["runs"] if r["baseline"]] == ["smoke"]
    assert not [line for line in summary["skipped"] if "skip fig2" in line]
    assert figs["fig2_robust_overfitting"].axes[0].get_title() == "Fig. 2 — RLoss, AT"
    assert (out / "fig2_robust_overfitting.png").exists()
    assert "| 1 | AT | 90.0† |" in (out / "table1.md").read_text()


def plain_runs(root, runs):
    for name, script, flags in runs:
        (root / name).mkdir(parents=True)
        write(root / name / "args.json", train_args(script, *flags))
    return root


def labels(root, baseline=None):
    log = plots.Log()
    runs = plots.find_runs(root, log, baseline)
    return {r["name"]: (r["label"], r["family"]) for r in runs}, log.lines


def test_the_baseline_is_the_plain_at_run_whose_size_most_runs_share(tmp_path):
    """Of a paper-length AT run and a 1-epoch one beside 1-epoch methods, the 1-epoch run is the baseline (the
    other is "AT epochs=150 ...", a family of its own); a regulariser or batch size 8 is never the baseline;
    --baseline NAME chooses another, and the labels follow it."""
    root = plain_runs(tmp_path, [
        ("at_long", "train_at", ["--epochs", "150", "--width", "64", "--train-subset", "0"]),
        ("at_quick", "train_at", ["--epochs", "1"]), ("batch8", "train_at", ["--epochs", "1", "--batch-size", "8"]),
        ("wd", "train_at", ["--epochs", "1", "--wd", "0.05"]), ("trades", "train_trades", ["--epochs", "1"]),
        ("awp", "train_awp", ["--epochs", "1"])])
    got, lines = labels(root)
    assert got == {"at_long": ("AT epochs=150 width=64 subset=all", "AT epochs width subset"),
                   "at_quick": ("AT", "AT"), "batch8": ("AT batch=8", "AT batch"), "wd": ("AT wd=0.05", "AT wd"),
                   "trades": ("TRADES β=6", "TRADES"), "awp": ("AWP ξ=0.005", "AWP")}
    assert lines == ["baseline: at_quick (epochs=1, width=16, subset=2000, arch=resnet18, dataset=cifar10, batch=128, "
                     "lr=0.05; of the plain AT runs at_long, at_quick, batch8 the one whose run size most other runs "
                     "share (3 of 5 exactly))"]
    got, lines = labels(root, "at_long")
    assert got["at_long"] == ("AT", "AT")
    assert got["at_quick"] == ("AT epochs=1 width=16 subset=2000", "AT epochs width subset")
    assert got["trades"] == ("TRADES β=6", "TRADES") and lines == ["baseline: at_long (--baseline)"]


def test_run_size_is_named_only_where_it_alone_tells_runs_apart(tmp_path):
    """Two TRADES runs of 1 and 2 epochs: "epochs=" tells them apart, one family; a seed repeat of the baseline
    keeps the folder name (as before); without a plain AT run the labels name no size and Fig. 2 is skipped."""
    root = plain_runs(tmp_path / "a", [
        ("at", "train_at", ["--epochs", "2"]), ("at_seed1", "train_at", ["--epochs", "2", "--seed", "1"]),
        ("trades1", "train_trades", ["--epochs", "1"]), ("trades2", "train_trades", ["--epochs", "2"]),
        ("trades9", "train_trades", ["--epochs", "1", "--beta", "9"])])
    got, _ = labels(root)
    assert got == {"at": ("AT [at]", "AT"), "at_seed1": ("AT [at_seed1]", "AT"),
                   "trades1": ("TRADES β=6 epochs=1", "TRADES"), "trades2": ("TRADES β=6 epochs=2", "TRADES"),
                   "trades9": ("TRADES β=9", "TRADES")}
    root = plain_runs(tmp_path / "b", [("trades", "train_trades", ["--epochs", "1"]),
                                       ("ls", "train_at", ["--epochs", "3", "--label-smoothing", "0.3"])])
    got, lines = labels(root)
    assert got == {"trades": ("TRADES β=6", "TRADES"), "ls": ("AT label-smoothing=0.3", "AT label-smoothing")}
    assert lines == ["skip fig2: no AT baseline run (method at without regularisers); pass --baseline NAME"]


def legend_markers(legend):
    return {t.get_text(): h.get_marker() for t, h in zip(legend.get_texts(), legend.legend_handles)}


def test_legends_show_the_markers_the_points_use(quick):
    """Fig. 1 (axes legend) and Fig. 8 (figure legend): a family's entry has its points' marker, ● for AT
    variants, ◆ for AWP (paper Fig. 1's caption), never a square."""
    _, _, _, figs = quick
    fig1 = legend_markers(figs["fig1_rloss_vs_flatness"].axes[0].get_legend())
    assert {k: fig1[k] for k in ("AT", "AT label-smoothing", "TRADES", "AWP")} == \
        {"AT": "o", "AT label-smoothing": "o", "TRADES": "o", "AWP": "D"}
    fig8 = legend_markers(figs["fig8_rloss_flatness"].legends[0])
    assert fig8["AT"] == "o" and fig8["MART"] == "o" and fig8["AWP"] == "D"
    points = [{"run": f"r{i}", "family": "AT" if i else "AWP", "marker": "o" if i else "D", "other": i > 1}
              for i in range(4)]
    fig, ax = plt.subplots()
    plots.family_legend(ax, points, {"AT": plots.GREY, "AWP": (0, 0, 1)})
    assert legend_markers(ax.get_legend())["Other runs"] == "o"
    plt.close(fig)


def overlapping_ticks(fig):
    """(axes title, label, label) of neighbouring tick labels whose drawn boxes overlap."""
    fig.canvas.draw()
    renderer, bad = fig.canvas.get_renderer(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            locs = axis.get_majorticklocs()
            shown = [t.label1 for t, x in zip(axis.get_major_ticks(len(locs)), locs)
                     if lo <= x <= hi and t.label1.get_text()]
            boxes = [t.get_window_extent(renderer) for t in shown]
            bad += [(ax.get_title(), a.get_text(), b.get_text())
                    for a, b, ba, bb in zip(shown, shown[1:], boxes, boxes[1:]) if ba.overlaps(bb)]
    return bad


def test_tick_labels_never_overlap(quick):
    """Every figure of the quick start, Fig. 8's worst-case panel (flatness ~1e-4) included; and an axis whose
    labels do overlap (long plain numbers on a narrow axes) is untangled."""
    _, _, _, figs = quick
    assert set(figs) == {"fig1_rloss_vs_flatness", "fig2_robust_overfitting", "fig5_training_curves",
                         "fig8_rloss_flatness", "fig_measures"}
    for name, fig in figs.items():
        assert overlapping_ticks(fig) == [], name
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.scatter([123456700, 123456790], [0, 1])
    ax.ticklabel_format(style="plain", useOffset=False)
    ax.xaxis.set_major_locator(plt.MaxNLocator(9))
    assert overlapping_ticks(fig)
    assert plots.untangle_ticks(fig) and overlapping_ticks(fig) == []
    plt.close(fig)


def test_error_axes_stop_at_100_percent(quick):
    """RErr of 90–100 %: Fig. 2's and Fig. 5's RErr axes and Fig. 8's RErr panels end at 100 (not 100.5 or 104)."""
    _, _, _, figs = quick
    axes = {"fig2": figs["fig2_robust_overfitting"].axes[1], "fig5": figs["fig5_training_curves"].axes[1],
            "fig8 RErr vs RLoss": figs["fig8_rloss_flatness"].axes[0],
            "fig8 RErr vs flatness": figs["fig8_rloss_flatness"].axes[2]}
    assert "RErr" in axes["fig5"].get_title() and "RErr" in axes["fig8 RErr vs flatness"].get_ylabel()
    assert {k: ax.get_ylim()[1] for k, ax in axes.items()} == {k: 100.0 for k in axes}
    assert all(85 < ax.get_ylim()[0] < 90 for ax in axes.values())


def test_table1_leaves_out_empty_groups(quick):
    """Test RErr 90, 90, 100, 100, 100 %: 30th / 70th percentiles 92 % / 100 %, no run in [92, 100): no
    Average row (was "mean of 0; 100 % ≤ RErr < 100 %")."""
    _, out, _, _ = quick
    t = json.loads((out / "table1.json").read_text())
    assert t["thresholds"] == [92.0, 100.0]
    assert [(g["group"], g["n"]) for g in t["groups"]] == [("Good", 2), ("Poor", 3)]
    md = (out / "table1.md").read_text()
    assert "mean of 0" not in md and "Average" not in md.split("\n\n")[0]
    assert "Groups: Good RErr < 92 %, Poor ≥ 100 % (no Average row)" in md
    assert "Average" not in (out / "table1.csv").read_text()


def test_every_figure_names_the_runs_it_left_out(quick):
    """One line per figure (printed, in summary.json), and the same text under the figure and in the PNG's
    metadata: Fig. 5 leaves out the 1-epoch runs (a curve needs 2 epochs), Fig. 1 and 8 the run without
    flatness."""
    _, out, summary, figs = quick
    fig5 = "left out: awp, ls, mart, trades (1 epoch(s) of test_rloss in metrics.jsonl, a curve needs 2)"
    fig1 = "left out: mart (no average-case flatness of ckpt_last.pt)"
    fig8 = ("left out of the panels that need it: mart (no average-case flatness of ckpt_last.pt and no worst-case "
            "flatness of ckpt_last.pt)")
    for name, text in (("fig5", fig5), ("fig1", fig1), ("fig8", fig8)):
        assert f"{name}: {text}" in summary["skipped"], name
    assert summary["left_out"]["fig5"] == {n: "1 epoch(s) of test_rloss in metrics.jsonl, a curve needs 2"
                                           for n in ("trades", "awp", "ls", "mart")}
    for name, text in (("fig5_training_curves", fig5), ("fig1_rloss_vs_flatness", fig1), ("fig8_rloss_flatness", fig8)):
        assert Image.open(out / f"{name}.png").text["Description"] == text
        assert text.replace(" ", "") in ["".join(t.get_text().split()) for t in figs[name].texts]
    assert "Description" not in Image.open(out / "fig2_robust_overfitting.png").text  # Fig. 2 is of one run
    fig8 = figs["fig8_rloss_flatness"]  # the legend under the axes moved up, above the note
    note = next(t for t in fig8.texts if t.get_text().startswith("left out"))
    renderer = fig8.canvas.get_renderer()
    assert fig8.legends[0].get_window_extent(renderer).y0 >= note.get_window_extent(renderer).y1


def test_a_result_of_another_folders_checkpoint_is_not_this_runs(tmp_path):
    """`evaluate.py runs/a/ckpt_last.pt --out runs/b` names a's checkpoint in its settings ("../a/ckpt_last.pt"):
    plots.py must not take it for run b's result."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write(tmp_path / name / "args.json", train_args("train_at", "--epochs", "1"))
    own = eval_file(tmp_path / "b", "ckpt_last.pt", 0.5, 1.5, autoattack=False)
    other = eval_file(tmp_path / "a", "ckpt_last.pt", 0.9, 3.0, autoattack=False, flags=("--out", str(tmp_path / "b")))
    moved = tmp_path / "b" / other.name.replace("eval_", "eval_a_")
    other.rename(moved)
    assert json.loads(moved.read_text())["settings"]["checkpoint"] == "../a/ckpt_last.pt"
    lines = []
    run = plots.load_run(tmp_path / "b", lines.append)
    assert [e["file"] for e in run["evals"]] == [own]
    assert lines == [f"skip {moved}: it measured ../a/ckpt_last.pt, a checkpoint of another folder"]
