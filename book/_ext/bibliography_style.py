"""Bibliography labels in the same author-year form as the citations in the text.

The chapters cite with ``bibtex_reference_style: author_year`` ("[Nanda, 2023]"); pybtex's
styles label the bibliography's entries with numbers ("[1]"), so a reader could not match the
two. This registers the pybtex formatting style ``author_year_labels`` (``bibtex_default_style``
in book/_config.yml): pybtex's alphabetical "plain" style with labels written like the citations,
"Nanda, 2023", "Heimersheim and Nanda, 2024", "Wang et al., 2023" (and "2023a", "2023b" when
two entries would get the same label).
"""

from __future__ import annotations

from collections import Counter
from string import ascii_lowercase

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle

STYLE_NAME = "author_year_labels"


def _last_name(person) -> str:
    return Text.from_latex(" ".join(person.prelast_names + person.last_names)).render_as("text")


def author_year_label(entry) -> str:
    """'Nanda, 2023', 'Heimersheim and Nanda, 2024' or 'Wang et al., 2023' (as the citations read)."""
    people = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [_last_name(person) for person in people]
    if not names:
        authors = Text.from_latex(entry.fields.get("title", entry.key)).render_as("text")
    elif len(names) == 1:
        authors = names[0]
    elif len(names) == 2:
        authors = f"{names[0]} and {names[1]}"
    else:
        authors = f"{names[0]} et al."
    return f"{authors}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearLabels(BaseLabelStyle):
    def format_labels(self, sorted_entries):
        entries = list(sorted_entries)
        labels = [author_year_label(entry) for entry in entries]
        repeated, seen = Counter(labels), Counter()
        for label in labels:
            if repeated[label] > 1:
                seen[label] += 1
                label += ascii_lowercase[seen[label] - 1]
            yield label


class AuthorYearStyle(PlainStyle):
    default_label_style = STYLE_NAME


register_plugin("pybtex.style.labels", STYLE_NAME, AuthorYearLabels)
register_plugin("pybtex.style.formatting", STYLE_NAME, AuthorYearStyle)


def setup(app):
    return {"parallel_read_safe": True, "parallel_write_safe": True}
