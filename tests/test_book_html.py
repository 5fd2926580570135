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
