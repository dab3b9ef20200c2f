"""PNG plots of a results document (matplotlib, Agg backend: no display needed).

matplotlib is imported inside `write_plots` so `dsr1 bench --help` stays fast.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from dsr1.bench.report import point_label
from dsr1.fsutil import atomic_write_bytes


def _series(doc: dict[str, Any], key: str, stat: str) -> list[float | None]:
    return [(p["summary"].get(key) or {}).get(stat) for p in doc["points"]]


def write_plots(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """throughput_latency.png, ttft_distribution.png, tpot_distribution.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = doc["points"]
    if not points:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [point_label(p) for p in points]
    thr = [p["summary"]["output_throughput"] for p in points]
    title = f"{doc['server'].get('model')} @ {doc['server'].get('base_url')}"
    paths = []

    # Throughput against latency across the sweep: each point is one load level.
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, name in zip(axes, ("ttft_ms", "tpot_ms", "e2el_ms"), ("TTFT", "TPOT", "E2E latency")):
        for stat, marker in (("p50", "o-"), ("p99", "s--")):
            ys = _series(doc, key, stat)
            xs = [x for x, y in zip(thr, ys) if y is not None]
            ax.plot(xs, [y for y in ys if y is not None], marker, label=stat)
        for x, y, lbl in zip(thr, _series(doc, key, "p50"), labels):
            if y is not None:
                ax.annotate(lbl, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Throughput vs latency: {title}")
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "throughput_latency.png"))
    plt.close(fig)

    for key, name, fname in (("ttft", "TTFT", "ttft_distribution.png"), ("tpot", "TPOT", "tpot_distribution.png")):
        data = [[r[key] * 1000.0 for r in p["requests"] if r["ok"] and r[key] is not None] for p in points]
        fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(points) + 2), 4.8))
        keep = [(lbl, d) for lbl, d in zip(labels, data) if d]
        if keep:
            ax.boxplot([d for _, d in keep], tick_labels=[lbl for lbl, _ in keep], showfliers=True)
        else:
            ax.text(0.5, 0.5, f"no {name} values (no completed requests)", ha="center", transform=ax.transAxes)
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} distribution per point\n{title}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        paths.append(_save(fig, out_dir / fname))
        plt.close(fig)
    return paths


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path
