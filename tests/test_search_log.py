"""docs/negative_head_search.md is written by attribution_course.search_log from the runs' JSON, not by hand."""

from pathlib import Path

from attribution_course.search_log import io_selectivity, recipe_changes, search_log

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_committed_search_log_is_what_the_script_writes_from_the_runs():
    runs = sorted((DOCS / "negative_head_search").glob("*.json"))
    assert runs, "the runs' training_info.json files are missing"
    committed = (DOCS / "negative_head_search.md").read_text()
    assert committed == search_log(runs), "regenerate with `make search-log`; the log must not be edited by hand"


def test_recipes_are_compared_with_the_first_models_recipe_not_the_shipped_one():
    """The *recipe* column lists changes from ``Recipe()``'s defaults (run r0's recipe), not from ``SHIPPED_RECIPE``."""
    from dataclasses import asdict

    from attribution_course.train import SHIPPED_RECIPE, Recipe

    assert recipe_changes(asdict(Recipe())) == "(the first model's recipe)"
    shipped = recipe_changes(asdict(SHIPPED_RECIPE))
    assert "name_embedding_std=1.0" in shipped and "phase2_lower_copied_name=8.0" in shipped
    assert recipe_changes({**asdict(Recipe()), "hedge_s": 0.25}) == "hedge_s=0.25"


def test_io_selectivity_is_attention_to_io_minus_both_subject_tokens():
    row = {"attention_to_io": 0.5, "attention_to_s1": 0.1, "attention_to_s2": 0.15}
    assert abs(io_selectivity(row) - 0.25) < 1e-12


def test_diagnostic_runs_stay_out_of_the_candidate_summaries(tmp_path):
    """A run whose heads may not attend to their own position is not a candidate for the shipped model:
    its most IO-selective head must not be reported as the candidates' best, and it gets its own line."""
    import json

    candidate = json.loads((DOCS / "negative_head_search" / "20_f1.json").read_text())
    diagnostic = json.loads(json.dumps(candidate))
    diagnostic["recipe"].update(phase2_steps=10, phase2_new_layers=1, phase2_new_heads_skip_self=1)
    diagnostic["head_survey"]["heads"][0].update(attention_to_io=0.9, attention_to_s1=0.0, attention_to_s2=0.0)
    diagnostic["head_survey"]["heads"].append({**candidate["head_survey"]["heads"][0], "head": "L4H0",
                                               "direct_logit_attribution": -0.75})
    paths = []
    for name, info in (("01_candidate", candidate), ("02_diagnostic", diagnostic)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(info))
    log = search_log(paths)
    assert "Across all 1 candidate runs" in log and "01_candidate's L2H2" in log
    assert "- 02_diagnostic: the appended heads' direct logit attributions run from -0.75 (L4H0)" in log


def test_runs_trained_reading_names_only_get_a_line_with_their_attention_under_the_mask(tmp_path):
    import json

    run = json.loads((DOCS / "negative_head_search" / "20_f1.json").read_text())
    run["attention_under_names_only_mask"] = {
        "L4H0": {"io": 0.5, "s1": 0.1, "s2": 0.2, "first": 0.2},
        "L4H1": {"io": 0.2, "s1": 0.2, "s2": 0.4, "first": 0.2},
    }
    path = tmp_path / "01_masked.json"
    path.write_text(json.dumps(run))
    assert ("- 01_masked: on average the appended heads give IO 0.35, S1 0.15, S2 0.30 and the first token 0.20; "
            "in no head do the attention to IO and to S1 differ by more than 0.40 (L4H0), and the most any head gives IO "
            "is 0.50.") in search_log([path])


def test_runs_trained_with_values_from_the_embeddings_get_a_line_on_their_appended_heads(tmp_path):
    import json

    run = json.loads((DOCS / "negative_head_search" / "20_f1.json").read_text())
    run["recipe"].update(phase2_steps=10, phase2_new_layers=1, phase2_new_heads_token_values=0.8)
    head = run["head_survey"]["heads"][0]
    run["head_survey"]["heads"] += [
        {**head, "head": "L4H0", "direct_logit_attribution": -0.5, "attention_to_io": 0.4, "attention_to_s1": 0.1,
         "attention_to_s2": 0.1, "attention_to_end": 0.2},
        {**head, "head": "L4H1", "direct_logit_attribution": 0.1, "attention_to_io": 0.0, "attention_to_s1": 0.3,
         "attention_to_s2": 0.1, "attention_to_end": 0.4},
    ]
    split = {"io": -0.5, "s1": 0.25, "s2": 0.0, "end": 0.0, "other": -0.5}
    run["appended_heads_under_token_values"] = {
        "clean_logit_diff": 2.5,
        "heads": [{**row, "direct_logit_attribution": dla} for row, dla in zip(run["head_survey"]["heads"][-2:], (-1.5, -0.25))],
        "direct_logit_attribution_by_source": {"plain": {"L4H0": split}, "rerouted": {"L4H0": split, "L4H1": split}},
    }
    path = tmp_path / "01_rerouted.json"
    path.write_text(json.dumps(run))
    log = search_log([path])
    assert "learned with values from the embeddings" in log
    assert ("- 01_rerouted: the appended heads' direct logit attributions run from -0.50 (L4H0) to +0.10; at most 0.40 "
            "of a head's attention goes to IO, and on average 0.20 to IO, 0.30 to S1 and S2, 0.30 to the final position "
            "itself and 0.20 to the other words") in log
    assert (f"With values from the embeddings, the logit difference is 2.50 (plain: "
            f"{run['head_survey']['clean_logit_diff']:.2f}) and the appended heads' direct logit attributions run from "
            "-1.50 to -0.25.") in log
    assert ("split by the position read, that write comes from IO -1.00, S1 +0.50, S2 +0.00, the final position +0.00 "
            "and the other words -1.00 (plain: IO -0.50, S1 +0.25, S2 +0.00, the final position +0.00 and the other "
            "words -0.50).") in log
    plain = json.loads((DOCS / "negative_head_search" / "20_f1.json").read_text())
    path.write_text(json.dumps(plain))
    assert "learned with values from the embeddings" not in search_log([path])


def test_runs_that_measured_name_legibility_share_a_line_when_their_numbers_agree(tmp_path):
    import json

    run = json.loads((DOCS / "negative_head_search" / "20_f1.json").read_text())
    paths = []
    for name, legibility in (("01_a", [0.98, 0.5]), ("02_b", [0.98, 0.5]), ("03_c", [0.98, 0.4])):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({**run, "io_name_legibility": legibility}))
    log = search_log(paths)
    assert "- 01_a, 02_b: 0.98, 0.50\n- 03_c: 0.98, 0.40" in log
    assert "How much of the IO name a least-squares read" not in search_log([DOCS / "negative_head_search" / "20_f1.json"]), "no measurement, no line"


def test_runs_are_logged_in_the_order_of_their_numbers_not_alphabetically(tmp_path):
    import json

    run = (DOCS / "negative_head_search" / "20_f1.json").read_text()
    for name in ("100_late", "9_early", "10_middle"):
        (tmp_path / f"{name}.json").write_text(run)
    log = search_log(sorted(tmp_path.glob("*.json")))  # alphabetically: 100_late, 10_middle, 9_early
    assert log.index("| 9_early |") < log.index("| 10_middle |") < log.index("| 100_late |")
