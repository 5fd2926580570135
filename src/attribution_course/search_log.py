"""The log of the training recipes tried in the search for a negative name mover.

Each attempt is a ``training_info.json`` written by ``python -m attribution_course.train``
(its recipe, held-out evaluation and per-head survey), copied to
``docs/negative_head_search/NAME.json``. This module turns them into the table of
``docs/negative_head_search.md``::

    python -m attribution_course.search_log docs/negative_head_search/*.json \\
        --out docs/negative_head_search.md

so every number in the log comes from a training run, not from an edit.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from .train import Recipe

CRITERIA = (
    ("attends_to_io", "attends to IO"),
    ("negative_direct_logit_attribution", "DLA < 0"),
    ("removal_helps_by_10_percent", "removal helps ≥ 10%"),
    ("minus_a_grad_right_sign", "−a·∂M/∂a > 0"),
)


def recipe_changes(recipe: dict) -> str:
    """The recipe's differences from the course's first model's recipe (``Recipe()``'s defaults, run ``r0``),
    e.g. ``hedge_s=0.25, n_layer=6``."""
    defaults = asdict(Recipe())
    changed = [f"{key}={value}" for key, value in recipe.items() if defaults.get(key) != value]
    return ", ".join(changed) or "(the first model's recipe)"


def best_candidate(heads: list[dict]) -> dict:
    """The head that passes most criteria, ties broken by the largest zero-ablation gain."""
    return max(heads, key=lambda row: (sum(row["negative_name_mover_criteria"].values()), row["zero_ablation_effect"]))


#: A head "writes against the answer" in the log's summary when its direct logit attribution is this or lower.
STRONG_NEGATIVE_DLA = -0.1

#: A negative name mover counts only in a model that solves the task (issue 9's bar).
SOLVES_IOI_TOP1 = 0.95


def movers(survey: dict, test: dict) -> str:
    """The negative name movers, or why heads passing the four tests do not count."""
    found = ", ".join(survey["negative_name_movers"])
    if not found:
        return "none"
    if test["top1_accuracy"] < SOLVES_IOI_TOP1:
        return f"none ({found} passes, but the model does not solve IOI: its effects are all tiny)"
    return f"**{found}**"


def attention_to_s(row: dict) -> float:
    """A head's final-position attention to both subject tokens, S1 and S2."""
    return row["attention_to_s1"] + row["attention_to_s2"]


def io_selectivity(row: dict) -> float:
    """How much more of its final-position attention a head gives the IO name than both subject tokens."""
    return row["attention_to_io"] - attention_to_s(row)


def most_io_selective(heads: list[dict]) -> str:
    """The head that prefers IO over the subject most, e.g. ``L2H2 +0.06``."""
    row = max(heads, key=io_selectivity)
    return f"{row['head']} {io_selectivity(row):+.2f}"


def most_helpful_removal(heads: list[dict]) -> dict:
    """The head whose zero ablation raises the logit difference most."""
    return max(heads, key=lambda row: row["zero_ablation_effect"])


def removal_gain_cell(row: dict) -> str:
    """E.g. ``L4H3 +0.867 (-0.112 with the final LN scale fixed)``."""
    return f"{row['head']} {row['zero_ablation_effect']:+.3f} ({row['zero_ablation_effect_fixed_final_ln']:+.3f} with the final LN scale fixed)"


def works_through_final_ln(row: dict) -> bool:
    """Whether less than half of a head's removal gain (a positive one) survives with the final LayerNorm's scale fixed."""
    if row["zero_ablation_effect"] <= 0:
        raise ValueError(f"{row['head']}'s removal does not help ({row['zero_ablation_effect']:+.3f}): no gain to keep")
    return row["zero_ablation_effect_fixed_final_ln"] < 0.5 * row["zero_ablation_effect"]


def log_row(name: str, info: dict) -> str:
    survey, test = info["head_survey"], info["evaluation"]["test"]
    heads = survey["heads"]
    largest = max(abs(row["zero_ablation_effect"]) for row in heads)
    best = best_candidate(heads)
    missing = [label for key, label in CRITERIA if not best["negative_name_mover_criteria"][key]]
    return (
        f"| {name} | {recipe_changes(info['recipe'])} | {test['top1_accuracy']:.1%} | {test['mean_logit_diff']:.2f} "
        f"| {best['head']}: IO {best['attention_to_io']:.2f} / S {attention_to_s(best):.2f}, "
        f"DLA {best['direct_logit_attribution']:+.3f}, removal {best['zero_ablation_effect']:+.3f} "
        f"({best['zero_ablation_effect'] / largest:+.0%} of largest), −a·∂M/∂a {best['minus_a_grad']:+.3f} "
        f"| {', '.join(missing) or '—'} | {most_io_selective(heads)} | {removal_gain_cell(most_helpful_removal(heads))} "
        f"| {movers(survey, test)} | {info['train_seconds']} s |"
    )


def search_log(paths: list[Path]) -> str:
    lines = [
        "# The search for a negative name mover",
        "",
        "Written by `python -m attribution_course.search_log` from the `training_info.json` of each run",
        "(`docs/negative_head_search/*.json`); do not edit by hand. The search ended with `u8`, whose L4H1 is a",
        "negative name mover: `u8` is now the shipped model (`SHIPPED_RECIPE`), and chapters 2 and 6 read its circuit.",
        "",
        "Each run is the recipe of the course's first model, `r0` (`Recipe()`'s defaults), with the changes in the",
        "*recipe* column, trained by `python -m attribution_course.train --variant first --out DIR` with those",
        "changes as flags (seed 0, one thread) and surveyed on 200 held-out prompts by",
        "`attribution_course.head_survey`. *Best candidate* is",
        "the head passing most of the four criteria of the model card; *fails* lists the criteria it misses.",
        "Training time is wall time on a machine shared with other jobs (for resumed runs, the second phase only).",
        "",
        "How the runs were made: `r0` is the course's first shipped model, surveyed afterwards.",
        "The other runs used the search-time sampler of commit 010988d, which draws the names of an IOI",
        "sentence in another order (same distribution, other random stream); r1-r3 an earlier draft of it with",
        "the same distribution. `c2` and `c4` resumed `c1`'s checkpoint at step 1800, `d2`-`d8` resumed `d1`'s",
        "at step 2000 (`--checkpoint`/`--resume` restore weights, optimiser, schedule and both random",
        "generators, so the shared first phase is the same as in a straight run; `make train` trains the shipped",
        "model, `u8`, straight through, and gives bit for bit the weights of the resumed run logged here, the same",
        "SHA-256 of `model.safetensors`). A head that passes the four tests counts only in a model that solves IOI",
        "(held-out top-1 at least 95%).",
        "",
        "Runs from 18 on (`e` to `j`) used the sampler of `make train` itself, extended by flags that leave the",
        "default recipe's draws alone: `distractor` (a share of IOI sentences after a filler sentence about a third",
        "name, so every position moves and a name in context is neither repeated nor the answer), `shape_variants`",
        "(a second place and a second object grown into a share of the templates, so the gaps between the names,",
        "S2 and the final word vary), `two_pairs` (sentences with two pairs of names, \"A and B met C and D ...\",",
        "whose answer is the partner of the subject, so that subtracting the subject from the names in context",
        "no longer leaves the answer), `phase2_dropout` and `phase2_head_dropout` (each head's whole output dropped",
        "for a sentence, which rewards heads that repair another head's removal, as copy suppression does in",
        "GPT-2 small). The `h` runs try the issue's other levers: more heads, weight decay, a fifth layer with a",
        "longer first phase. `g2`-`g5` resumed `g1`'s checkpoint at step 2000, which is the first model's (`r0`'s)",
        "own training state at its last step. `f3`",
        "(`--distractor 0.8`, otherwise as `f1`) was stopped early to free a core for `g1`. `j1` and `j2` ran",
        "the same first phase side by side (their hedging differs only in the second).",
        "",
        "The `k` runs resumed `g1`'s checkpoint too, and appended fresh blocks above the trained four",
        "(`phase2_new_layers`; each starts as the identity, its writes to the residual stream zero), in most",
        "with the trained blocks frozen (`phase2_train_new_only`): the new late layer then sees the confident",
        "prediction of a finished IOI circuit and can only correct it, which is where GPT-2 small's negative name",
        "movers sit (its last two layers). With hedged targets the new heads did learn to lower the logit difference,",
        "but by changing the norm of the residual stream, not by attending to IO: see the *largest removal gain*",
        "column, which repeats that head's removal with the final LayerNorm dividing by its clean scale (of every",
        "position). `head_survey` measures this since the `k` runs; every earlier run was re-measured from its",
        "saved weights with `python -m attribution_course.train --resurvey --out DIR` (recipe and training time",
        "kept; every other number came out the same). `k5` is chapter 6's hedging variant: `make train-variant`",
        "trains it straight through, bit for bit the same weights. Growing draws the new blocks' initial weights",
        "from torch's generator and starts a fresh optimiser, so a grown run's later random draws differ from an",
        "ungrown one's, and where the trained blocks keep learning (`k3`, `l4`) they lose their Adam moments.",
        "",
        "The `l` runs close that route: `phase2_detach_final_ln_scale` lets no gradient through the final",
        "LayerNorm's scale (the forward pass is unchanged), so lowering a logit cannot be learned by inflating",
        "the norm; `l1` and `l2` freeze the trained blocks as `k1` and `k4` did, `l3` and `l4` do not. The `m` runs",
        "also keep the appended block's MLP at zero (`phase2_new_attention_only`), so that its attention heads",
        "are the only thing that learns. With the scale detached the new heads do write against the answer",
        "(`m4`'s best candidate has a direct logit attribution below -1), but without looking at IO: `m4`'s attend",
        "mostly to the final position itself, where the prediction is already made, and the others to non-name",
        "words (the line below the table sums them up). With the scale's gradient left on (`m3`) the appended",
        "heads go back to the norm. The `n` runs hedge towards a word instead of a name (`hedge_place`: 30% of",
        "the IOI sentences end \"to the PLACE .\"), so that shrinking every logit, or the whole prediction, also",
        "shrinks the right alternative; `n1`-`n3` append a block to the frozen model (attention only, with and",
        "without the scale's gradient; a whole block), `n4` lets the four trained blocks learn. In none does a",
        "head look at IO more than at the subject (the *most IO-selective head* column).",
        "",
        "The `o` runs are a diagnostic, not candidates for the shipped model: they repeat `m4`, `m2` and `k4`'s",
        "second phase with appended heads that may not attend to their own position",
        "(`phase2_new_heads_skip_self`, a mask plain GPT-2 code does not apply; `--resurvey` puts it back).",
        "They ask whether a head that hedges, once it cannot read the prediction at the final position itself,",
        "turns to IO. Where only the appended heads learn (`o1`, `o2`) they still write against the answer, but",
        "read it from the other words of the sentence, not from IO; where the appended MLP learns too (`o3`), the",
        "heads hardly write at all (the lines below the table give each run's numbers). These runs are left out of",
        "the summaries of candidate runs below.",
        "",
        "The `p` runs are candidates again (the saved model is plain GPT-2) and close the route the `o` runs left",
        "open: for the first part of the second phase (`phase2_new_heads_names_only`: all of it in `p1`, `p3`,",
        "`p4`, 80% in `p2`) the appended heads may attend only to the names and the first token, so a head that",
        "hedges has to read the names themselves, and suppressing the predicted one means finding IO among them:",
        "copy suppression's shape. `p1` and `p2` otherwise repeat `m4`; `p3` and `p4` continue half of the IOI",
        "sentences with a new name for 2000 steps (`p4` at a higher learning rate). The table measures the saved",
        "model, without the mask: there the appended heads write against the answer. With the mask put back (the",
        "setup they learned in), they give IO and S1 the same attention on average, although the prompts put IO",
        "first in half of them and second in the other half: they do not pick out the name that is predicted (the",
        "lines below the table give each run's numbers).",
        "",
        "The `q` runs put a third name in context (`crowd`: a share of the IOI sentences gets a clause \"C likes",
        "the PLACE\" between the two clauses or, for a share `crowd_before`, as a sentence in front), so that a bag",
        "of all the names, less the subject, no longer gives the answer. It does not force IO to be singled out by",
        "identity: in these templates the third name never takes a position that IO or S1 takes, so a bag of the",
        "names at those positions still gives it. `q1` learns with it from the start (with a distractor, whose name",
        "its sampler could draw equal to the third name, fixed since) and then hedges at the default second-phase",
        "learning rate: at the end it cannot do IOI. `q2`-`q4` resume the first model's step-2000 state, and the",
        "crowd clauses start there, all blocks learning: `q2` with the clause always between, `q3` also in front",
        "and with templates of varying shape, `q4` as `q3` with hedging and whole-head dropout. They solve IOI",
        "(measured, like every run here, on prompts without a third name; how they do on crowded sentences is not",
        "measured here), and their circuit stays the first model's: layer-0 heads attend to IO and S1 alike, and",
        "the heads with the largest effects attend to S2. `q5` and `q6` (the latter with hedging and whole-head",
        "dropout) close that gap: `q3`'s crowd with a distractor sentence in place of the varying shapes, so that a",
        "position that holds IO or S1 in one sentence holds the third or the distractor's name in another. Their",
        "circuit is again the first model's.",
        "",
        "The `v` runs test one explanation of the `o` and `p` runs: after four layers the answer's direction may",
        "be in the residual stream at every position, so that a head that hedges can write against it whatever it",
        "reads. For the first part of the second phase (`phase2_new_heads_token_values`: all of it in `v1` and",
        "`v3`, 80% in `v2` and `v4`) the appended heads take their values from the token and position embeddings",
        "instead, so that only IO's own position carries IO, and a head that lowers IO has to attend to it. Queries",
        "and keys are unchanged, and the saved model is plain GPT-2. `v1` and `v2` otherwise repeat `p3`. `v3` and",
        "`v4` continue 20% of the IOI sentences with the subject (so that their loss rewards raising S directly) and",
        "30% with a new name. With the reroute put back, the appended heads do write against the answer (the lines",
        "below the table). Yet on average they give S1 and S2 together 1.7 to 2.6 times the attention they give",
        "IO, and most of their attention goes to the other words. Split by the position read, most of the write",
        "against the answer comes from those other words too (-2.0 to -3.6, summed over a run's appended heads,",
        "against -0.19 to -1.14 from IO: the lines below), although with the reroute their values are fixed word",
        "vectors that carry no name. So the reroute",
        "does not leave IO's position as the only route. A write made of fixed vectors can still depend on the",
        "prompt's names through how much attention each word gets, since the queries carry the prediction; that",
        "this is the route is an inference the log does not test. No appended head of any `v` run gives IO more",
        "attention than S1 and S2 together, and `v4` no longer solves IOI (90.3%).",
        "",
        "The `w` runs put the two training-time constraints together (names only and values from the embeddings:",
        "for all of the second phase in `w1` and `w3`, 80% of it in `w2` and `w4`), so that the appended heads can",
        "read nothing but the names and the first token, and what they read there is the name itself. `w1` and",
        "`w2` hedge towards a new name as `v1` does, `w3` and `w4` also towards the subject as `v3` does. The split",
        "by source then tells the routes apart (the lines below the table; it is measured with the values",
        "rerouted but without the mask, which no survey here puts back together with the reroute). In `w1` the",
        "heads give IO and S1 about the same attention under the mask, and about as much of their write comes",
        "from S1, lowering S, as from IO, lowering IO: they push both names down, which hedging towards a new name",
        "rewards as much as lowering IO alone. In `w3` and `w4` they attend to S2 the most under the mask, and most",
        "of their write against the answer comes from S2: they raise the subject, found at its position, instead",
        "of lowering IO.",
        "In neither case is IO singled out. `w1`, `w2` and `w4` no longer solve IOI; in `w3`, which does, the",
        "appended heads write little in the plain model. `w5` and `w6` repeat `w3` and `w4` with every block",
        "learning, so that the trained circuit can give the subject its share itself and lowering S would cost",
        "the appended heads something. The trained blocks took the hedging on instead (logit difference 1.26 and",
        "1.19; neither run solves IOI), and the appended heads split their attention evenly between IO and S1",
        "under the mask, with writes from the two that cancel.",
        "",
        "`x1`, `y1` and `y2` do it in three stages instead. `x1` resumes `g1`'s checkpoint (the first model's",
        "step-2000 state) and hedges towards the subject for 1000 steps with every block learning, so that the",
        "trained circuit gives S its share itself. `y1` and `y2` resume `x1`'s state saved before its last step (the",
        "`steps=3000` of their recipe is `x1`'s two phases; the one step of it left runs on unhedged data), then",
        "train appended heads as `w3` and `w4` do, with the trained blocks frozen, hedging towards S at `x1`'s share",
        "and towards a new name: lowering S now undoes what `x1` learned, and raising it is rewarded no further.",
        "The heads still read IO and S1 alike under the mask, and their write comes from IO and S1 in near-equal",
        "and opposite parts: they push both names down. `y1` no longer solves IOI. **`y2`'s L4H3 passes the four",
        "tests** on the survey's prompts, in a model that solves IOI (97.8%), but only just, and not as a negative",
        "name mover in substance: it gives IO 0.36 of its attention against 0.35 to S1 and S2 (a margin of",
        "0.008), its direct logit attribution is -0.03, and of its removal gain of +0.22 only +0.03 remains with",
        "the final LayerNorm's scale fixed; the rest goes through the norm of the residual stream. A one-off",
        "check on three other sets of 200 held-out prompts (not in the repository) gave IO 0.35-0.36 against S1",
        "and S2 0.34-0.36: on one of them (seed 0) it fails the first test. It is not a head that picks IO out and",
        "writes against it, so it is not shipped.",
        "",
        "The `z` runs change the loss instead of the labels. Every hedging run above leaves the appended heads a",
        "cheaper fix than lowering IO alone: pushing both names down, raising S, or shrinking every logit. With",
        "`phase2_lower_copied_name` the appended heads (one attention-only block, the trained four frozen, resumed",
        "from `g1`'s checkpoint) learn against the frozen model's own prediction as a soft target at every position,",
        "except that where the next word is a name the context already holds, its logit in the target is lowered",
        "by 2 (3 in `z10`) and every other word's kept: copy suppression's job, asked for outright. `z1` (plain) and",
        "`z2` (names only for half of the phase) lowered the logit difference through the final LayerNorm's norm:",
        "their appended heads' removal gains (up to +0.80 and +1.00) shrink to at most +0.01 and +0.50 with the",
        "scale fixed. **`z2`'s L4H3 passes the four tests** as `y2`'s does, and is no more a negative name mover:",
        "IO 0.31 against S1 and S2 0.30, a direct logit attribution of -0.001, and of its removal gain of +0.52",
        "only +0.001 left with the scale fixed. With the scale's gradient detached and values from the embeddings",
        "for 70% of the phase (`z3`; `z4` also names only), the heads write against the answer (direct logit",
        "attributions -0.45 to -1.34) without attending to IO: `z3`'s read every word alike (IO 0.07 to 0.08,",
        "and most of the write comes from the other words, as in the `v` runs), `z4`'s the final position",
        "(0.37 to 0.66). Cross-entropy barely weighs a word the model already gives almost no probability, and the",
        "frozen model gives S almost none, so lowering S with IO still costs nothing. `z5` and `z6` therefore match",
        "logits instead (`phase2_match_logits`: every word's logit costs the same): the heads then hardly learned",
        "(their training loss, as the runs printed it, fell only from 0.43 to 0.36; no removal gain above +0.25). `z7` and `z8` add the names-only mask and",
        "values from the embeddings for 70% of a 2000-step phase (learning rate 0.003 and 0.01), `z9` and `z10`",
        "use cross-entropy at temperature 3 instead, with the same constraints and the scale detached. **Under the",
        "mask these are the first runs whose heads pick IO out**: `z7`'s L4H1 to L4H3 give IO 0.37 to 0.48 against",
        "S1 0.15 to 0.19, and all four heads of `z9` and `z10` give IO 0.29 to 0.39 against S1 0.16 to 0.18 (the",
        "lines below the table). But they learned to write little against it from there: with the mask and the",
        "reroute both put back (a one-off check, not in the repository; no survey here applies the two together),",
        "silencing the appended block raises the logit difference by only 0.29, 0.48 and 0.60 in `z7`, `z9` and",
        "`z10`, where the target asks for 2, 2 and 3. Once the mask was lifted they turned to the final",
        "position (`z7`, `z9`, `z10`: 0.93 to 1.00 of their attention), where the prediction already is, or to IO and",
        "S1 nearly alike (`z8`'s L4H0: 0.37 against 0.31, a removal gain of +0.005); `z9`'s and `z10`'s then write",
        "large amounts from there that mostly cancel (direct logit attributions -2.6 to -10.4, removal gains -0.99",
        "to +1.01). Finding the predicted name and writing against it are learned here separately, never together.",
        "",
        "`z11` to `z20` make the cost of moving another name explicit (`phase2_name_logit_weight`: where a copied",
        "name is next, the squared miss of every name's logit is added to the cross-entropy) and let the",
        "training-time constraints fade out over 70% of the phase (`phase2_new_heads_fade`) instead of stopping at",
        "once. With the scale's gradient detached (`z11`; `z12` at temperature 3 without the name term) the heads",
        "still end on the final position, with large writes that cancel. With it left on (`z13`; `z14` with the",
        "name term weighted 5), **the saved model's appended heads attend to IO more than to S1 and S2 together**,",
        "all four of them (`z13`: IO 0.35 to 0.46, S 0.19 to 0.34), and write against IO - S, but little (direct",
        "logit attributions -0.02 to -0.03, removal gains +0.03 to +0.16, under the 10% bar); split by source, each",
        "reads S1 too, and what it writes from there gives back part of what it takes from IO. Why so little is",
        "measured below the table (`io_name_legibility`): a least-squares read of the residual stream at IO's",
        "position recovers 0.98 of the IO name's embedding (R²) before the first block, 0.66 before the second and",
        "0.52 before the appended one. The blocks write at every name's position far more than the name itself, and",
        "the names are random directions, so no projection separates the two: a late head can copy the name only roughly, and a rough copy moves the other names'",
        "logits too, which the name term charges for. `s1` and `s2` try to keep the names legible by drawing them",
        "larger (`name_embedding_std` 0.5 and 1.0, the first phase from scratch): neither learns IOI in its 2000",
        "steps (held-out top-1 2% and 0%); with tied embeddings, large random names make large random logits.",
        "",
        "`z15` to `z20` let one appended head learn alone (`phase2_new_heads_learning=1`; the other three write",
        "nothing), so that the correction is not shared out, and ask for more (the copied name lowered by 2, 4 or 8).",
        "**`z16`'s, `z18`'s, `z19`'s and `z20`'s L4H0 pass the four tests**, in models that solve IOI (100%), with a",
        "margin in attention (IO 0.48 to 0.50 against S 0.34 to 0.41) and removal gains of +0.52 to +1.24 (12% to",
        "33% of the largest head effect); a one-off check of `z16` and `z18` to `z20` on three other sets of 200 held-out",
        "prompts (not in the repository) passed all four tests on each. But most of each gain goes through the",
        "final LayerNorm's scale: with the scale fixed at its clean value, +0.08 to +0.14 of it remains, which is",
        "also all the head writes against IO - S directly. `z19` and `z20` add a penalty on any change of that",
        "scale (`phase2_keep_final_scale`, weights 10 and 100) and the split stays; `z17` detaches the scale's",
        "gradient instead, and its head turns to the final position (0.45) and writes -2.0 from there. These heads",
        "look at IO more than at the subject and lower the model's confidence mostly by enlarging the residual",
        "stream: the `k` runs' route, from a head that now looks at IO. They pass the four tests, robustly; they",
        "are not shipped as the course's negative name mover, because the direct write against IO, which is what",
        "makes GPT-2 small's negative name movers, is 11% to 16% of their effect here.",
        "",
        "The `u` runs keep the names legible instead. They draw the names' input embeddings large",
        "(`name_embedding_std` 0.5 in `u1`, 1.0 in `u2`, the first phase from scratch) and untie the unembedding,",
        "giving each name an output vector in the same direction at the usual size (`name_unembedding_std` 0.1), so",
        "that large names no longer make large random logits as in `s1` and `s2`. Both learn IOI (held-out top-1",
        "100%), the IO name stays legible (R² 0.80 and more before the last block, against 0.59 in the first",
        "model, `r0`), and in `u2` the circuit takes GPT-2 small's shape: two layer-2 heads are **name movers that pick IO",
        "out**, L2H1 and L2H3 (attention 0.91 and 0.90 to IO against 0.06 and 0.07 to S1, direct logit attributions",
        "+1.99 and +2.14). `u3` to `u8` resume `u2`'s state. With the calibration targets (`u3`: four appended heads,",
        "the copied name lowered by 4) two of the heads read S2 (0.98 and 0.92); with `z20`'s recipe (`u4`) the one",
        "head lowers the logit difference through the norm (removal +1.12, +0.03 with the scale fixed); with the",
        "hedging variant's recipe (`u5`: hedging towards a new name, whole-head dropout, two appended blocks) the",
        "appended heads write little directly (direct logit attributions within 0.06 of zero), and the one whose",
        "removal helps, L5H1 (+1.57), attends to no name and works through the norm (-0.04 with the scale fixed).",
        "With the calibration targets, the name term and the fading constraints (`u6`, as `z13` with the copied",
        "name lowered by 4), **two appended heads pick IO out clearly and write against it**: L4H0 and L4H2 give IO",
        "0.75 and 0.80 of their attention (S1 and S2 0.22 and 0.20), with direct logit attributions of -0.09 and",
        "-0.14 that make up 37% and 70% of their removal gains (+0.25 and +0.20). Their gains are 4% and 3% of the",
        "largest head effect (5.66, L1H2's, a head that reads S2), under the 10% bar. Lowering the copied name by 8",
        "instead (`u7`) brings them to +0.39 and +0.41 (9% of the",
        "largest), with direct logit attributions of -0.25, but costs IOI accuracy (96.3%). **`u8`** does the same",
        "with two appended heads learning, and **its L4H1 is the first head of the search that is a negative name",
        "mover in substance**: it gives IO 0.82 of its attention (S1 and S2 0.18), writes against IO - S with a direct",
        "logit attribution of -0.30 (split by source: -0.42 from IO, +0.12 from S1), and its removal raises the logit",
        "difference by +0.84, 18% of the largest head effect, in a model that solves IOI (98.5%); a one-off check on",
        "three other sets of 200 held-out prompts gave IO 0.82 to 0.83, direct logit attributions -0.30 to -0.31 and",
        "removal gains +0.84 to +0.86, passing all four tests on each. Of its removal gain, 36% is that direct write",
        "and the rest goes through the final LayerNorm's scale. The other learning head, L4H0, reads S2 (0.94).",
        "`u8` is now the shipped model (`SHIPPED_RECIPE`; `make train` reproduces it): it replaced the course's first",
        "model (untied embeddings, a new first phase, name movers in layer 2, a fifth layer), and chapters 2 and 6",
        "read its circuit.",
        "",
        "*Most IO-selective head* is the head whose final-position attention to IO exceeds its attention to S1",
        "and S2 together by the most. A negative name mover must attend to IO more than to S; the line below the",
        "table gives the largest margin any head of any run reaches. Patching the first model (`r0`), with the",
        "experiment of chapter 2's \"Where the IO name comes from\", showed why: its IO name reaches the final",
        "position only through layer 0, whose heads attend to IO and S1 alike, and the later heads that matter read",
        "S2 and push the subject down. No head of that circuit has to pick IO out, so there is none for a negative",
        "name mover to mirror.",
        "Before the `z13` runs no appended head picked IO out in a saved model; those that do write little against",
        "it directly, for the reason the legibility numbers give. The `u` runs, below, change the trained circuit itself.",
        "",
        "Stopped before the end, so not in the table: `r6` (`--abc-new 0.25 --n-layer 5`, stopped near step",
        "1250 once `r4` showed that ABC sentences from the start keep the IOI circuit from forming), and `c3`",
        "(`--hedge-s 0.15`) and `c5` (`--hedge-s 0.1 --hedge-new 0.1`), branches of `c1`'s checkpoint stopped",
        "when that checkpoint turned out to have no IOI circuit yet (held-out top-1 53.5% at step 1800).",
        "",
        "| run | recipe | held-out top-1 | logit diff | best candidate | fails | most IO-selective head "
        "| largest removal gain | negative name movers | training |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = {path.stem: json.loads(path.read_text()) for path in sorted(paths, key=run_number)}
    lines += [log_row(name, info) for name, info in runs.items()]
    # The summaries below are about candidates for the shipped model; diagnostic runs get their own line.
    candidates = {name: info for name, info in runs.items() if not is_diagnostic(info)}
    name, row = max(
        ((name, row) for name, info in candidates.items() for row in info["head_survey"]["heads"]),
        key=lambda pair: io_selectivity(pair[1]),
    )
    lines += [
        "",
        f"Across all {len(candidates)} candidate runs (the diagnostic `o` runs aside), the most IO-selective head is "
        f"{name}'s {row['head']}: attention "
        f"{row['attention_to_io']:.2f} to IO against {attention_to_s(row):.2f} to S1 and S2, "
        f"a margin of {io_selectivity(row):+.2f}.",
    ]
    solving = [info for info in candidates.values() if info["evaluation"]["test"]["top1_accuracy"] >= SOLVES_IOI_TOP1]
    # the third criterion, as the survey decided it
    gains = [
        row
        for row in (most_helpful_removal(info["head_survey"]["heads"]) for info in solving)
        if row["negative_name_mover_criteria"]["removal_helps_by_10_percent"]
    ]
    through_ln = [row for row in gains if works_through_final_ln(row)]
    writers = [
        row
        for info in solving
        for row in info["head_survey"]["heads"]
        if row["direct_logit_attribution"] <= STRONG_NEGATIVE_DLA
    ]

    lines += [
        "",
        f"In the runs that solve IOI, {len(writers)} heads write against the answer with a direct logit attribution of "
        f"{STRONG_NEGATIVE_DLA} or below; {sum(row['attention_to_io'] >= 0.3 for row in writers)} of them give IO at "
        f"least 0.3 of their attention, and on average they give IO "
        f"{average(writers, lambda row: row['attention_to_io']):.2f}, S1 and S2 {average(writers, attention_to_s):.2f} and the final "
        f"position itself {average(writers, lambda row: row['attention_to_end']):.2f}.",
    ]
    lines += [
        "",
        f"Of the {len(solving)} runs that solve IOI, {len(gains)} have a head whose removal raises the logit difference "
        "by at least 10% of the largest head effect (the third criterion). In "
        f"{len(through_ln)} of them the head whose removal helps most keeps less than half of that gain when the "
        "final LayerNorm divides by its clean scale: most of such a head's "
        "gain comes from the norm of the residual stream at the final LayerNorm, which scales every logit "
        "together, not from anything it writes against the IO name.",
    ]
    lines += masked_self_summary(runs)
    lines += names_only_summary(runs)
    lines += token_values_summary(runs)
    lines += legibility_summary(runs)
    return "\n".join(lines) + "\n"


def legibility_summary(runs: dict[str, dict]) -> list[str]:
    """How legible the IO name is before each block, in the runs that measured it (``train.io_name_legibility``)."""
    measured = {name: info["io_name_legibility"] for name, info in runs.items() if "io_name_legibility" in info}
    if not measured:
        return []
    lines = ["", "How much of the IO name a least-squares read of the residual stream at IO's position recovers "
             "(held-out R², names redrawn as in training), before each block, first to last:", ""]
    # Runs that share their trained blocks (frozen below appended ones) repeat the same numbers: group equal lists.
    groups: dict[tuple, list[str]] = {}
    for name, legibility in measured.items():
        groups.setdefault(tuple(legibility), []).append(name)
    for legibility, names in groups.items():
        lines.append(f"- {', '.join(names)}: " + ", ".join(f"{value:.2f}" for value in legibility))
    return lines


def run_number(path: Path) -> tuple[int, str]:
    """Runs are logged in the order of their number prefix (``9_b1`` before ``10_c1`` before ``100_u3``),
    not in the shell's alphabetical order."""
    number, _, rest = path.stem.partition("_")
    return (int(number), rest) if number.isdigit() else (10**9, path.stem)


def average(rows: list[dict], value) -> float:
    """The mean of ``value(row)`` over ``rows`` (0 for none)."""
    return sum(map(value, rows)) / max(len(rows), 1)


def appended_heads(info: dict) -> list[dict]:
    """The survey rows of the heads in blocks appended in the second phase (none for most runs)."""
    trained = info["recipe"]["n_layer"]
    return [row for row in info["head_survey"]["heads"] if int(row["head"][1:].split("H")[0]) >= trained]


def attention_elsewhere(row: dict) -> float:
    """Final-position attention to neither name nor the final position itself (other words, the first token)."""
    return 1 - row["attention_to_io"] - attention_to_s(row) - row["attention_to_end"]


def is_diagnostic(info: dict) -> bool:
    """A run whose model is not a plain GPT-2 (its appended heads may not attend to their own position)."""
    return bool(info["recipe"].get("phase2_new_heads_skip_self"))


def masked_self_summary(runs: dict[str, dict]) -> list[str]:
    """Where the appended heads look, and how hard they write against the answer, in each diagnostic run."""
    masked = {name: info for name, info in runs.items() if is_diagnostic(info)}
    if not masked:
        return []
    lines = ["", "In the runs whose appended heads may not attend to their own position:", ""]
    return lines + [appended_heads_line(name, info) for name, info in masked.items()]


def appended_heads_line(name: str, info: dict) -> str:
    """One run's appended heads: how hard they write against the answer, and where they look (from the survey)."""
    heads = appended_heads(info)
    writer = min(heads, key=lambda row: row["direct_logit_attribution"])
    return (
        f"- {name}: the appended heads' direct logit attributions run from "
        f"{writer['direct_logit_attribution']:+.2f} ({writer['head']}) to "
        f"{max(row['direct_logit_attribution'] for row in heads):+.2f}; at most "
        f"{max(row['attention_to_io'] for row in heads):.2f} of a head's attention goes to IO, and on average "
        f"{average(heads, lambda row: row['attention_to_io']):.2f} to IO, {average(heads, attention_to_s):.2f} to "
        f"S1 and S2, {average(heads, lambda row: row['attention_to_end']):.2f} to the final position itself and "
        f"{average(heads, attention_elsewhere):.2f} to the other words (between and after the names, and the first token)."
    )


def token_values_summary(runs: dict[str, dict]) -> list[str]:
    """Where the appended heads look in each run whose heads learned with values from the embeddings."""
    rerouted = {name: info for name, info in runs.items() if info["recipe"].get("phase2_new_heads_token_values")}
    if not rerouted:
        return []
    lines = ["", "In the runs whose appended heads learned with values from the embeddings (with one appended block, as "
             "here, its attention is the same with or without that reroute; the first numbers are the saved, plain "
             "model's, the last with the reroute put back; both logit differences are on the survey's 200 prompts):", ""]
    for name, info in rerouted.items():
        under = info["appended_heads_under_token_values"]
        dla = [row["direct_logit_attribution"] for row in under["heads"]]
        line = (
            f"{appended_heads_line(name, info)} With values from the embeddings, the logit difference is "
            f"{under['clean_logit_diff']:.2f} (plain: {info['head_survey']['clean_logit_diff']:.2f}) and the appended "
            f"heads' direct logit attributions run from {min(dla):+.2f} to {max(dla):+.2f}."
        )
        if "direct_logit_attribution_by_source" in under:
            by_source = under["direct_logit_attribution_by_source"]
            line += (f" Added up over the appended heads and split by the position read, that write comes from "
                     f"{source_split(by_source['rerouted'])} (plain: {source_split(by_source['plain'])}).")
        lines.append(line)
    return lines


def source_split(heads: dict[str, dict[str, float]]) -> str:
    """Direct logit attributions by source position, summed over heads, in words."""
    total = {part: sum(parts[part] for parts in heads.values()) for part in ("io", "s1", "s2", "end", "other")}
    return (f"IO {total['io']:+.2f}, S1 {total['s1']:+.2f}, S2 {total['s2']:+.2f}, the final position "
            f"{total['end']:+.2f} and the other words {total['other']:+.2f}")


def names_only_summary(runs: dict[str, dict]) -> list[str]:
    """Where the appended heads look when only names may be read, in each run trained with that mask."""
    measured = {name: info for name, info in runs.items() if "attention_under_names_only_mask" in info}
    if not measured:
        return []
    lines = ["", "In the runs whose appended heads were trained reading names only, with that mask put back:", ""]
    for name, info in measured.items():
        heads = info["attention_under_names_only_mask"]
        gap, gap_head = max((abs(row["io"] - row["s1"]), head) for head, row in heads.items())
        lines.append(
            f"- {name}: on average the appended heads give IO {average(heads.values(), lambda row: row['io']):.2f}, "
            f"S1 {average(heads.values(), lambda row: row['s1']):.2f}, S2 {average(heads.values(), lambda row: row['s2']):.2f} "
            f"and the first token {average(heads.values(), lambda row: row['first']):.2f}; in no head do the attention to IO "
            f"and to S1 differ by more than {gap:.2f} ({gap_head}), and the most any head gives IO is "
            f"{max(row['io'] for row in heads.values()):.2f}."
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="training_info.json files, one per run, in the order to list them")
    parser.add_argument("--out", type=Path, help="write the Markdown here instead of printing it")
    args = parser.parse_args(argv)
    text = search_log(args.runs)
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
