"""Fails loudly if a TRL upgrade changes a private member the trainers override, call or mirror.

`sparse_opd.trainer` pins `trl~=1.16.0` (pyproject.toml) because its mixins hook into `DistillationTrainer` below its
public API. Every such member is listed here with the signature (parameter names, kinds and defaults) the code was
written against; a change fails here, naming the member, before it fails obscurely inside a training step. When TRL
moves, read the member's new source, adapt the override, then update its entry.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import trl.trainer.distillation_trainer as distillation
from trl import DistillationConfig, DistillationTrainer
from trl.generation.vllm_client import VLLMClient
from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer import utils as trl_utils

_P = "POSITIONAL_OR_KEYWORD"

# member -> [(name, kind, default repr or None), ...]: what sparse_opd/trainer/ relies on
PINNED = {
    # overridden (opd_trainer.py lists what each override changes)
    "DistillationTrainer._set_signature_columns_if_needed": (DistillationTrainer._set_signature_columns_if_needed,
                                                             [("self", _P, None)]),
    "DistillationTrainer._generate_and_score_completions": (DistillationTrainer._generate_and_score_completions,
                                                            [("self", _P, None), ("inputs", _P, None)]),
    "DistillationTrainer._compute_loss": (DistillationTrainer._compute_loss, [
        ("self", _P, None), ("unwrapped_student", _P, None), ("inputs", _P, None), ("num_items_in_batch", _P, None)]),
    "DistillationTrainer._get_last_hidden_state": (DistillationTrainer._get_last_hidden_state, [
        ("self", _P, None), ("unwrapped_model", _P, None), ("input_ids", _P, None), ("attention_mask", _P, None),
        ("logits_to_keep", _P, None), ("pixel_values", _P, "None"), ("image_grid_thw", _P, "None"),
        ("pixel_attention_mask", _P, "None"), ("spatial_shapes", _P, "None"), ("image_sizes", _P, "None"),
        ("token_type_ids", _P, "None"), ("mm_token_type_ids", _P, "None"), ("image_position_ids", _P, "None")]),
    "DistillationTrainer.log": (DistillationTrainer.log, [("self", _P, None), ("logs", _P, None),
                                                          ("start_time", _P, "None")]),
    # called
    "DistillationTrainer._tokenize_prompts": (DistillationTrainer._tokenize_prompts,
                                              [("self", _P, None), ("prompts", _P, None)]),
    "VLLMGeneration.generate": (VLLMGeneration.generate, [
        ("self", _P, None), ("prompts", _P, None), ("images", _P, None), ("num_generations", _P, None),
        ("profiler", _P, "None")]),
    "VLLMGeneration._fix_param_name_to_vllm": (VLLMGeneration._fix_param_name_to_vllm, [
        ("self", _P, None), ("name", _P, None), ("extra_prefixes", _P, "None")]),
    "VLLMClient.update_named_params": (VLLMClient.update_named_params, [
        ("self", _P, None), ("metadata", _P, None), ("named_params", _P, None)]),
    "VLLMClient.reset_prefix_cache": (VLLMClient.reset_prefix_cache, [("self", _P, None)]),
    "trl.trainer.utils.pad": (trl_utils.pad, [("tensors", _P, None), ("padding_value", _P, "0"),
                                              ("padding_side", _P, "'right'"), ("pad_to_multiple_of", _P, "None")]),
    "trl.trainer.utils.create_model_from_path": (trl_utils.create_model_from_path, [
        ("model_id", _P, None), ("architecture", _P, "None"), ("kwargs", "VAR_KEYWORD", None)]),
    # mirrored: rollout_check.sampled_token_logprobs projects as this function does
    "distillation_trainer._chunked_divergence_loss": (distillation._chunked_divergence_loss, [
        ("student_hidden_states", _P, None), ("teacher_hidden_states", _P, None), ("student_lm_head_weight", _P, None),
        ("teacher_lm_head_weight", _P, None), ("completion_mask", _P, None), ("beta", _P, None),
        ("num_items_in_batch", _P, "None"), ("student_lm_head_bias", _P, "None"),
        ("teacher_lm_head_bias", _P, "None"), ("student_logit_scale", _P, "1.0"), ("teacher_logit_scale", _P, "1.0"),
        ("student_final_logit_softcapping", _P, "None"), ("teacher_final_logit_softcapping", _P, "None"),
        ("temperature", _P, "1.0")]),
}

# attributes of a DistillationTrainer (or its VLLMGeneration) that the mixins read or replace
TRAINER_ATTRIBUTES = ("_metrics", "_tokenizer", "_is_vlm", "pad_to_multiple_of", "tools", "temperature", "use_vllm",
                      "vllm_generation", "teacher_model")
VLLM_ATTRIBUTES = ("logprobs", "mode", "enable_sleep_mode", "accelerator", "_llm_weights_sleeping", "vllm_client",
                   "llm")


def _signature(function) -> list[tuple]:
    return [(p.name, p.kind.name, None if p.default is inspect.Parameter.empty else repr(p.default))
            for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("member", sorted(PINNED))
def test_pinned_trl_member_keeps_its_signature(member):
    function, expected = PINNED[member]
    assert _signature(function) == expected, (
        f"TRL changed {member}: {_signature(function)}; sparse_opd/trainer was written against {expected}. Read the "
        "new source, adapt the override or call, then update tests/trainer/test_trl_contract.py"
    )


def test_the_attributes_the_mixins_read_are_still_set_by_trl():
    init = inspect.getsource(DistillationTrainer.__init__)
    missing = [a for a in TRAINER_ATTRIBUTES if not re.search(rf"self\.{a}\s*=", init)]
    assert not missing, f"DistillationTrainer.__init__ no longer sets {missing}"
    vllm = inspect.getsource(VLLMGeneration)
    missing = [a for a in VLLM_ATTRIBUTES if not re.search(rf"self\.{a}\s*=", vllm)]
    assert not missing, f"VLLMGeneration no longer sets {missing}"
    assert "sync_weights" in vars(VLLMGeneration), "vllm_sync.install_vllm_sync replaces VLLMGeneration.sync_weights"


def test_the_loss_reads_the_logit_attributes_that_rollout_check_mirrors():
    """`rollout_check.logit_transform` reproduces how `_compute_loss` reads a model's logit scale and softcap."""
    source = inspect.getsource(DistillationTrainer._compute_loss)
    read = set(re.findall(r'getattr\(\w+_config, "(\w+)"', source)) | set(re.findall(r"_config\.(\w+)", source))
    assert read == {"logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling",
                    "final_logit_softcapping", "model_type"}, f"TRL's loss now reads {sorted(read)}"
    assert "_chunked_divergence_loss(" in source, "the loss no longer goes through _chunked_divergence_loss"
    assert source.count("self._get_last_hidden_state") == 2, "student and teacher states come from this hook"


def test_the_loss_scores_the_completion_as_the_last_columns_of_its_inputs():
    """`RolloutCheckMixin` reads the sampled tokens and their mask as the last `logits_to_keep` columns of the ids and
    mask `_get_last_hidden_state` receives; `PrivilegedTeacherMixin` replaces the columns before them."""
    source = inspect.getsource(DistillationTrainer._compute_loss)
    assert 'torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)' in source
    assert 'torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)' in source
    assert 'logits_to_keep = inputs["completion_ids"].size(1)' in source


def test_dropout_and_generation_hooks_behave_as_the_mixins_assume():
    assert DistillationConfig.__dataclass_fields__["disable_dropout"].default is False  # OPDConfig flips it
    assert "disable_dropout_in_model(self.model)" in inspect.getsource(DistillationTrainer.__init__)
    single_turn = inspect.getsource(DistillationTrainer._generate_single_turn)
    assert "unwrapped_model.generate(" in single_turn, "RolloutCheckMixin records the instance's generate()"
    assert "self.vllm_generation.generate(" in single_turn and "self.vllm_generation.sync_weights()" in single_turn


def test_generation_positions_are_those_transformers_generate_uses():
    """`scoring.generation_position_ids` must number a left-padded batch as `generate()` does."""
    from sparse_opd.trainer.scoring import generation_position_ids
    from tests.helpers.tiny_opd import tiny_gpt2, tiny_tokenizer

    model = tiny_gpt2(tiny_tokenizer())
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    ids = torch.ones_like(mask)
    expected = model._prepare_position_ids_for_generation(ids, {"attention_mask": mask})
    assert torch.equal(generation_position_ids(mask), expected)
