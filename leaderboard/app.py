"""Streamlit leaderboard: renders the page of :mod:`cellarena.leaderboard.page` for
results/scores.parquet, with filters, a leakage policy switch and one tab per task.

Run:  streamlit run leaderboard/app.py -- --scores results/scores.parquet
The scores path comes from ``--scores``, else $CELLARENA_SCORES, else results/scores.parquet.

Every string of the page is text, not Markdown: it holds data (model ids, commits, a run's failure
reason, a GPU's name) that a submission or a plug-in's exception can fill with a link, an image or
HTML. Streamlit renders Markdown in notes, captions, headings and in ``st.table`` cells, so each such
string goes through :func:`markdown_text` first; the browsable tables (``st.dataframe``) show text as
it is.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

# `streamlit run leaderboard/app.py` puts leaderboard/ (not the repo root) on sys.path; make the
# package importable when the project is not pip-installed.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from cellarena import results  # noqa: E402
from cellarena.errors import CellarenaError  # noqa: E402
from cellarena.leaderboard import data  # noqa: E402
from cellarena.leaderboard import page as lb  # noqa: E402
from cellarena.leaderboard.page import Block, Caption, Chart, Choice, Note, Part, Table  # noqa: E402

DEFAULT_SCORES = "results/scores.parquet"
KIND_COLORS = lb.KIND_COLORS
NOTE_ICONS = {"warning": "⚠️", "silver": "⚠️", "synthetic": "🧪", "leakage": "🔒", "qc": "🔎"}
LEAKAGE_LABELS = {"show": "show them", "hide": "hide them",
                  "impute": "replace by the task's reference model (leakage-imputed ranking)"}

# Markdown's (and Streamlit's) active characters: links and images ([ ] !), HTML and autolinks (< >),
# code, emphasis and strikethrough (` * ~; _ only where it can open or close emphasis, not inside a
# word such as an id), headings, tables, LaTeX ($), entities (&) and the escape itself.
_ACTIVE = re.compile(r"[\\`*~\[\]<>#|$!&]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_LINE_START = re.compile(r"^(\s*)(?:([-+=])|(\d+)([.)])(?=\s|$))")  # a list item, a rule, an underline
# GFM turns bare URLs and e-mail addresses into links after escapes are resolved, so no backslash
# stops them: an invisible word joiner splits "://", "www." and "@" instead.
_AUTOLINK = re.compile(r"(?<=:)(?=//)|(?i:(?<=www))(?=\.)|(?<=@)")
WORD_JOINER = "\u2060"


def markdown_text(text) -> str:
    """``text`` as Markdown that Streamlit shows as that text: no link, image, HTML, code, emphasis or
    block of its own. Line breaks become spaces (as Markdown shows a single one)."""
    text = re.sub(r"\s*\n\s*", " ", str(text))
    text = _AUTOLINK.sub(WORD_JOINER, text)
    text = _ACTIVE.sub(lambda m: "\\" + m.group(0), text)
    return _LINE_START.sub(lambda m: m.group(1) + (f"\\{m.group(2)}" if m.group(2) else f"{m.group(3)}\\{m.group(4)}"),
                           text)


def _table_text(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every string (cells and column names) as :func:`markdown_text`, for ``st.table``,
    which renders its cells as Markdown."""
    out = frame.rename(columns=lambda c: markdown_text(c) if isinstance(c, str) else c)
    for col in out.columns:
        if not pd.api.types.is_numeric_dtype(out[col]):
            out[col] = out[col].map(lambda v: markdown_text(v) if isinstance(v, str) else v)
    return out


def scores_path(argv: list[str]) -> Path:
    """``--scores`` from the script arguments, else $CELLARENA_SCORES, else the default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--scores", default=None)
    args, _ = parser.parse_known_args(argv)
    return Path(args.scores or os.environ.get("CELLARENA_SCORES") or DEFAULT_SCORES)


def claims_dir(argv: list[str]) -> Path:
    """``--claims-dir`` from the script arguments, else $CELLARENA_CLAIMS, else the suite's claims/."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--claims-dir", default=None)
    args, _ = parser.parse_known_args(argv)
    return Path(args.claims_dir or os.environ.get("CELLARENA_CLAIMS") or _ROOT / "claims")


@st.cache_data(show_spinner=False)
def _load(path: str, mtime: float) -> pd.DataFrame:
    # mtime is part of the cache key so a rewritten file is re-read.
    return data.load_scores(path)


@st.cache_data(show_spinner=False)
def _page(path: str, mtime: float, policy: str, datasets: tuple[str, ...],
          variants: tuple[str, ...], claims: str, claims_mtime: float) -> lb.Page:
    from cellarena.cards.claim import load_claims  # noqa: PLC0415

    return lb.build_page(_load(path, mtime), policy=policy, datasets=datasets, variants=variants,
                         claims=load_claims(claims) or None)


# --- parts of the page -----------------------------------------------------------------------------


def _note(note: Note) -> None:
    body = (f"**{markdown_text(note.lead)}** " if note.lead else "") + markdown_text(note.text)
    if note.items:
        body += "\n" + "".join(f"\n- {markdown_text(i)}" for i in note.items)
    if note.kind == "info":
        st.markdown(body)
    else:
        st.warning(body, icon=NOTE_ICONS[note.kind])


def _table(table: Table) -> None:
    if table.heading:
        st.markdown(f"**{markdown_text(table.heading)}**")
    if table.browsable:  # st.dataframe shows strings as text
        st.dataframe(table.frame, hide_index=True)
        return
    with st.container(key=table.key or None):
        st.table(_table_text(table.frame).style.format(precision=table.precision, na_rep="–"), hide_index=True)


def _chart(chart: Chart) -> None:
    st.altair_chart(_altair(chart))
    st.caption(markdown_text(chart.caption))


def _choice(choice: Choice) -> None:
    options = list(choice.options)
    picked = st.selectbox(markdown_text(choice.label), options, index=options.index(choice.default), key=choice.key)
    _parts(choice.options[picked])


# The Streamlit element(s) of each kind of part.
_DRAW = {Note: _note, Caption: lambda caption: st.caption(markdown_text(caption.text)), Table: _table, Chart: _chart,
         Choice: _choice}


def _parts(parts: tuple[Part, ...]) -> None:
    for part in parts:
        _DRAW[type(part)](part)


def _block(block: Block) -> None:
    if block.folded:
        with st.expander(markdown_text(block.title)):
            _parts(block.parts)
        return
    if block.title:
        st.subheader(markdown_text(block.title))
    _parts(block.parts)


# --- charts ----------------------------------------------------------------------------------------


def _field(chart: Chart, name: str, title: str) -> dict:
    """Altair's encoding arguments of one field of ``chart``: numeric fields are quantitative,
    others categorical (slanted labels along x)."""
    if pd.api.types.is_numeric_dtype(chart.frame[name]):
        domain = list(chart.domain) if chart.domain else None
        scale = alt.Scale(domain=domain, zero=False) if domain else alt.Scale(zero=chart.kind == "bar")
        return {"shorthand": f"{name}:Q", "scale": scale, "title": title or None}
    axis = alt.Axis(labelAngle=-40) if name == chart.x else alt.Undefined
    return {"shorthand": f"{name}:N", "sort": list(chart.order) or alt.Undefined, "title": title or None,
            "axis": axis}


def _tooltip(chart: Chart) -> list[alt.Tooltip]:
    return [alt.Tooltip(f, format=".3f") if pd.api.types.is_float_dtype(chart.frame[f]) else alt.Tooltip(f)
            for f in chart.tooltip]


def _whiskers(chart: Chart, base: alt.Chart) -> list[alt.Chart]:
    """A rule per mark along each axis that has an interval (``x_err``, ``y_err``)."""
    out = []
    if chart.y_err:
        out.append(base.mark_rule(color="#333").encode(y=alt.Y(f"{chart.y_err[0]}:Q"), y2=f"{chart.y_err[1]}:Q"))
    if chart.x_err:
        out.append(base.mark_rule(color="#333").encode(x=alt.X(f"{chart.x_err[0]}:Q"), x2=f"{chart.x_err[1]}:Q"))
    return out


def _altair(chart: Chart) -> alt.TopLevelMixin:
    """The Altair chart of a spec, marks coloured by model kind, intervals as whiskers."""
    color = alt.Color("model_kind:N", title="model kind",
                      scale=alt.Scale(domain=list(KIND_COLORS), range=list(KIND_COLORS.values())))
    base = alt.Chart(chart.frame).encode(x=alt.X(**_field(chart, chart.x, chart.x_title)),
                                         y=alt.Y(**_field(chart, chart.y, chart.y_title)))
    if chart.kind == "point":
        dots = base.mark_circle(size=120).encode(color=color, tooltip=_tooltip(chart))
        labels = base.mark_text(align="left", dx=8, fontSize=11).encode(text=f"{chart.label}:N")
        layers = [*_whiskers(chart, base), dots, labels]
        if chart.diagonal and chart.domain:
            tie = pd.DataFrame({chart.x: list(chart.domain), chart.y: list(chart.domain)})
            layers.insert(0, alt.Chart(tie).mark_line(color="#999", strokeDash=[4, 4]).encode(
                x=f"{chart.x}:Q", y=f"{chart.y}:Q"))
        return alt.layer(*layers).properties(width=420, height=420)
    bars = alt.layer(base.mark_bar().encode(color=color, tooltip=_tooltip(chart)), *_whiskers(chart, base))
    if chart.facet:
        return bars.properties(width=220, height=260).facet(column=alt.Column(f"{chart.facet}:N", title=None))
    return bars.properties(width=520, height=max(120, 28 * len(chart.frame)))


# --- the app ---------------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title=lb.TITLE, layout="wide")
    st.title(lb.TITLE)
    st.markdown(markdown_text(lb.INTRO))
    path = scores_path(sys.argv[1:])
    if not path.exists():
        st.error(f"No results file at {markdown_text(path)}. Run `make run` to produce it, or pass "
                 "`-- --scores PATH` / set `CELLARENA_SCORES`.")
        st.stop()
    try:
        mtime = path.stat().st_mtime
        df = _load(str(path), mtime)
    except results.SchemaError as exc:
        st.error("Cannot read the results file:")
        st.code(str(exc), language=None)  # the error names the table's values: shown as text
        st.stop()

    with st.sidebar:
        st.header("Filters")
        labels = df[["dataset_id", "label_quality"]].drop_duplicates().sort_values("dataset_id")
        quality = dict(labels.itertuples(index=False))
        datasets = st.multiselect(
            "Datasets", list(quality), default=list(quality),
            format_func=lambda d: f"{d} ({quality[d]} labels)",
        )
        all_variants = [v for v in results.VARIANTS if v in set(df["variant"])]
        variants = st.multiselect("Variants", all_variants, default=all_variants)
        leakage = st.radio("Results on cells of the model's own pretraining corpus",
                           list(LEAKAGE_LABELS), format_func=LEAKAGE_LABELS.get, key="leakage_policy")
        st.caption(f"Scores: {markdown_text(path)} ({len(df)} rows)")

    claims = claims_dir(sys.argv[1:])
    claims_mtime = max((p.stat().st_mtime for p in claims.glob("*.yaml")), default=0.0)
    try:
        page = _page(str(path), mtime, leakage, tuple(datasets), tuple(variants), str(claims), claims_mtime)
    except CellarenaError as exc:  # a claim card that does not load: said, with its file and fix
        st.error("Cannot read a claim card:")
        st.code(str(exc), language=None)
        st.stop()
    sections = lb.tabs(page)
    for tab, (_, section) in zip(st.tabs([title for title, _ in sections]), sections):
        with tab:
            if section is None:
                st.info(lb.NO_TASK_RESULTS)
                continue
            for block in section.blocks:
                _block(block)


if __name__ == "__main__":  # streamlit runs the script as __main__; importing it renders nothing
    main()
