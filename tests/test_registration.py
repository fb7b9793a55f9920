"""Fails loudly if a PEFT upgrade breaks how SparseDelta plugs into PEFT's registries."""

import json

from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import sparse_opd
from sparse_opd.tuner.registration import add_peft_type, register


def test_sparse_delta_is_a_member_of_peft_type():
    member = PeftType("SPARSE_DELTA")
    assert member is PeftType.SPARSE_DELTA
    assert member in list(PeftType)
    assert member == "SPARSE_DELTA" and member.value == "SPARSE_DELTA"


def test_registries_map_sparse_delta_to_our_classes():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SPARSE_DELTA] is sparse_opd.SparseDeltaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SPARSE_DELTA] is sparse_opd.SparseDeltaModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SPARSE_DELTA] == "sparse_delta_"


def test_registration_is_idempotent():
    assert add_peft_type() is PeftType.SPARSE_DELTA
    register(sparse_opd.SparseDeltaConfig, sparse_opd.SparseDeltaModel)
    assert sum(1 for m in PeftType if m.value == "SPARSE_DELTA") == 1


def test_peft_config_dispatches_from_a_saved_config(tmp_path):
    config = sparse_opd.SparseDeltaConfig(module_counts={"lin": 3}, module_shapes={"lin": [4, 4]})
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is sparse_opd.SparseDeltaConfig
    assert loaded.module_counts == {"lin": 3}
    assert "mask" not in json.loads((tmp_path / "adapter_config.json").read_text())
