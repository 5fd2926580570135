"""The built book (book/_build/html, made by `make book`) is complete, error-free and offline.

`make test` builds the book first; run `make book` before running these alone.
"""

import re
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from attribution_course.exercises import NOTEBOOK_STEMS

BOOK = Path(__file__).resolve().parents[1] / "book"
HTML = BOOK / "_build" / "html"

# chapters 02..08 share their stems with the exercise notebooks
CHAPTERS = ["01_introduction", *NOTEBOOK_STEMS, "09_cost"]
OTHER_PAGES = ["index", "reference", "bibliography"]
APPENDIX = [f"appendix/{stem}" for stem in NOTEBOOK_STEMS]
#: Chapters whose teaching relies on figures.
CHAPTERS_WITH_FIGURES = CHAPTERS[1:]
#: Hosts that serve scripts or styles from outside the site.
CDN_PATTERN = re.compile(r"cdn\.|unpkg\.com|jsdelivr|cdnjs|googleapis|gstatic|mathjax\.org|plot\.ly/|polyfill\.io", re.I)
NEW_PLOT = re.compile(r'Plotly\.newPlot\(\s*"([^"]+)",\s*(\[.*?\])\s*,\s*\{', re.S)


def pages() -> list[Path]:
    return sorted(p for p in HTML.rglob("*.html") if "_static" not in p.parts)


def soup(path: Path) -> BeautifulSoup:
    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


@pytest.fixture(scope="module", autouse=True)
def built_book():
    if not (HTML / "index.html").is_file():
        pytest.fail(f"{HTML} has no index.html: build the book with `make book` first")


@pytest.mark.parametrize("page", CHAPTERS + OTHER_PAGES + APPENDIX)
def test_page_exists(page):
    assert (HTML / f"{page}.html").is_file(), f"{page}.html is missing from {HTML}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_is_numbered_and_titled(chapter):
    title = soup(HTML / f"{chapter}.html").select_one("article h1, main h1 span.section-number")
    title = title.find_parent("h1") if title is not None and title.name == "span" else title
    number = CHAPTERS.index(chapter) + 1
    assert title is not None and title.get_text().startswith(f"{number}."), f"{chapter}: heading {title}"


def test_no_cell_output_contains_a_traceback():
    bad = []
    for page in pages():
        for output in soup(page).select("div.cell_output, div.output"):
            text = output.get_text()
            if "Traceback" in text or "traceback" in " ".join(output.get("class", [])) or re.search(r"\w+Error:", text):
                bad.append(f"{page.relative_to(HTML)}: {text[:200]!r}")
    assert not bad, "cell outputs with errors:\n" + "\n".join(bad)


def figures(page: Path) -> dict[str, str]:
    """Figure div id -> the JSON list of traces passed to Plotly.newPlot on ``page``."""
    return dict(NEW_PLOT.findall(page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("chapter", CHAPTERS_WITH_FIGURES)
def test_chapter_has_figures(chapter):
    assert figures(HTML / f"{chapter}.html"), f"{chapter} has no plotly figure"


def test_every_figure_has_its_data_and_the_page_loads_plotly_locally():
    checked = 0
    for page in pages():
        html = soup(page)
        divs = html.select("div.plotly-graph-div")
        if not divs:
            continue
        plots = figures(page)
        for div in divs:
            traces = plots.get(div["id"])
            assert traces is not None, f"{page.relative_to(HTML)}: figure {div['id']} has no Plotly.newPlot call"
            assert re.search(r'"(x|y|z)":\s*\[', traces), f"{page.relative_to(HTML)}: figure {div['id']} has no data"
            checked += 1
        sources = [s.get("src", "") for s in html.find_all("script")]
        assert any(src.split("?")[0].endswith("_static/plotly.min.js") for src in sources), (
            f"{page.relative_to(HTML)} shows figures but does not load _static/plotly.min.js")
    assert checked > 0, "no figure found in the whole book"
    assert (HTML / "_static" / "plotly.min.js").stat().st_size > 1_000_000


def test_pages_with_maths_load_mathjax_from_the_site():
    script = HTML / "_static" / "mathjax" / "tex-svg-full.js"
    assert script.is_file()
    page = soup(HTML / "05_first_order_approximation.html")
    assert page.select(".math"), "chapter 5 should contain maths"
    assert any("_static/mathjax/tex-svg-full.js" in s.get("src", "") for s in page.find_all("script"))


def test_no_page_references_a_cdn_or_external_script():
    bad = []
    for page in pages():
        html = soup(page)
        for script in html.find_all("script"):
            src = script.get("src")
            if src and re.match(r"^(https?:)?//", src):
                bad.append(f"{page.relative_to(HTML)}: script src {src}")
            if not src and CDN_PATTERN.search(script.get_text()):
                bad.append(f"{page.relative_to(HTML)}: inline script mentions {CDN_PATTERN.search(script.get_text())[0]}")
        for link in html.find_all("link"):
            href = link.get("href", "")
            if {"stylesheet", "preload", "modulepreload"} & set(link.get("rel", [])) and re.match(r"^(https?:)?//", href):
                bad.append(f"{page.relative_to(HTML)}: <link> {href}")
        for tag in html.find_all(["img", "iframe"]):
            if re.match(r"^(https?:)?//", tag.get("src", "")):
                bad.append(f"{page.relative_to(HTML)}: <{tag.name}> {tag['src']}")
    assert not bad, "external resources:\n" + "\n".join(bad)


@pytest.mark.parametrize("chapter", CHAPTERS[1:8])
def test_chapters_2_to_8_end_with_exercises_links(chapter):
    html = soup(HTML / f"{chapter}.html")
    links = [a.get("href", "") for a in html.find_all("a")]
    assert any(h.endswith(f"{chapter}.ipynb") for h in links), f"{chapter}: no download link to its exercises"
    assert any(f"appendix/{chapter}.html" in h for h in links), f"{chapter}: no link to its appendix solutions"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_ends_with_takeaways(chapter):
    headings = [h.get_text() for h in soup(HTML / f"{chapter}.html").find_all("h2")]
    assert any("Takeaways" in h for h in headings), f"{chapter}: no Takeaways section"


def test_chapter_2_reads_the_circuit():
    """Issue 9: the "Reading the circuit" section shows the attention heatmap, the per-head DLA
    bars and the roles table, and states a sentence about negative name movers either way."""
    page = soup(HTML / "02_task_and_metric.html")
    section = page.select_one("section#reading-the-circuit")
    assert section is not None, "chapter 2 has no 'Reading the circuit' section"
    traces = [json for _, json in NEW_PLOT.findall(str(section))]
    assert any('"type":"heatmap"' in t.replace(" ", "") for t in traces), "no attention heatmap in the section"
    assert any('"type":"bar"' in t.replace(" ", "") for t in traces), "no DLA bar chart in the section"
    headers = [th.get_text(strip=True) for th in section.select("table th")]
    assert headers[:2] == ["head", "role"], f"no roles table in the section: {headers}"
    assert "negative name mover" in section.get_text(), "the section says nothing about negative name movers"


# ---------------------------------------------------------------- reading aids (issue 12)


def figure_problems(page_path: Path, page: str) -> list[str]:
    """Every plotly figure is a numbered <figure> with a caption, and the plot has a text alternative."""
    problems = []
    for div in soup(page_path).select("div.plotly-graph-div"):
        figure = div.find_parent("figure")
        number = figure.select_one("figcaption .caption-number") if figure else None
        caption = figure.select_one("figcaption .caption-text") if figure else None
        if figure is None or not figure.get("id"):
            problems.append(f"{page}: figure {div.get('id')} is not in a <figure> with an id (no cell `mystnb: figure: name`)")
        if number is None or not re.search(r"\d", number.get_text()):
            problems.append(f"{page}: figure {div.get('id')} has no number")
        if caption is None or len(caption.get_text(strip=True)) < 20:
            problems.append(f"{page}: figure {div.get('id')} has no caption (or a stub): {caption}")
        if div.get("role") != "img" or len(div.get("aria-label", "")) < 20:
            problems.append(f"{page}: figure {div.get('id')} has no text alternative (role=img, aria-label)")
    return problems


def test_every_figure_is_numbered_captioned_and_described():
    problems = [problem for page in pages() for problem in figure_problems(page, str(page.relative_to(HTML)))]
    assert not problems, "\n".join(problems)


def test_figure_check_fails_on_a_bare_figure(tmp_path):
    bare = tmp_path / "bare.html"
    bare.write_text('<div class="cell_output"><div id="fig-1" class="plotly-graph-div"></div></div>')
    assert len(figure_problems(bare, "bare.html")) == 4, figure_problems(bare, "bare.html")


def test_figure_numbers_follow_the_chapter():
    """Sphinx numfig with the book's chapter numbers: chapter 3's first figure is "Fig. 3.1"."""
    numbers = [n.get_text(strip=True) for n in soup(HTML / "03_exact_ablation.html").select("figure figcaption .caption-number")]
    assert numbers and numbers[0].startswith("Fig. 3.1"), numbers


BIBLIOGRAPHY_LABEL = re.compile(r"^[^\W\d][^\d\[\]]*?(?: et al\.)?, (\d{4}[a-z]?|n\.d\.)$")


def test_bibliography_labels_read_like_the_citations():
    """[Nanda, 2023] in the text points at an entry labelled [Nanda, 2023], not at [1]."""
    bibliography = soup(HTML / "bibliography.html")
    labels = {}
    for entry in bibliography.select('[role="doc-biblioentry"], div.citation'):
        label = entry.select_one(".label")
        labels[entry.get("id")] = label.get_text(strip=True).strip("[]") if label else ""
    assert labels, "the bibliography page lists no entries"
    problems = [f"bibliography label {label!r} is not 'Author, year'" for label in labels.values() if not BIBLIOGRAPHY_LABEL.match(label)]
    cited = 0
    for chapter in CHAPTERS:
        for link in soup(HTML / f"{chapter}.html").select('a[href*="bibliography.html#"]'):
            target = link["href"].split("#", 1)[1]
            text = " ".join(link.get_text().split())
            cited += 1
            if target not in labels or text not in labels[target]:
                problems.append(f"{chapter}: citation {text!r} points at an entry labelled {labels.get(target)!r}")
    assert cited, "no citation found in the chapters"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("stem", NOTEBOOK_STEMS)
def test_appendix_page_links_back_to_its_chapter(stem):
    links = [a.get("href", "") for a in soup(HTML / "appendix" / f"{stem}.html").select("article a[href]")]
    assert any(h.split("#")[0] in (f"../{stem}.html", f"{stem}.html") for h in links), (
        f"appendix/{stem}: no link back to its chapter: {links[:20]}")


@pytest.mark.parametrize("stem", NOTEBOOK_STEMS)
def test_exercise_ratings_are_words_not_only_emoji(stem):
    """A screen reader hears "Difficulty: 2 of 3", not "large red circle" three times."""
    text_problems = []
    for heading_text in soup(HTML / "appendix" / f"{stem}.html").find_all(string=re.compile(r"(Difficulty|Importance):")):
        paragraph = heading_text.find_parent(["p", "li", "div"])
        spoken = paragraph.get_text(" ", strip=True)
        for hidden in paragraph.select('[aria-hidden="true"]'):
            spoken = spoken.replace(hidden.get_text(" ", strip=True), "")
        for kind in ("Difficulty", "Importance"):
            if kind + ":" in spoken and not re.search(kind + r": [1-3] of 3\b", spoken):
                text_problems.append(f"{kind} not in words: {spoken!r}")
        if re.search("[🔴🔵⚪]", spoken):
            text_problems.append(f"circles read aloud: {spoken!r}")
    assert not text_problems, "\n".join(text_problems)


@pytest.mark.parametrize("chapter", CHAPTERS[1:8])
def test_chapters_2_to_8_have_a_check_yourself_box(chapter):
    boxes = [b for b in soup(HTML / f"{chapter}.html").select("div.admonition") if "Check yourself" in b.get_text()]
    assert boxes, f"{chapter}: no 'Check yourself' box"
    assert all("Answer" in b.get_text() and "Question" in b.get_text() for b in boxes), f"{chapter}: a box without question and answer"


def test_both_directions_are_separate_named_traces():
    """Chapter 6's patching scatter: noising and denoising are two series, not one trace of both."""
    section = soup(HTML / "06_getting_the_sign_right.html").select_one("section#noising-and-denoising")
    names = re.findall(r'"name":\s*"([^"]+)"', " ".join(json for _, json in NEW_PLOT.findall(str(section))))
    assert "noising" in names and "denoising" in names, names
