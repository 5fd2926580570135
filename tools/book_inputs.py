"""Is book/_build/html still the build of the files in this checkout?

``make book`` always builds (every chapter executed) and then records a digest of everything the build
could read: every file git knows of or would add (tracked or untracked, not ignored), except the tests
and the CI workflows, plus the npm front-end bundle if installed (it changes what the pages serve), the
environment variables the build reads, and the Python and package versions of the environment running
it. It also records the newest modification time in book/_build/html, so that a build run by hand since
(``jupyter-book build`` directly, which may rewrite only some pages) makes the recorded digest void.
``make test`` first runs ``check``: when the digest matches, the book from ``make book`` is used as it is,
so ``make book && make test`` builds once; otherwise (no digest, a file changed, no git) it builds the
book again.

    python tools/book_inputs.py write-pending   # before the build: book/_build/.inputs-digest.pending
    python tools/book_inputs.py commit          # after a build that passed: the pending digest counts
    python tools/book_inputs.py check           # exit 0 when the built book is up to date, 1 when not
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Relative to the checkout's root:
HTML = Path("book/_build/html")
DIGEST = Path("book/_build/.inputs-digest")
PENDING = Path("book/_build/.inputs-digest.pending")
# Not read by the build: a changed test or workflow does not make the built book stale.
NOT_INPUTS = ("tests/", ".github/")
# Read by book/_ext/repository_links.py: it decides the pages' repository, Binder and Colab links.
ENVIRONMENT = ("COURSE_REPOSITORY_URL",)
# Installed by .ci/install-site-assets (ignored by git); its presence decides which plotly.js the pages load.
SITE_ASSET = "tools/site-assets/node_modules/plotly.js-cartesian-dist-min/plotly-cartesian.min.js"


class NoCheckout(RuntimeError):
    """Raised when git cannot list the files (no git, or not a checkout): the inputs are unknown."""


def input_files(root: Path = ROOT) -> list[str]:
    """Paths (relative, sorted) of the files the book build may read."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                 cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise NoCheckout(f"git cannot list the files of {root}: {error}") from error
    paths = {p for p in listing.decode().split("\0") if p}
    return sorted(p for p in paths if not p.startswith(NOT_INPUTS))


def inputs_digest(root: Path = ROOT) -> str:
    """SHA-256 over each input's path and content (a deleted tracked file counts as deleted)."""
    digest = hashlib.sha256()
    for relative in input_files(root):
        path = root / relative
        digest.update(relative.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"(missing)")
    bundle = root / SITE_ASSET
    digest.update(b"site asset: " + (hashlib.sha256(bundle.read_bytes()).digest() if bundle.is_file() else b"none"))
    for name in ENVIRONMENT:
        digest.update(f"\0{name}={os.environ.get(name, '')}".encode())
    digest.update(environment_description().encode())
    return digest.hexdigest()


def environment_description() -> str:
    """The interpreter and every installed distribution with its version (what ``pip freeze`` would show)."""
    installed = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    return "\n".join([sys.version, *installed])


def build_stamp(root: Path = ROOT) -> str:
    """The newest modification time of any file of the built HTML: a later build rewrites at least one page."""
    return str(max(path.stat().st_mtime_ns for path in (root / HTML).rglob("*") if path.is_file()))


def is_up_to_date(root: Path = ROOT) -> tuple[bool, str]:
    """(up to date, the reason in words)."""
    digest_file = root / DIGEST
    if not (root / HTML / "index.html").is_file():
        return False, "no built book"
    if not digest_file.is_file():
        return False, f"no {DIGEST} (the last build did not finish, or predates it)"
    try:
        current = inputs_digest(root)
    except NoCheckout as error:
        return False, str(error)
    recorded = digest_file.read_text().split()
    if recorded[:1] != [current]:
        return False, "files or the environment changed since the last make book"
    if recorded[1:] != [build_stamp(root)]:
        return False, "the book was built again since make book, by other means"
    return True, "built by make book from the files as they are now"


def main(argv: list[str], root: Path = ROOT) -> int:
    command = argv[0] if argv else ""
    digest_file, pending = root / DIGEST, root / PENDING
    if command == "write-pending":
        digest_file.unlink(missing_ok=True)  # a build that fails leaves no digest behind
        pending.parent.mkdir(parents=True, exist_ok=True)
        try:
            pending.write_text(inputs_digest(root) + "\n")
        except NoCheckout as error:
            pending.unlink(missing_ok=True)
            print(f"book_inputs: {error}; make test will always rebuild the book", file=sys.stderr)
        return 0
    if command == "commit":
        if pending.is_file():
            pending.write_text(pending.read_text().strip() + "\n" + build_stamp(root) + "\n")
            pending.replace(digest_file)
        return 0
    if command == "check":
        fresh, reason = is_up_to_date(root)
        print(f"book/_build/html: {'up to date' if fresh else 'rebuilding'} ({reason})")
        return 0 if fresh else 1
    print("usage: python tools/book_inputs.py write-pending | commit | check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
