"""The fuzz-style battery of tests/hostile_files.py: broken and hostile adapter and mask files raise clear errors,
leave the model untouched and cost no more memory than the weights they describe (see docs/reliability.md)."""

from __future__ import annotations

import warnings

import pytest
from hostile_files import run_all

# outcomes outside the tuner that are PEFT's own behaviour, reported in docs/reliability.md
PEFT_OUTCOMES = {"another method's config: PEFT's own tuner for it", "unknown method: PEFT's KeyError"}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_all(tmp_path_factory.mktemp("hostile"))


def test_every_broken_file_is_a_clear_error_or_loads_as_what_it_holds(outcomes):
    assert len(outcomes) > 100
    problems = [o for o in outcomes if o.kind not in {"clear error", "valid file"} | PEFT_OUTCOMES]
    assert not problems, "\n".join(f"{o.case}: {o.kind}: {o.detail}" for o in problems)
    valid = {o.case for o in outcomes if o.kind == "valid file"}
    assert valid <= {"config: shape claims 50000 x 50000 [from_pretrained]",
                     "config: shape claims 50000 x 50000 [load_adapter]", "mask: claims a 50000 x 50000 shape"}


def test_no_broken_file_costs_memory(outcomes):
    worst = max(outcomes, key=lambda o: o.peak_mib)
    assert worst.peak_mib < 64, f"{worst.case} raised resident memory by {worst.peak_mib:.0f} MiB"
