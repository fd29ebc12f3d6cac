"""Figures: every series told apart, log-axis tick labels that do not overlap."""

import pytest

from lth_tf import plots

METRICS = ("test_accuracy", "test_accuracy_at_early_stopping", "early_stopping_step")


def _points(rounds: int, n: int = 1) -> list:
    stat = {"mean": 0.97, "min": 0.96, "max": 0.98, "n": n}
    return [{"density": 0.8**r, **{m: dict(stat) for m in METRICS}} for r in range(rounds)]


def _comparison(runs=("k=0", "k=100it"), branches=("imp", "random_reinit", "random_prune")):
    return [
        {"label": f"{run} / {b}", "run": i, "branch": b, "points": _points(16)}
        for i, run in enumerate(runs)
        for b in branches
    ]


def _drawn_lines(monkeypatch, series) -> list:
    """(label, colour, linestyle, marker) of the lines in the figure's first panel."""
    drawn = []
    real_png = plots.png

    def capture(fig):
        for line in fig.axes[0].get_lines():
            if not line.get_label().startswith("_"):
                drawn.append(
                    (line.get_label(), line.get_color(), line.get_linestyle(), line.get_marker())
                )
        return real_png(fig)

    monkeypatch.setattr(plots, "png", capture)
    plots.accuracy_bands(series, [], None)
    return drawn


@pytest.mark.parametrize("n_runs", [1, 2, 3])
def test_every_series_of_a_figure_has_its_own_look(monkeypatch, n_runs):
    series = _comparison(runs=[f"run{i}" for i in range(n_runs)])
    drawn = _drawn_lines(monkeypatch, series)
    assert [d[0] for d in drawn] == [s["label"] for s in series]
    looks = [d[1:] for d in drawn]
    assert len(set(looks)) == len(looks), f"two series drawn alike: {drawn}"


def test_comparison_colour_is_the_run_and_style_the_branch():
    looks = plots.series_looks(_comparison())
    # imp, random_reinit, random_prune of run 0, then of run 1
    assert looks[0][0] == looks[1][0] == looks[2][0] != looks[3][0]
    assert looks[0][1] == looks[3][1] and looks[1][1] == looks[4][1]
    assert len({look[1] for look in looks[:3]}) == 3


@pytest.mark.parametrize(
    "value, label", [(20, "20"), (50, "50"), (90, ""), (9, ""), (0.5, "0.5"), (3, ""), (2, "2")]
)
def test_minor_ticks_are_labelled_at_2_and_5_only(value, label):
    assert plots.minor_tick_label(value) == label


def test_density_axis_tick_labels_do_not_overlap():
    """The main job's axis, 100% down to 3.5%: no two drawn tick labels overlap."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([100 * 0.8**r for r in range(16)], range(16), "o-")
    plots._density_axis(ax)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [
        (label.get_text(), label.get_window_extent(renderer))
        for label in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
        if label.get_text()
        and label.get_visible()
        and ax.get_xlim()[1] <= label.get_position()[0] <= ax.get_xlim()[0]
    ]
    plt.close(fig)
    texts = {t for t, _ in boxes}
    assert {"10", "100"} <= texts and "90" not in texts
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            assert not box_a.overlaps(box_b), f"tick labels {a} and {b} overlap"
