"""latency.png: the fixed-rate latency of the three proxies, side by side."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.load import percentile
from benchmarks.report import MAX_P99_AT_RATE_MS, Figures, Results
from benchmarks.stack import PROXIES

COLOURS = {"nginx": "#7f7f7f", "naive": "#e69f00", "proxy": "#0072b2"}


def write(path: Path, results: Results) -> None:
    """Latency at the fixed rate: distributions side by side, and percentile curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results.settings
    figures = Figures(results)
    names = list(PROXIES)
    samples = results.fixed_rate.hey_samples_ms
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=90)

    # Violins of log latency: the three distributions span two orders of magnitude.
    logs = [[math.log10(max(value, 0.05)) for value in samples[name]] for name in names]
    parts = left.violinplot(logs, showextrema=False, widths=0.8)
    for body, name in zip(parts["bodies"], names, strict=True):
        body.set_facecolor(COLOURS[name])
        body.set_alpha(0.6)
    for position, name in enumerate(names, start=1):
        ordered = sorted(samples[name])
        for fraction, marker in ((0.5, "_"), (0.99, "x")):
            left.plot(
                position,
                math.log10(max(percentile(ordered, fraction), 0.05)),
                marker=marker,
                color="black",
                markersize=10,
            )
    ticks = [0.1, 0.3, 1, 3, 10, 30, 100]
    left.set_yticks([math.log10(tick) for tick in ticks], [f"{tick:g}" for tick in ticks])
    left.set_xticks(range(1, len(names) + 1), [PROXIES[name] for name in names])
    left.set_ylabel("latency, ms (log scale; bar = p50, x = p99)")
    left.set_title(
        f"{settings.rate:g} req/s as hey sends it: bursts of {settings.rate_workers}",
        fontsize=10,
    )

    nines = [50.0, 75.0, 90.0, 99.0, 99.9]
    x = [-math.log10(1 - p / 100) for p in nines]
    for name in names:
        ordered = sorted(samples[name])
        right.plot(
            x,
            [percentile(ordered, p / 100) for p in nines],
            color=COLOURS[name],
            marker="o",
            markersize=3,
            label=f"{PROXIES[name]}, hey",
        )
        right.plot(
            x,
            [figures.rate(name, "wrk-poisson", p) for p in nines],
            color=COLOURS[name],
            linestyle="--",
            marker="o",
            markersize=3,
            label=f"{PROXIES[name]}, Poisson",
        )
    right.set_yscale("log")
    right.set_yticks(ticks, [f"{tick:g}" for tick in ticks])
    right.minorticks_off()
    right.set_xticks(x, [f"p{p:g}" for p in nines])
    right.axhline(MAX_P99_AT_RATE_MS, color="black", linewidth=0.8, linestyle=":")
    right.set_ylabel("latency, ms (log scale)")
    right.set_title(
        f"percentiles at {settings.rate:g} req/s; dotted: the {MAX_P99_AT_RATE_MS:g} ms target",
        fontsize=10,
    )
    right.legend(fontsize=7, ncol=2)
    for axes in (left, right):
        axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
