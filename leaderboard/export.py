"""Static export of the leaderboard: per-task ranking CSVs (raw and scaled between controls), the
QC flags, and one self-contained HTML page rendering :mod:`cellarena.leaderboard.page`.

The page uses no JavaScript and no external CSS, so it can be attached to a report or served
from any static host; charts are left out. Given the same results table the output is
byte-for-byte identical.
"""

from __future__ import annotations

import html
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
    return heading + table.frame.to_html(index=False, na_rep="", border=0,
                                         float_format=lambda x: f"{x:.{table.precision}f}")


def _choice(choice: Choice) -> str:
    shown = _parts(choice.options[choice.default])
    return f'<p class="explain">{_text(choice.label)}: {_text(choice.default)}</p>\n{shown}' if shown else ""


# The HTML of each kind of part; charts are left out of the static page.
_HTML = {Note: _note, Caption: _caption, Table: _table, Chart: lambda chart: "", Choice: _choice}


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
    sections = [f'<h2 id="{_text(s.task)}">{_text(s.title)}</h2>\n' + "\n".join(filter(None, map(_block, s.blocks)))
                for s in page.sections]
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


def export_static(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write per task present in ``df`` ``ranking_<task>.csv`` (raw) and ``scaled_<task>.csv``
    (scaled between controls), then ``qc_flags.csv`` (all tasks) and ``index.html``, which also
    shows each task's leakage-imputed ranking when it has leaked results.

    Returns the written paths in that order (tasks in :data:`cellarena.tasks.TASK_IDS` order).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    page = lb.build_page(df, imputed_ranking=True)
    written: list[Path] = []
    for section in page.sections:
        written.append(_write_csv(section.ranking, out_dir / f"ranking_{section.task}.csv"))
        written.append(_write_csv(section.scaled, out_dir / f"scaled_{section.task}.csv"))
    written.append(_write_csv(page.qc_flags, out_dir / "qc_flags.csv"))
    index = out_dir / "index.html"
    index.write_text(render_html(page), encoding="utf-8", newline="\n")
    written.append(index)
    return written
