"""`make test` reuses the book of `make book` only when nothing the build reads has changed (tools/book_inputs.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("book_inputs", ROOT / "tools" / "book_inputs.py")
book_inputs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(book_inputs)


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A git checkout with a chapter, a test, an ignored file and a built book whose digest is recorded."""
    files = {"book/01_intro.md": "# Intro\n", "src/pkg.py": "X = 1\n", "tests/test_x.py": "def test(): pass\n",
             ".gitignore": "book/_build/\nscratch/\ntools/site-assets/node_modules/\n", "book/_build/html/index.html": "<html></html>"}
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    monkeypatch.delenv("COURSE_REPOSITORY_URL", raising=False)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    digest_file = tmp_path / "book" / "_build" / ".inputs-digest"
    digest_file.write_text(f"{book_inputs.inputs_digest(tmp_path)}\n{book_inputs.build_stamp(tmp_path)}\n")
    return tmp_path, digest_file


def fresh(checkout) -> bool:
    root, _ = checkout
    return book_inputs.is_up_to_date(root)[0]


def test_an_unchanged_checkout_is_up_to_date(checkout):
    assert fresh(checkout)


def test_the_repository_ignores_the_built_book():
    """The digest and the HTML live in book/_build, which must not count as an input of the build."""
    assert not [path for path in book_inputs.input_files() if path.startswith("book/_build/")]


def test_the_commands_make_book_and_make_test_run(checkout, capsys):
    """write-pending before the build, commit after it, check before the tests; a failed build leaves no digest."""
    root, digest_file = checkout
    digest_file.unlink()
    assert book_inputs.main(["write-pending"], root) == 0 and not digest_file.exists()
    assert book_inputs.main(["check"], root) == 1
    assert book_inputs.main(["commit"], root) == 0 and digest_file.exists()
    assert book_inputs.main(["check"], root) == 0
    assert "up to date" in capsys.readouterr().out
    (root / "book" / "01_intro.md").write_text("# Intro, edited\n")
    assert book_inputs.main(["check"], root) == 1
    assert "rebuilding (files or the environment changed" in capsys.readouterr().out
    book_inputs.main(["write-pending"], root)  # the build starts ... and fails: no commit
    assert not digest_file.exists() and book_inputs.main(["check"], root) == 1
    assert book_inputs.main(["nonsense"], root) == 2


def test_tests_and_ignored_files_do_not_make_the_book_stale(checkout):
    root, _ = checkout
    (root / "tests" / "test_x.py").write_text("def test(): assert True\n")
    (root / "tests" / "test_new.py").write_text("")
    (root / "scratch").mkdir()
    (root / "scratch" / "notes.txt").write_text("ignored by git")
    assert fresh(checkout)


@pytest.mark.parametrize("change", ["edit a chapter", "edit the package", "add an untracked file", "delete a tracked file",
                                    "install the site assets", "update the site assets", "set the repository URL",
                                    "install a package", "build by hand"])
def test_a_change_the_build_could_read_makes_the_book_stale(checkout, change, monkeypatch):
    root, _ = checkout
    if change == "edit a chapter":
        (root / "book" / "01_intro.md").write_text("# Intro, edited\n")
    elif change == "edit the package":
        (root / "src" / "pkg.py").write_text("X = 2\n")
    elif change == "add an untracked file":
        (root / "book" / "02_new.md").write_text("# New\n")
    elif change == "delete a tracked file":
        (root / "src" / "pkg.py").unlink()
    elif change == "update the site assets":
        (root / book_inputs.SITE_ASSET).parent.mkdir(parents=True)
        (root / book_inputs.SITE_ASSET).write_text("plotly 1")
        _, digest_file = checkout
        digest_file.write_text(f"{book_inputs.inputs_digest(root)}\n{book_inputs.build_stamp(root)}\n")
        assert fresh(checkout)
        (root / book_inputs.SITE_ASSET).write_text("plotly 2")
    elif change == "install a package":
        monkeypatch.setattr(book_inputs, "environment_description", lambda: "3.11\nnew-package==1.0")
    elif change == "build by hand":  # rewrites one page, not the index
        page = root / "book" / "_build" / "html" / "03_chapter.html"
        page.write_text("<html>rebuilt</html>")
        os.utime(page, ns=(page.stat().st_atime_ns, page.stat().st_mtime_ns + 10**9))
    elif change == "set the repository URL":
        monkeypatch.setenv("COURSE_REPOSITORY_URL", "https://github.com/someone/course")
    else:
        (root / book_inputs.SITE_ASSET).parent.mkdir(parents=True)
        (root / book_inputs.SITE_ASSET).write_text("plotly")
    assert not fresh(checkout)


def test_no_digest_no_book_or_no_git_means_rebuild(checkout, tmp_path_factory):
    root, digest_file = checkout
    (root / "book" / "_build" / "html" / "index.html").unlink()
    assert book_inputs.is_up_to_date(root) == (False, "no built book")
    (root / "book" / "_build" / "html" / "index.html").write_text("<html></html>")
    assert book_inputs.is_up_to_date(root)[1].startswith("the book was built again")
    digest_file.write_text(f"{book_inputs.inputs_digest(root)}\n{book_inputs.build_stamp(root)}\n")
    assert fresh(checkout)
    digest_file.unlink()
    assert not fresh(checkout)
    plain = tmp_path_factory.mktemp("not_a_checkout")
    (plain / "book" / "_build" / "html").mkdir(parents=True)
    (plain / "book" / "_build" / "html" / "index.html").write_text("<html></html>")
    (plain / "book" / "_build" / ".inputs-digest").write_text("0" * 64)
    up_to_date, reason = book_inputs.is_up_to_date(plain)
    assert not up_to_date and "git cannot list" in reason
