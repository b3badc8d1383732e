"""The benchmark's PNG: throughput and latency over time (matplotlib, the ``bench`` extra)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any


def plot(results: dict[str, Any], path: Path) -> None:
    """Write throughput (offered, stored readings/s) and probe latencies over time to ``path``.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'citypulse[bench]'``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = results["timeseries"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    t = [s["t_s"] for s in series]

    def rate(key: str) -> list[float]:
        out = [0.0]
        for a, b in itertools.pairwise(series):
            dt = b["t_s"] - a["t_s"]
            out.append(
                max(0.0, (b[key] - a[key]) / dt) if dt > 0 and a["phase"] == b["phase"] else 0.0
            )
        return out

    ax1.plot(t, rate("published"), label="published (PUBACKed) readings/s", lw=1)
    ax1.plot(t, rate("stored"), label="stored readings/s", lw=1.5)
    if series and "evaluated" in series[0]:
        ax1.plot(t, rate("evaluated"), label="evaluated by the rules, readings/s", lw=1)
    ax1.plot(
        t, [s["target_readings_per_s"] for s in series], label="offered target", lw=0.8, ls="--"
    )
    ax1.set_ylabel("readings/s")
    ax1.legend(loc="upper left", fontsize=8)
    ax1.grid(alpha=0.3)
    # Phase labels at their first sample.
    last = None
    for s in series:
        if s["phase"] != last:
            ax1.axvline(s["t_s"], color="grey", lw=0.5)
            ax1.text(
                s["t_s"], ax1.get_ylim()[1] * 0.95, s["phase"], fontsize=7, rotation=90, va="top"
            )
            last = s["phase"]
    # Latency samples carry wall-clock ms; map them onto the series' clock.
    first: dict[str, Any] = next(iter(results.get("modes", {}).values()), {})
    if series and "ramp" in first:
        start_ms = first["ramp"]["start_ms"]
        t0 = series[0]["t_s"]
        for key, label in (("stored", "publish -> stored"), ("alert", "publish -> alert")):
            pts = results["latency_samples"][key]
            ax2.scatter(
                [t0 + (at - start_ms) / 1000 for at, _ in pts],
                [lat for _, lat in pts],
                s=3,
                label=label,
            )
    ax2.set_yscale("log")
    ax2.set_ylabel("latency, ms (log)")
    ax2.set_xlabel("seconds since start")
    ax2.legend(loc="upper left", fontsize=8)
    ax2.grid(alpha=0.3)
    m = results["machine"]
    fig.suptitle(
        f"citypulse bench: {results['sensors']:,} sensors, {results['rules']} rules, "
        f"{m['cpus']} CPUs ({m['cpu_model']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
