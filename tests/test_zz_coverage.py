"""The property tests' examples reach the cases their claims are about.

conftest.record() logs what each instrumented test drew while it ran; this file runs last (pytest
takes files in name order) and counts. Under CI=true hypothesis draws the same examples every
run (conftest derandomises unless LCKV_EXPLORE is set), so this is a check on the suite's fixed
example set: if a change to a strategy leaves, say, almost no layout that reads from above, this
fails instead of the suite passing on examples that cannot see a wrong mask. Under LCKV_EXPLORE
the draws are random and the shares only reported (a warning), never a failure by chance. A test
that did not run in this session (-k, a single file) is skipped.
"""

import warnings

import pytest
from conftest import DRAWN, EXPLORE

# test -> [(what, predicate, least fraction of the examples)]
NEEDS = {
    "theorem1": [("reads from above", lambda d: d["reads_above"], 0.45),
                 ("reads from above with T >= 3", lambda d: d["reads_above"] and d["T"] >= 3, 0.2),
                 ("several groups", lambda d: d["groups"] >= 2, 0.02),  # test_groups.py has more
                 ("GQA", lambda d: d["gqa"], 0.25)],
    "logits": [("reads from above", lambda d: d["reads_above"], 0.45),
               ("several groups", lambda d: d["groups"] >= 2, 0.02)],
    "cached_greedy": [("reads from above", lambda d: d["reads_above"], 0.45),
                      ("adaptive prefill, reading from above",
                       lambda d: d["reads_above"] and d["prefill"] == "adaptive", 0.1)],
    "streaming": [("reads from above", lambda d: d["reads_above"], 0.45)],
    "reference": [("reads from above", lambda d: d["reads_above"], 0.45),
                  ("a window flag that differs from its source's, T past the window",
                   lambda d: d["window"], 0.2),
                  ("several groups", lambda d: d["groups"] >= 2, 0.05),
                  ("GQA", lambda d: d["gqa"], 0.25)],
    "theorem1_groups": [("several groups", lambda d: d["groups"] >= 2, 0.8),
                        ("three groups or more", lambda d: d["groups"] >= 3, 0.1)],
    "fast_prefill": [("layers run on the last token only", lambda d: d["skipped"] > 0, 0.5),
                     ("those layers and an iteration group",
                      lambda d: d["skipped"] > 0 and d["groups"] >= 1, 0.1)],
    "plan_below_T": [("m + b < T", lambda d: d["passes"] < d["T"], 0.4),
                     ("m + b < T with several groups",
                      lambda d: d["passes"] < d["T"] and d["groups"] >= 2, 0.05)],
}


@pytest.mark.parametrize("test", NEEDS)
def test_examples_reach_the_claims(test):
    drawn = DRAWN.get(test)
    if not drawn:
        pytest.skip(f"{test} did not run in this session")
    for what, pred, least in NEEDS[test]:
        share = sum(map(pred, drawn)) / len(drawn)
        print(f"{test}: {share:.0%} of {len(drawn)} examples: {what} (needs {least:.0%})")
        if share < least and EXPLORE:
            warnings.warn(f"{test}: only {share:.0%} of {len(drawn)} random examples: {what}",
                          stacklevel=1)
            continue
        assert share >= least, f"{test}: only {share:.0%} of {len(drawn)} examples: {what}"


def test_the_counter_sees_a_strategy_that_misses():
    drawn = [dict(reads_above=False, groups=0, gqa=False, T=1, passes=1)] * 10
    share = sum(map(NEEDS["theorem1"][0][1], drawn)) / len(drawn)
    assert share < NEEDS["theorem1"][0][2]
