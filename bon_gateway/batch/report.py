"""The batch report: reward distributions, gain over the first candidate, accuracy
vs N. An HTML page (figure embedded, summary table) or a PNG, by file suffix.

matplotlib is imported only here and only when a report is asked for, with the
Agg backend: batch jobs run on headless machines.
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

from bon_gateway.batch.io import atomic_write_bytes
from bon_gateway.batch.summary import BatchFigures

__all__ = ["render_figure", "write_report"]


def render_figure(figures: BatchFigures, title: str = "bon-gateway batch") -> bytes:
    """The report figure as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if figures.by_n else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), constrained_layout=True)
    fig.suptitle(f"{title}: {figures.rows} rows, {figures.candidates} candidates")

    ax = axes[0]
    if figures.all_rewards:
        import numpy as np

        # Shared bin edges: the three series must be comparable bar for bar.
        bins = np.histogram_bin_edges(figures.all_rewards, bins=30)
        ax.hist(figures.all_rewards, bins=bins, alpha=0.45, label="all candidates", density=True)
        series = ((figures.first_rewards, "first candidate"), (figures.selected_rewards, "selected"))
        for values, label in series:
            ax.hist(values, bins=bins, histtype="step", linewidth=1.6, label=label, density=True)
        ax.legend(fontsize=8)
    ax.set_title("reward distribution")
    ax.set_xlabel("reward")
    ax.set_ylabel("density")

    ax = axes[1]
    if figures.gains:
        ax.hist(figures.gains, bins=40, color="tab:green", alpha=0.8)
        mean_gain = sum(figures.gains) / len(figures.gains)
        ax.axvline(mean_gain, color="black", linestyle="--", linewidth=1, label=f"mean {mean_gain:.3f}")
        ax.legend(fontsize=8)
    ax.set_title("reward gain: selected - first candidate")
    ax.set_xlabel("reward difference")
    ax.set_ylabel("rows")

    if figures.by_n:
        ax = axes[2]
        ks = sorted(figures.by_n)
        for position, label in enumerate(
            ("best-of-N (reward argmax)", "majority vote", "oracle (any right)")
        ):
            ax.plot(ks, [figures.by_n[k][position] for k in ks], marker="o", label=label)
        ax.set_title(f"accuracy vs N ({figures.with_reference} rows with a reference)")
        ax.set_xlabel("N (first N candidates)")
        ax.set_ylabel("accuracy")
        ax.set_xticks(ks)
        ax.set_ylim(0, max(0.05, min(1.0, max(v[2] for v in figures.by_n.values()) * 1.15)))
        ax.legend(fontsize=8)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _html(figures: BatchFigures, png: bytes, extra: dict[str, Any], title: str) -> str:
    import base64

    summary = {**extra, **{k: v for k, v in figures.as_dict().items() if k != "accuracy_vs_n"}}
    rows = "\n".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in summary.items()
    )
    by_n = "\n".join(
        f"<tr><td>{k}</td><td>{a:.4f}</td><td>{m:.4f}</td><td>{o:.4f}</td></tr>"
        for k, (a, m, o) in sorted(figures.by_n.items())
    )
    by_n_table = (
        "<h2>Accuracy vs N</h2><table><tr><th>N</th><th>best-of-N</th><th>majority</th><th>oracle</th></tr>"
        f"{by_n}</table>"
        if by_n
        else ""
    )
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1.5em}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}} img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<img alt="rewards, gain over the first candidate, accuracy vs N" src="data:image/png;base64,{image}">
<h2>Summary</h2><table>{rows}</table>
{by_n_table}
</body></html>
"""


def write_report(
    path: Path,
    figures: BatchFigures,
    *,
    extra: dict[str, Any] | None = None,
    title: str = "bon-gateway batch",
) -> None:
    """Write the report to `path`: PNG when it ends in .png, else HTML."""
    png = render_figure(figures, title)
    if path.suffix.lower() == ".png":
        atomic_write_bytes(path, png)
    else:
        atomic_write_bytes(path, _html(figures, png, extra or {}, title).encode("utf-8"))
