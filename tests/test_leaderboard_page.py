"""The leaderboard page model: built once, shown by the Streamlit app and by the static export with
the same words; the static export is byte-for-byte deterministic."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator

import pandas as pd
import pytest
import test_leaderboard_browser as browser  # tests/ is on sys.path under pytest
from markdown_it import MarkdownIt

from cellarena import results, tasks
from cellarena.leaderboard import page as lb
from cellarena.leaderboard.app import WORD_JOINER, markdown_text
from cellarena.leaderboard.export import export_static, render_html

# CommonMark with raw HTML on and GFM's tables and strikethrough: what Streamlit's Markdown parses
MARKDOWN = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
LIVE = {"link_open", "image", "html_inline", "html_block", "code_inline", "code_block", "fence", "em_open",
        "strong_open", "s_open", "heading_open", "blockquote_open", "bullet_list_open", "ordered_list_open",
        "table_open", "hr"}
# GFM's autolink literals (bare URLs, www., e-mail addresses), which Streamlit also links
AUTOLINK = re.compile(r"(?i)https?://|www\.|[\w.+-]+@[\w-]+\.")


def submitted_rows() -> pd.DataFrame:
    """Results of scgpt on pbmc_small submitted with its pull request (run on a GPU)."""
    run = browser.run_record("scgpt", "transformer", "pbmc_small", "expert", True, "annotation")
    run.update(variant="submitted", environment_json='{"gpu": "NVIDIA H100"}', git_commit="feed123")
    return results.make_rows(run, {"accuracy": 0.91, "macro_f1": 0.8}, {"accuracy": True, "macro_f1": True})


def rich_scores() -> pd.DataFrame:
    """Every kind of note: silver labels (lung_atlas), synthetic data (proxy_screen), scgpt's
    pbmc_small run leaked, a tuned and a submitted run, zero-shot references (pca), a QC flag
    (scgpt's ilisi above the best control), and four tasks."""
    df = pd.concat([browser.scores_table(), browser.zero_shot_rows(), browser.tuned_rows(), submitted_rows()],
                   ignore_index=True)
    leaked = (df.model_id == "scgpt") & (df.dataset_id == "pbmc_small") & (df.variant == "default")
    df.loc[leaked, "leakage"] = "leaked"
    df.loc[(df.model_id == "scgpt") & (df.metric_id == "ilisi"), "value"] = 0.95
    return results.validate(df)


def shown_texts(parts) -> Iterator[str]:
    """Every text of some parts that both renderers show: notes, captions, table headings, and the
    parts of a choice's default option (charts are the app's alone)."""
    for part in parts:
        if isinstance(part, lb.Note):
            yield from (t for t in (part.lead, part.text, *part.items) if t)
        elif isinstance(part, lb.Caption):
            yield part.text
        elif isinstance(part, lb.Table) and part.heading:
            yield part.heading
        elif isinstance(part, lb.Choice):
            yield from shown_texts(part.options[part.default])


def tokens(md: str) -> Iterator:
    for token in MARKDOWN.parse(md):
        yield token
        yield from token.children or ()


def shown(md: str, joiner: str = "") -> str:
    """The text that Markdown ``md`` shows a reader (its markup gone; ``joiner`` for word joiners)."""
    return " ".join("".join(c.content for c in t.children if c.type in ("text", "text_special"))
                    for t in MARKDOWN.parse(md) if t.type == "inline").replace(WORD_JOINER, joiner)


def live_markup(md: str) -> set[str]:
    """What in Markdown ``md`` is more than text: links, images, HTML, code, emphasis, blocks, and
    autolinked URLs; the element bodies of data must have none."""
    found = {t.type for t in tokens(md)} & LIVE
    return found | ({"autolink literal"} if AUTOLINK.search(shown(md, joiner=WORD_JOINER)) else set())


def app_markdown(at) -> list[str]:
    """The Markdown of every note, caption, heading and expander of an AppTest run."""
    elements = [*at.warning, *at.markdown, *at.caption, *at.subheader, *at.info, *at.error]
    return [e.value for e in elements] + [e.label for e in at.expander]


def app_texts(at) -> list[str]:
    """The text of every note, caption, heading and expander of an AppTest run, as a reader sees it."""
    return [shown(md) for md in app_markdown(at)]


def table_markdown(at) -> list[str]:
    """The Markdown of every string cell and column name of the app's st.table tables."""
    return [v for t in at.table for v in (*t.value.columns, *t.value.to_numpy().ravel()) if isinstance(v, str)]


@pytest.fixture()
def scores() -> pd.DataFrame:
    return rich_scores()


@pytest.fixture()
def static_page(scores, tmp_path) -> str:
    export_static(scores, tmp_path / "static")
    return (tmp_path / "static" / "index.html").read_text(encoding="utf-8")


@pytest.fixture()
def app_run(scores, tmp_path, monkeypatch):
    results.write(scores, tmp_path / "scores.parquet")
    at = browser.app_test(monkeypatch, tmp_path / "scores.parquet")
    assert not at.exception
    return at


def test_sections_follow_the_tasks(scores):
    page = lb.build_page(scores)
    assert [s.task for s in page.sections] == list(tasks.TASK_IDS)
    assert [s.title for s in page.sections] == [tasks.get(t).title for t in tasks.TASK_IDS]
    assert [t for t, _ in lb.tabs(page)] == [tasks.get(t).title for t in tasks.TASK_IDS]
    only_annotation = lb.build_page(scores[scores.task == "annotation"])
    assert [s is None for _, s in lb.tabs(only_annotation)] == [t != "annotation" for t in tasks.TASK_IDS]
    titles = [b.title for b in page.section("annotation").blocks]
    assert titles == ["", "Ranking: raw metric values", "Model vs best tuned baseline",
                      "Ranking: scaled between controls",
                      "QC: metric values outside the control range", "Per-metric scores", "Tuned vs default",
                      "Compute cost", "Runs and provenance"]
    assert lb.build_page(scores, imputed_ranking=True).section("annotation").blocks[2].title == \
        "Leakage-imputed ranking"


def test_task_facts_come_from_the_task_records(scores):
    page = lb.build_page(scores)
    integration = page.section("integration")
    weights = " + ".join(f"{w:g} × {g}" for g, w in tasks.get("integration").overall_weights.items())
    assert f"overall = {weights}" in lb.scaled_caption(tasks.get("integration"))
    assert list(integration.scaled.columns[3:6]) == ["overall", *tasks.get("integration").overall_weights]
    zero_shot = page.section("zero_shot")
    notes = [p.text for p in zero_shot.blocks[0].parts if isinstance(p, lb.Note)]
    assert tasks.get("zero_shot").notes[0].format(references="pca") in notes
    assert "setting" in zero_shot.ranking.columns and "setting" not in page.section("annotation").ranking.columns
    categories = next(b for b in page.section("perturbation").blocks if b.title == "By query category")
    assert categories.parts[0].default == tasks.get("perturbation").subgroup_metric
    tuning = next(b for b in page.section("annotation").blocks if b.title == "Tuned vs default")
    assert set(tuning.parts[0].frame["metric_id"]) == {tasks.get("annotation").tuning.report_metric}
    leaked = lb.build_page(scores, policy="impute").section("annotation").blocks[0]
    note = next(p for p in leaked.parts if isinstance(p, lb.Note) and p.kind == "leakage")
    assert tasks.get("annotation").leakage_reference in note.text


def test_the_app_and_the_static_page_say_the_same(scores, static_page, app_run):
    page = lb.build_page(scores)
    shown = app_texts(app_run)
    for section in page.sections:
        assert f">{html.escape(section.title)}</h2>" in static_page
        for block in section.blocks:
            texts = list(shown_texts(block.parts))
            assert not block.title or block.title in shown
            # a block of charts alone is the app's: the static page leaves it out
            assert not (block.title and texts) or f"<h3>{html.escape(block.title)}</h3>" in static_page
            for text in texts:
                assert html.escape(text) in static_page, text
                assert any(text in s for s in shown), text
    assert html.escape(page.intro) in static_page and page.intro in shown
    qc = next(p for s in page.sections for b in s.blocks for p in b.parts if isinstance(p, lb.Note) and p.kind == "qc")
    # the flag names the control crossed and the entry that crossed it
    assert qc.items == (("ilisi on kang_ifnb: 1 of 2 method values outside the control range (50%; 1 above "
                         "the best control (random_embedding): scgpt)"),)


def test_silver_and_synthetic_notes_are_one_text(static_page, app_run):
    for note in (lb.silver_note("lung_atlas"), lb.synthetic_note("proxy_screen")):
        assert f"<b>{note.lead}</b> {html.escape(note.text)}" in static_page
        assert any(w.value == f"**{note.lead}** {note.text}" for w in app_run.warning)
    assert "indicative" in lb.silver_note("x").text


def test_leakage_note_is_one_text(scores, static_page, app_run):
    changes = lb.build_page(scores, policy="impute").section("annotation").blocks[0].parts
    note = next(p for p in changes if isinstance(p, lb.Note) and p.kind == "leakage")
    assert not any(note.lead in w.value for w in app_run.warning)  # the app shows leaked results by default
    app_run.radio(key="leakage_policy").set_value("impute").run()
    assert any(w.value == f"**{note.lead}** {note.text}" for w in app_run.warning)
    assert f"<b>{html.escape(note.lead)}</b> {html.escape(note.text)}" in static_page  # the imputed ranking


def test_choices_start_at_the_same_option(static_page, app_run):
    metric = tasks.get("perturbation").subgroup_metric
    assert app_run.selectbox(key="category_metric_perturbation").value == metric
    assert f"Metric by category: {metric}" in static_page
    # the static page draws the charts as inline SVG (no script), each with its caption
    assert "stVegaLiteChart" not in static_page and "<script" not in static_page
    assert static_page.count("<svg") >= 4 and html.escape(lb.VERSUS_CAPTION) in static_page


def test_static_page_escapes_every_text():
    frame = pd.DataFrame({"model_id": ["<i>x</i>"]})
    block = lb.Block("<h3>", (lb.Note("qc", "a < b", lead="<b>", items=("c & d",)), lb.Caption("<script>"),
                              lb.Table(frame, heading="<u>")))
    section = lb.TaskSection("annotation", "<title>", (block,), frame, frame)
    out = render_html(lb.Page("<t>", "x & y", (section,), frame))
    for raw in ("<i>x", "<h3><h3>", "<b><b>", "<script>", "<u>", "<title><", "<t>"):
        assert raw not in out
    for escaped in ("&lt;i&gt;x&lt;/i&gt;", "a &lt; b", "c &amp; d", "&lt;script&gt;", "x &amp; y"):
        assert escaped in out


def test_static_export_is_deterministic(scores, tmp_path):
    first = export_static(scores, tmp_path / "a")
    second = export_static(scores.sample(frac=1, random_state=3), tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    again = render_html(lb.build_page(scores, imputed_ranking=True))
    assert again == (tmp_path / "a" / "index.html").read_text(encoding="utf-8")
    assert "<script" not in again and "<link" not in again and "http" not in again


# --- data is text: no link, image or HTML from a submission's commit or a plug-in's exception -------

PLANTED = "[click](http://127.0.0.1:9/x) ![img](http://127.0.0.1:9/i.png) <img src=x onerror=alert(1)>"
HOSTILE = [PLANTED, "**bold** _it_ `code` ~~gone~~ ~x~", "# heading", "> quote", "- item", "1. item", "+ item",
           "---", "| a | b |", "$x^2$", ":red[alarm]", "a\\b \\[x]", "&lt;b&gt; &amp;", "see www.example.org",
           "mail me@example.org", "<http://127.0.0.1:9/>", "[ref]: http://127.0.0.1:9/", "_x_ __y__ a_b_c",
           "logistic_regression", "line one\n\n    indented code\n===", "[^1] [ ] [x]"]


@pytest.mark.parametrize("text", HOSTILE)
def test_markdown_text_shows_the_text_and_nothing_else(text):
    md = markdown_text(text)
    assert not live_markup(md), md
    assert shown(md) == " ".join(text.split()), md  # the same text (a line break shows as a space)
    assert not live_markup(f"**lead** {md}\n\n- {md}") - {"strong_open", "bullet_list_open"}


def test_app_shows_data_strings_as_text(tmp_path, monkeypatch):
    df = rich_scores()
    submitted = df["variant"] == "submitted"
    df.loc[submitted, "git_commit"] = PLANTED
    df.loc[submitted, "environment_json"] = json.dumps({"gpu": PLANTED})
    failed = df["status"] == "failed"
    assert submitted.any() and failed.any()
    df.loc[failed, "status_reason"] = PLANTED
    results.write(df, tmp_path / "scores.parquet")
    at = browser.app_test(monkeypatch, tmp_path / "scores.parquet")
    assert not at.exception
    # no element that Streamlit renders as Markdown holds a live link, image or HTML
    bodies = app_markdown(at)
    cells = table_markdown(at)
    for md in bodies + cells:
        assert not live_markup(md) - {"strong_open", "bullet_list_open"}, md
    assert not [md for md in bodies + cells if re.search(r"(?<!\\)[\[\]<>]", md)]  # every bracket escaped
    # ... and the planted strings are still shown, as the text they are
    note = next(md for md in bodies if "Submitted results" in md)
    assert shown(note).count(PLANTED) == 2  # the commit and the GPU it ran on
    reasons = next(t.value["status_reason"] for t in at.table if "status_reason" in t.value.columns)
    assert len(reasons) > 0 and all(shown(r) == PLANTED for r in reasons)
    # the browsable runs table (st.dataframe, not Markdown) shows the strings unchanged
    runs = next(d.value for d in at.dataframe if "git_commit" in d.value.columns)
    assert PLANTED in set(runs["git_commit"]) and PLANTED in set(runs["status_reason"])


def test_published_claims_are_a_tab_of_both_renderers(scores, tmp_path, app_run):
    """The app judges the suite's claims/ on its table; the static export does when given them."""
    from cellarena.cards.claim import load_claims  # noqa: PLC0415

    cards = load_claims(browser.REPO / "claims")
    page = lb.build_page(scores, claims=cards)
    assert lb.tabs(page)[-1][0] == lb.CLAIMS_TITLE and [t.label for t in app_run.tabs][-1] == lb.CLAIMS_TITLE
    export_static(scores, tmp_path / "static", claims=cards)
    static = (tmp_path / "static" / "index.html").read_text(encoding="utf-8")
    shown = app_texts(app_run)
    for block in page.claims.blocks:
        for text in shown_texts(block.parts):
            assert html.escape(text) in static, text
            assert any(text in s for s in shown), text
    verdicts = next(t.value for t in app_run.table if "original_numbers" in t.value.columns)
    assert len(verdicts) == 2 * len(cards) and set(verdicts["test"]) == {"original", "proxy"}
    # this small table has none of the claims' datasets: every test says so
    assert set(verdicts["verdict"]) == {"not run"} and verdicts["reason"].str.contains("not in this results").all()


def test_a_task_without_baselines_has_no_versus_block(scores):
    """A tuned entry that is not a baseline still meets its own default, but no baseline: no block."""
    only = scores[scores["task"] == "annotation"].copy()
    only.loc[only["model_kind"] == "baseline", "model_kind"] = "transformer"  # logreg, default and tuned
    titles = [b.title for b in lb.build_page(only).section("annotation").blocks]
    assert "Model vs best tuned baseline" not in titles and "Ranking: raw metric values" in titles


def test_a_missing_count_in_a_static_table_is_blank():
    from cellarena.leaderboard import export  # noqa: PLC0415
    from cellarena.leaderboard.page import Table  # noqa: PLC0415

    frame = pd.DataFrame({"verdict": ["reproduced", "not run"], "n_seeds": pd.array([3, None], dtype="Int64"),
                          "difference": [0.25, float("nan")]})
    cells = re.findall(r"<td>(.*?)</td>", export._table(Table(frame, key="t")))
    assert cells == ["reproduced", "3", "0.250", "not run", "", ""]
