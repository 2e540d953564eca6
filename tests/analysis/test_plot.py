"""`logs plot`: the figure has one panel per metric whose lines are the runs' data, saved headless as a valid
PNG without version strings; per-block metrics draw one line per block; the text plot names the runs."""

from __future__ import annotations

import struct

import pytest
from run_fixtures import LOSSES, TOKENS_PER_STEP, completed_events, write_run

from tokenmill.analysis.plot import build_figure, save_figure, terminal_plot
from tokenmill.analysis.runs import load_runs
from tokenmill.analysis.series import smooth

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def two_runs(tmp_path):
    a = write_run(tmp_path / "base", completed_events())
    b = write_run(tmp_path / "wider", completed_events([x - 0.5 for x in LOSSES]))
    return load_runs([a, b])


def lines_of(ax):
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


def test_one_panel_per_metric_with_every_run(two_runs):
    fig = build_figure(two_runs, ["loss", "eval_loss", "lr"], x="steps")
    axes = fig.get_axes()
    assert [ax.get_title(loc="left") for ax in axes] == ["Train loss", "Eval loss (held out)", "Learning rate"]
    assert [ax.get_ylabel() for ax in axes] == ["nats/token", "nats/token", "lr"]
    assert all(ax.get_xlabel() == "optimizer step" for ax in axes)
    loss = lines_of(axes[0])
    assert loss == {"base": (list(range(1, 11)), LOSSES), "wider": (list(range(1, 11)), [x - 0.5 for x in LOSSES])}
    assert lines_of(axes[1]) == {"base": ([5, 10], [3.25, 3.55]), "wider": ([5, 10], [2.75, 3.05])}
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["base", "wider"]
    assert "base vs wider" in fig.get_suptitle()


def test_tokens_axis_and_smoothing(two_runs):
    fig = build_figure(two_runs[:1], ["loss"], x="tokens", smooth_window=3)
    (ax,) = fig.get_axes()
    raw, smoothed = ax.get_lines()
    assert list(raw.get_xdata()) == [TOKENS_PER_STEP * s for s in range(1, 11)]
    assert list(raw.get_ydata()) == LOSSES and raw.get_label().startswith("_")
    assert list(smoothed.get_ydata()) == pytest.approx(smooth(LOSSES, 3))
    assert smoothed.get_ydata()[2] == pytest.approx((5.0 + 4.0 + 3.5) / 3)
    assert ax.get_title(loc="left") == "Train loss (mean of 3 logs)" and ax.get_xlabel() == "tokens seen"


def test_per_block_metric_draws_a_line_per_block(tmp_path):
    events = completed_events()
    for event in events:
        if event["kind"] == "train":
            event.update(
                {
                    "update_ratio/tok_emb": 1e-2,
                    "update_ratio/blocks.1": 2e-3,
                    "update_ratio/blocks.0": 3e-3,
                    "update_ratio/norm": 1e-4,
                }
            )
    runs = load_runs([write_run(tmp_path / "r", events)])
    fig = build_figure(runs, ["update_ratio", "mfu"], x="steps")
    ratio, mfu = fig.get_axes()
    assert list(lines_of(ratio)) == ["tok_emb", "blocks.0", "blocks.1", "norm"]
    assert lines_of(ratio)["blocks.0"][1] == [3e-3] * 10 and ratio.get_yscale() == "log"
    assert not mfu.get_lines() and "not logged" in mfu.texts[0].get_text()  # CPU runs log no MFU: said so


def test_png_is_valid_and_reproducible(two_runs, tmp_path):
    out = tmp_path / "loss.png"
    fig = build_figure(two_runs, ["loss", "eval_loss", "lr", "grad_norm", "tokens_per_s"])
    save_figure(fig, out)
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert (width, height) == (1920, 1680)  # 2 x 3 panels of 6.4 x 3.6 in (+0.4 in title) at 150 dpi
    assert b"matplotlib" not in data.lower()  # no "Software: Matplotlib version ..." chunk
    save_figure(fig, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == data


def test_svg_is_reproducible_without_version_strings(two_runs, tmp_path):
    import matplotlib

    fig = build_figure(two_runs, ["loss"])
    save_figure(fig, tmp_path / "a.svg")
    save_figure(fig, tmp_path / "b.svg")
    text = (tmp_path / "a.svg").read_text()
    assert text.startswith("<?xml") and "<svg" in text and matplotlib.__version__ not in text
    assert (tmp_path / "b.svg").read_text() == text


def test_terminal_plot_names_runs_and_metrics(two_runs):
    text = terminal_plot(two_runs, ["loss", "mfu"], x="steps", width=80, color=False)
    assert "Train loss (nats/token)" in text and "base" in text and "wider" in text
    assert "Model FLOPs utilisation: not logged" in text and "\x1b[" not in text
