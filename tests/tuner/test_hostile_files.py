"""The fuzz-style battery of tests/helpers/hostile_files.py: broken and hostile adapter and mask files raise clear
errors, leave the model untouched and cost no more memory than the weights they describe (see docs/reliability.md)."""

from __future__ import annotations

import warnings

import pytest

from tests.helpers.hostile_files import run_all

# outcomes outside the tuner that are PEFT's or transformers' own behaviour, reported in docs/reliability.md
HOST_OUTCOMES = {"another method's config: PEFT's own tuner for it", "unknown method: PEFT's KeyError",
                 "unreadable file: transformers' SafetensorError"}
# files that load as something other than the saved adapter, and why that is right: the claim is not used
LOADS_AS_WHAT_IT_HOLDS = {"mask: claims a 50000 x 50000 shape"}  # a hand-edited mask file without a checksum


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_all(tmp_path_factory.mktemp("hostile"))


def test_every_broken_file_is_a_clear_error_or_loads_as_what_it_holds(outcomes):
    assert len(outcomes) >= 250
    problems = [o for o in outcomes if o.kind not in {"clear error", "valid file", "expected result"} | HOST_OUTCOMES]
    assert not problems, "\n".join(f"{o.case}: {o.kind}: {o.detail}" for o in problems)
    other = {o.case for o in outcomes
             if o.kind == "valid file" and not o.detail.startswith("loads exactly the adapter")}
    assert other <= LOADS_AS_WHAT_IT_HOLDS, other - LOADS_AS_WHAT_IT_HOLDS


def test_every_file_that_does_not_match_its_digest_is_refused_by_every_loader(outcomes):
    digest = [o for o in outcomes if "digest" in o.case]
    assert len(digest) >= 9 and all(o.kind == "clear error" for o in digest), [(o.case, o.kind) for o in digest]


def test_no_file_writes_outside_its_adapter_through_any_loader(outcomes):
    extra = [o for o in outcomes if o.case.startswith("extra tensor: ")]
    assert len(extra) == 15
    assert all(o.kind == "clear error" or o.detail.startswith("loads exactly the adapter") for o in extra)


def test_every_scenario_of_issue_21_gives_a_clear_error_or_its_expected_result(outcomes):
    from tests.helpers.hostile_scenarios import MUST_SUCCEED

    scenarios = {o.case: o for o in outcomes if "(21." in o.case}
    wrong = [(o.case, o.kind, o.detail) for o in scenarios.values()
             if o.kind != ("expected result" if o.case in MUST_SUCCEED else "clear error")]
    assert len(scenarios) == 17 and set(scenarios) >= MUST_SUCCEED and not wrong, wrong


def test_no_broken_file_costs_memory(outcomes):
    worst = max(outcomes, key=lambda o: o.peak_mib)
    assert worst.peak_mib < 64, f"{worst.case} raised resident memory by {worst.peak_mib:.0f} MiB"
