"""The course's repository URL is one setting; every repository, Binder and edit link follows it.

Set ``course_repository_url`` in ``book/_config.yml`` (``sphinx.config``), or the environment
variable ``COURSE_REPOSITORY_URL`` (it wins; the publishing workflow sets it to the repository it
runs in). With neither set, the book shows no repository button and no launch buttons: a link
is never built from a placeholder.

Jupyter Book spreads this over several theme options (``repository_url``, ``use_*_button``,
``launch_buttons``); they are written here, at ``config-inited``, from the one URL, before
sphinx-book-theme reads them at ``builder-inited``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from sphinx.errors import ConfigError

ENVIRONMENT_VARIABLE = "COURSE_REPOSITORY_URL"
# https://github.com/<owner>/<name>: Binder and the theme derive their links from these two parts.
# A placeholder owner such as OWNER is refused: it would render links that 404.
GITHUB_REPOSITORY = re.compile(r"^https://github\.com/(?!OWNER/)[A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9._-]+$")
LAUNCH_BUTTONS = {"notebook_interface": "jupyterlab", "binderhub_url": "https://mybinder.org"}
REPOSITORY_BUTTONS = ("use_repository_button", "use_issues_button", "use_edit_page_button")


def repository_url(configured: str, environ=os.environ) -> str:
    """The repository URL in force: the environment variable, else the configured value ('' = none)."""
    url = (environ.get(ENVIRONMENT_VARIABLE) or configured or "").strip().rstrip("/")
    if url and not GITHUB_REPOSITORY.match(url):
        source = ENVIRONMENT_VARIABLE if environ.get(ENVIRONMENT_VARIABLE) else "course_repository_url in book/_config.yml"
        raise ConfigError(f"{source} is {url!r}: expected https://github.com/<owner>/<repository>, or nothing")
    return url


def book_repository_url(config_path: Path, environ=os.environ) -> str:
    """The repository URL a build of the book at ``config_path`` (its _config.yml) uses (for the tests)."""
    import yaml

    config = yaml.safe_load(Path(config_path).read_text()) or {}
    return repository_url(config.get("sphinx", {}).get("config", {}).get("course_repository_url", ""), environ)


def theme_options_for(url: str, theme_options: dict) -> dict:
    """``theme_options`` with its repository and launch settings derived from ``url``."""
    options = {key: value for key, value in theme_options.items() if key not in ("repository_url", "launch_buttons")}
    if not url:
        options.update({button: False for button in REPOSITORY_BUTTONS})
        options["launch_buttons"] = {}
        return options
    options.update(
        repository_url=url,
        use_repository_button=True,
        launch_buttons={**theme_options.get("launch_buttons", {}), **LAUNCH_BUTTONS},
    )
    return options


def _apply(app, config) -> None:
    url = repository_url(config.course_repository_url)
    config.html_theme_options = theme_options_for(url, config.html_theme_options)


def _offer_executed_notebook(app, pagename, templatename, context, doctree) -> None:
    """Without launch buttons the theme skips its notebook copy: offer a chapter's .ipynb here.

    sphinx-book-theme copies a Markdown chapter's executed notebook into ``_sources`` (for its
    ".ipynb" download button) only while it builds launch links; this does the same copy
    when there are none, so the download button does not depend on the repository URL.
    """
    if app.config.html_theme_options.get("launch_buttons") or not context.get("sourcename", "").endswith(".md"):
        return
    executed = Path(app.outdir).parent / "jupyter_execute" / f"{pagename}.ipynb"
    if not executed.is_file():
        return
    target = Path(app.outdir) / "_sources" / f"{pagename}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(executed, target)
    context["ipynb_source"] = f"{pagename}.ipynb"


COLAB_URL = "https://colab.research.google.com"
EXERCISES_DIR = "exercises"


def colab_exercises_url(url: str, branch: str, pagename: str, repository_root: Path) -> str:
    """Colab's link to the exercises notebook of a chapter ('' without a repository URL or exercises).

    Colab opens notebooks from GitHub, not a chapter's MyST Markdown source (the theme's own
    Colab button would point at ``book/<chapter>.md``), so the link opens the chapter's exercises
    notebook, ``exercises/<chapter>.ipynb``, whose first cell installs the course in Colab.
    """
    if not url or not (repository_root / EXERCISES_DIR / f"{pagename}.ipynb").is_file():
        return ""
    owner_and_name = url.split("github.com/", 1)[1]
    return f"{COLAB_URL}/github/{owner_and_name}/blob/{branch}/{EXERCISES_DIR}/{pagename}.ipynb"


def _add_colab_button(app, pagename, templatename, context, doctree) -> None:
    """A "Colab (exercises)" entry in the theme's launch menu of a chapter with exercises."""
    options = app.config.html_theme_options
    link = colab_exercises_url(options.get("repository_url", ""), options.get("repository_branch") or "main",
                               pagename, Path(app.srcdir).parent)
    if not link:
        return
    for group in context.get("header_buttons", []):
        if group.get("label") == "launch-buttons":
            group["buttons"].append({
                "type": "link", "text": "Colab (exercises)", "tooltip": "Open this chapter's exercises in Colab",
                "icon": "_static/images/logo_colab.png", "url": link,
            })


def setup(app):
    app.add_config_value("course_repository_url", "", "html", types=[str])
    app.connect("config-inited", _apply)
    # after the theme's prep_header_buttons (500), before its add_header_buttons (501)
    app.connect("html-page-context", _offer_executed_notebook, priority=500)
    # after the theme's add_launch_buttons (501), which makes the launch menu
    app.connect("html-page-context", _add_colab_button, priority=502)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
