"""The batch report: reward distributions, gain over the first candidate, accuracy
vs N. An HTML page (figure embedded, summary table) or a PNG, by file suffix.

matplotlib is imported only here and only when a report is asked for, with the
Agg backend: batch jobs run on headless machines.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
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
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


# Summary keys of BatchFigures.as_dict() shown as percentages.
PERCENT_KEYS = frozenset({"accuracy_selected", "accuracy_first", "accuracy_oracle"})
EXAMPLE_ROWS = 3
EXAMPLE_CHARS = 600


def _cell(key: str, value: Any) -> str:
    return html.escape(_pct(value) if key in PERCENT_KEYS else _fmt(value))


def _table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "\n".join(
        "<tr><th>" + row[0] + "</th>" + "".join(f"<td>{c}</td>" for c in row[1:]) + "</tr>" for row in rows
    )
    return f"<table>{head}{body}</table>"


def _clip(text: Any) -> str:
    text = str(text or "")
    return html.escape(text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + " [...]")


def _question(row: dict[str, Any]) -> str:
    users = [m.get("content") for m in row.get("messages") or [] if m.get("role") == "user"]
    return _clip(users[-1] if users else "")


def _candidate_cell(candidate: dict[str, Any] | None) -> str:
    if candidate is None:
        return "-"
    correct = candidate.get("correct")
    verdict = "" if correct is None else (", right" if correct else ", wrong")
    reward = candidate.get("reward")
    score = f"{reward:.4f}" if isinstance(reward, (int, float)) else "-"
    return f"<pre>{_clip(candidate.get('text'))}</pre><small>reward {score}{verdict}</small>"


def _examples(rows: list[dict[str, Any]]) -> str:
    """A few rows: the question, the chosen (rank 1) and the rejected (lowest reward) answers."""
    shown = []
    for row in rows[:EXAMPLE_ROWS]:
        candidates = row.get("candidates") or []
        if not candidates:
            continue
        chosen = min(candidates, key=lambda c: c.get("rank", 0))
        others = [c for c in candidates if c is not chosen]
        finite = [c for c in others if isinstance(c.get("reward"), (int, float))]
        rejected = min(finite, key=lambda c: c["reward"]) if finite else (others[-1] if others else None)
        reference = row.get("reference")
        question = _question(row) + (f"<br><small>reference: {_clip(reference)}</small>" if reference else "")
        shown.append(
            (html.escape(str(row.get("id"))), question, _candidate_cell(chosen), _candidate_cell(rejected))
        )
    if not shown:
        return ""
    return "<h2>Example rows</h2>" + _table(shown, ("id", "question", "chosen", "rejected"))


def _html(
    figures: BatchFigures,
    png: bytes,
    extra: dict[str, Any],
    title: str,
    *,
    produced_by: dict[str, Any],
    run_figures: BatchFigures | None,
    examples: list[dict[str, Any]],
) -> str:
    import base64

    made = _table([(html.escape(k), html.escape(_fmt(v))) for k, v in produced_by.items()])
    run = _table([(html.escape(k), html.escape(_fmt(v))) for k, v in extra.items()])
    whole = {k: v for k, v in figures.as_dict().items() if k != "accuracy_vs_n"}
    mine = run_figures.as_dict() if run_figures is not None else {}
    figures_table = _table(
        [(html.escape(k), _cell(k, mine.get(k)), _cell(k, v)) for k, v in whole.items()],
        ("", "this run", "whole output file"),
    )
    by_n = [
        (str(k), html.escape(_pct(a)), html.escape(_pct(m)), html.escape(_pct(o)))
        for k, (a, m, o) in sorted(figures.by_n.items())
    ]
    by_n_table = (
        "<h2>Accuracy vs N (whole output file)</h2>" + _table(by_n, ("N", "best-of-N", "majority", "oracle"))
        if by_n
        else ""
    )
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1.5em}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left;vertical-align:top}} img{{max-width:100%}}
pre{{white-space:pre-wrap;max-width:40em;margin:0}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Produced by</h2>{made}
<h2>Figures</h2>
<p>"This run" counts the rows this invocation wrote; the output file also holds the rows of
earlier runs when it was resumed. The figure shows the whole file.</p>
{figures_table}
<h2>This run</h2>{run}
{by_n_table}
<img alt="rewards, gain over the first candidate, accuracy vs N" src="data:image/png;base64,{image}">
{_examples(examples)}
</body></html>
"""


def write_report(
    path: Path,
    figures: BatchFigures,
    *,
    extra: dict[str, Any] | None = None,
    title: str = "bon-gateway batch",
    produced_by: dict[str, Any] | None = None,
    run_figures: BatchFigures | None = None,
    examples: list[dict[str, Any]] | None = None,
) -> None:
    """Write the report to `path`: PNG when it ends in .png, else HTML (what produced the
    rows, this run's figures next to the whole file's, a few example rows)."""
    png = render_figure(figures, title)
    if path.suffix.lower() == ".png":
        atomic_write_bytes(path, png)
    else:
        page = _html(
            figures,
            png,
            extra or {},
            title,
            produced_by=produced_by or {},
            run_figures=run_figures,
            examples=examples or [],
        )
        atomic_write_bytes(path, page.encode("utf-8"))
