"""Static export of the leaderboard: per-task ranking CSVs (raw and scaled between controls), the
QC flags, and one self-contained HTML page rendering :mod:`cellarena.leaderboard.page`.

The page uses no JavaScript and no external CSS, so it can be attached to a report or served
from any static host; charts are drawn by matplotlib as inline SVG (text kept as text, no
timestamps, fixed element ids). Given the same results table the output is byte-for-byte
identical.
"""

from __future__ import annotations

import html
import io
import re
from pathlib import Path

import pandas as pd

from cellarena.leaderboard import page as lb
from cellarena.leaderboard.page import Block, Caption, Chart, Choice, Note, Page, Part, Table

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
.note { padding: 0.5em 1em; margin: 0.5em 0; max-width: 60em; }
.note ul { margin: 0.3em 0; }
.warning, .silver, .synthetic, .leakage { background: #fff4d6; border-left: 4px solid #e0a800; }
.qc { background: #fdecea; border-left: 4px solid #d9534f; }
.explain { color: #555; max-width: 60em; }
figure { margin: 0.5em 0 1.5em; }
"""


def _text(text: str) -> str:
    return html.escape(text)


def _note(note: Note) -> str:
    lead = f"<b>{_text(note.lead)}</b> " if note.lead else ""
    items = "".join(f"<li>{_text(i)}</li>" for i in note.items)
    return (f'<div class="note {note.kind}">{lead}{_text(note.text)}'
            f'{f"<ul>{items}</ul>" if items else ""}</div>')


def _caption(caption: Caption) -> str:
    return f'<p class="explain">{_text(caption.text)}</p>'


def _table(table: Table) -> str:
    heading = f"<p><b>{_text(table.heading)}</b></p>\n" if table.heading else ""
    frame = table.frame.copy()
    for col in frame.columns:  # nullable integers (seed counts of a test not run): a missing one is blank
        if isinstance(frame[col].dtype, pd.api.extensions.ExtensionDtype) and pd.api.types.is_integer_dtype(frame[col]):
            frame[col] = [("" if pd.isna(v) else str(v)) for v in frame[col]]
    return heading + frame.to_html(index=False, na_rep="", border=0,
                                   float_format=lambda x: f"{x:.{table.precision}f}")


def _choice(choice: Choice) -> str:
    if choice.static_all:
        return "\n".join(f'<p class="explain">{_text(choice.label)}: {_text(option)}</p>\n{_parts(parts)}'
                         for option, parts in choice.options.items())
    shown = _parts(choice.options[choice.default])
    return f'<p class="explain">{_text(choice.label)}: {_text(choice.default)}</p>\n{shown}' if shown else ""


def _axis_values(frame: pd.DataFrame, column: str, order: tuple[str, ...]) -> list[str]:
    present = list(dict.fromkeys(frame[column]))
    return [v for v in order if v in present] + [v for v in present if v not in order]


def _draw_bars(ax, chart: Chart, frame: pd.DataFrame, categories: list[str]) -> None:
    """Bars along the categorical axis, whiskers along the numeric one."""
    horizontal = not pd.api.types.is_numeric_dtype(frame[chart.y])
    cat, num = (chart.y, chart.x) if horizontal else (chart.x, chart.y)
    err = chart.x_err if horizontal else chart.y_err
    by = frame.set_index(cat)
    pos = list(range(len(categories)))
    vals = [float(by.at[c, num]) if c in by.index else float("nan") for c in categories]
    colors = [lb.KIND_COLORS.get(by.at[c, "model_kind"], "#555") if c in by.index else "#fff" for c in categories]
    (ax.barh if horizontal else ax.bar)(pos, vals, color=colors)
    if err:
        lows = [float(by.at[c, err[0]]) if c in by.index else float("nan") for c in categories]
        highs = [float(by.at[c, err[1]]) if c in by.index else float("nan") for c in categories]
        (ax.hlines if horizontal else ax.vlines)(pos, lows, highs, color="#333", linewidth=1)
    if horizontal:
        ax.set_yticks(pos, categories)
        ax.invert_yaxis()
    else:
        ax.set_xticks(pos, categories, rotation=40, ha="right")


def _draw_points(ax, chart: Chart, frame: pd.DataFrame) -> None:
    """Points with their whiskers, labels and the tie line."""
    if chart.diagonal and chart.domain:
        ax.plot(chart.domain, chart.domain, color="#999", linestyle="--", linewidth=1)
    for r in frame.itertuples(index=False):
        row = r._asdict()
        x, y = row[chart.x], row[chart.y]
        color = lb.KIND_COLORS.get(row["model_kind"], "#555")
        if chart.x_err:
            ax.hlines(y, row[chart.x_err[0]], row[chart.x_err[1]], color="#333", linewidth=1)
        if chart.y_err:
            ax.vlines(x, row[chart.y_err[0]], row[chart.y_err[1]], color="#333", linewidth=1)
        ax.plot([x], [y], "o", color=color, markersize=7)
        if chart.label:
            ax.annotate(str(row[chart.label]), (x, y), xytext=(6, 3), textcoords="offset points", fontsize=8)
    if chart.domain:
        ax.set_xlim(*chart.domain)
        ax.set_ylim(*chart.domain)


def chart_svg(chart: Chart) -> str:
    """The chart as an inline ``<svg>`` element (deterministic: no date, fixed ids, text as text)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    frame = chart.frame
    panels = _axis_values(frame, chart.facet, ()) if chart.facet else [""]
    horizontal = chart.kind == "bar" and not pd.api.types.is_numeric_dtype(frame[chart.y])
    categories = (_axis_values(frame, chart.y if horizontal else chart.x, chart.order)
                  if chart.kind == "bar" else [])
    with matplotlib.rc_context({"svg.hashsalt": "cellarena", "svg.fonttype": "none", "font.size": 9}):
        ncols = min(2, len(panels))  # panels in rows of two: the page stays readable without scrolling
        nrows = -(-len(panels) // ncols)
        if chart.kind == "point":
            size = (5.5, 5.0)
        elif horizontal:
            size = (6.5, 1.0 + 0.3 * len(categories))
        else:
            size = (max(3.0, 0.3 * len(categories) + 1.0) * ncols, 4.2 * nrows)
        fig, axes = plt.subplots(nrows, ncols, figsize=size, sharey=True, squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, panel in zip(axes.flat, panels):
            part = frame[frame[chart.facet] == panel] if chart.facet else frame
            if chart.kind == "point":
                _draw_points(ax, chart, part)
            else:
                _draw_bars(ax, chart, part, categories)
            if panel:
                ax.set_title(panel, fontsize=8)
            ax.set_xlabel(chart.x_title)
            ax.grid(alpha=0.3)
        for row in axes:
            row[0].set_ylabel(chart.y_title)
        fig.tight_layout()
        out = io.StringIO()
        fig.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
        plt.close(fig)
    svg = re.sub(r"^.*?(?=<svg)", "", out.getvalue(), flags=re.S)
    # inline in HTML an <svg> needs no namespace declarations (the HTML parser knows SVG and xlink)
    # nor matplotlib's RDF metadata: both are URLs the page would otherwise carry
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.S)
    return re.sub(r'\s+xmlns(?::\w+)?="[^"]*"', "", svg)


def _chart(chart: Chart) -> str:
    return f'<figure>{chart_svg(chart)}<figcaption class="explain">{_text(chart.caption)}</figcaption></figure>'


# The HTML of each kind of part.
_HTML = {Note: _note, Caption: _caption, Table: _table, Chart: _chart, Choice: _choice}


def _parts(parts: tuple[Part, ...]) -> str:
    return "\n".join(filter(None, (_HTML[type(p)](p) for p in parts)))


def _block(block: Block) -> str:
    """A block's heading and parts; nothing when none of its parts shows on a static page."""
    body = _parts(block.parts)
    if not body:
        return ""
    return f"<h3>{_text(block.title)}</h3>\n{body}" if block.title else body


def render_html(page: Page) -> str:
    """The page as one self-contained HTML document."""
    shown = [*page.sections, *([page.claims] if page.claims else [])]
    sections = [f'<h2 id="{_text(s.task)}">{_text(s.title)}</h2>\n' + "\n".join(filter(None, map(_block, s.blocks)))
                for s in shown]
    body = "\n".join(sections) or f"<p>{_text(lb.NO_RESULTS)}</p>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{_text(page.title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_text(page.title)}</h1>
<p class="explain">{_text(page.intro)}</p>
{body}
</body>
</html>
"""


def _write_csv(table: pd.DataFrame, path: Path) -> Path:
    table.to_csv(path, index=False, lineterminator="\n")
    return path


def export_static(df: pd.DataFrame, out_dir: str | Path, claims: list | None = None) -> list[Path]:
    """Write per task present in ``df`` ``ranking_<task>.csv`` (raw) and ``scaled_<task>.csv``
    (scaled between controls), then ``qc_flags.csv`` (all tasks) and ``index.html``, which also
    shows each task's leakage-imputed ranking when it has leaked results, and the published
    ``claims`` (claim cards) judged on ``df`` when given.

    Returns the written paths in that order (tasks in :data:`cellarena.tasks.TASK_IDS` order).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    page = lb.build_page(df, imputed_ranking=True, claims=claims)
    written: list[Path] = []
    for section in page.sections:
        written.append(_write_csv(section.ranking, out_dir / f"ranking_{section.task}.csv"))
        written.append(_write_csv(section.scaled, out_dir / f"scaled_{section.task}.csv"))
    written.append(_write_csv(page.qc_flags, out_dir / "qc_flags.csv"))
    index = out_dir / "index.html"
    index.write_text(render_html(page), encoding="utf-8", newline="\n")
    written.append(index)
    return written
