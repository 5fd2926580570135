"""docs/negative_head_search.md is written by attribution_course.search_log from the runs' JSON, not by hand."""

from pathlib import Path

from attribution_course.search_log import io_selectivity, search_log

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_committed_search_log_is_what_the_script_writes_from_the_runs():
    runs = sorted((DOCS / "negative_head_search").glob("*.json"))
    assert runs, "the runs' training_info.json files are missing"
    committed = (DOCS / "negative_head_search.md").read_text()
    assert committed == search_log(runs), "regenerate with `make search-log`; the log must not be edited by hand"


def test_io_selectivity_is_attention_to_io_minus_both_subject_tokens():
    row = {"attention_to_io": 0.5, "attention_to_s1": 0.1, "attention_to_s2": 0.15}
    assert abs(io_selectivity(row) - 0.25) < 1e-12
