"""SparseOPDTrainer on tiny models: learning, mask confinement, resume, context distillation, setup errors."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from trl import DistillationTrainer

import sparse_opd
from sparse_opd import SparseDeltaConfig
from sparse_opd.tasks import arithmetic_dataset
from sparse_opd.trainer import (
    BaseWeightsTeacher,
    OPDTrainer,
    SparseOPDTrainer,
    sparse_delta_layers,
    sparse_delta_stats,
)
from sparse_opd.tuner import compose_merged_weight, iter_merged_named_weights
from tests.helpers.tiny_opd import make_args, peaked_teacher, student_model, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def fixed_batch(trainer, dataset, n=8):
    torch.manual_seed(123)
    trainer.model.eval()
    return trainer._generate_and_score_completions([dataset[i] for i in range(n)])


@torch.no_grad()
def divergence(trainer, batch):
    trainer.model.eval()
    return float(trainer.compute_loss(trainer.model, batch))


def test_a_few_opd_steps_lower_the_divergence(tmp_path, tokenizer, train_set):
    trainer = SparseOPDTrainer(
        model=student_model(tokenizer),
        teacher_model=peaked_teacher(tokenizer),
        args=make_args(tmp_path, max_steps=8, teacher_prompt_column=None),
        train_dataset=train_set,
        processing_class=tokenizer,
    )
    batch = fixed_batch(trainer, train_set)
    before = divergence(trainer, batch)
    trainer.train()
    after = divergence(trainer, batch)
    assert after < 0.9 * before, (before, after)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    for key in (
        "sparse/moved_frac",
        "sparse/bf16_visible_frac",
        "sparse/delta_norm_ffn",
        "sparse/delta_norm_attention",
        "sparse/update_norm",
    ):
        assert key in logged[-1], key
    assert logged[-1]["sparse/moved_frac"] > 0.5 and logged[-1]["sparse/update_norm"] > 0


def test_only_masked_coordinates_move(tmp_path, tokenizer, train_set):
    student = student_model(tokenizer)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = SparseOPDTrainer(
        model=student,
        teacher_model=peaked_teacher(tokenizer),
        args=make_args(tmp_path, max_steps=3),
        train_dataset=train_set,
        processing_class=tokenizer,
    )
    trainer.train()
    model = trainer.model
    layers = sparse_delta_layers(model, "default")
    assert layers
    changed_total = 0
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        key = name.removeprefix("base_model.model.") + ".weight"
        assert torch.equal(weight, before[key]), f"{key}: the frozen base weight changed"
        merged = compose_merged_weight(layer).reshape(-1)
        changed = torch.nonzero(merged != before[key].reshape(-1)).flatten()
        assert set(changed.tolist()) <= set(layer.sparse_delta_indices["default"].tolist()), name
        changed_total += changed.numel()
    assert changed_total > 0
    plain = dict(iter_merged_named_weights(model))
    for key, value in before.items():
        if key not in {n.removeprefix("base_model.model.") + ".weight" for n in layers}:
            assert torch.equal(plain[key], value), f"{key} is not in the mask and must not move"


def _trainable_state(trainer):
    values = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    optimizer = {
        k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in state.items()}
        for k, state in trainer.optimizer.state_dict()["state"].items()
    }
    return values, optimizer


def test_resume_from_checkpoint_continues_bit_identically(tmp_path, tokenizer, train_set):
    def run(out, resume=None):
        args = make_args(tmp_path, output_dir=str(out), max_steps=4, save_strategy="steps", save_steps=2)
        trainer = SparseOPDTrainer(
            model=student_model(tokenizer),
            teacher_model=peaked_teacher(tokenizer),
            args=args,
            train_dataset=train_set,
            processing_class=tokenizer,
        )
        trainer.train(resume_from_checkpoint=resume)
        return _trainable_state(trainer)

    straight_values, straight_opt = run(tmp_path / "a")
    resumed_values, resumed_opt = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert straight_values.keys() == resumed_values.keys()
    for name in straight_values:
        assert torch.equal(straight_values[name], resumed_values[name]), name
    assert straight_opt.keys() == resumed_opt.keys()
    for key in straight_opt:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(straight_opt[key][field]), torch.as_tensor(resumed_opt[key][field]))


def test_context_distillation_teacher_sees_the_privileged_prompt_and_the_same_completion(
    tmp_path, tokenizer, train_set, monkeypatch
):
    trainer = SparseOPDTrainer(
        model=tiny_llama(tokenizer), args=make_args(tmp_path), train_dataset=train_set, processing_class=tokenizer
    )
    assert isinstance(trainer.teacher_model, BaseWeightsTeacher)
    calls = []
    parent = DistillationTrainer._get_last_hidden_state

    def spy(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        layers = sparse_delta_layers(model)
        out = parent(self, model, input_ids, attention_mask, logits_to_keep, **kwargs)
        calls.append(
            {
                "ids": input_ids,
                "mask": attention_mask,
                "k": logits_to_keep,
                "out": out.detach(),
                "adapter_off": all(m.disable_adapters for m in layers.values()),
            }
        )
        return out

    monkeypatch.setattr(DistillationTrainer, "_get_last_hidden_state", spy)
    rows = [train_set[i] for i in range(4)]
    batch = fixed_batch(trainer, train_set, n=4)
    divergence(trainer, batch)
    student, teacher = calls
    assert not student["adapter_off"] and teacher["adapter_off"]
    assert student["k"] == teacher["k"] == batch["completion_ids"].shape[1]
    completion = batch["completion_ids"]
    k = completion.shape[1]
    assert torch.equal(student["ids"][:, -k:], completion) and torch.equal(teacher["ids"][:, -k:], completion)
    for row, (s_ids, t_ids, s_mask, t_mask) in enumerate(
        zip(student["ids"], teacher["ids"], student["mask"], teacher["mask"])
    ):
        s_text = tokenizer.decode(s_ids[:-k][s_mask[:-k].bool()])
        t_text = tokenizer.decode(t_ids[:-k][t_mask[:-k].bool()])
        assert "Reference" not in s_text and "Reference" in t_text
        question = rows[row]["prompt"][-1]["content"].split("\n")[0]
        assert tokenizer.decode(tokenizer(question)["input_ids"]) in t_text
    # the teacher's hidden states are those of the base model reading (teacher prompt + completion) without padding
    row = 0
    t_ids = teacher["ids"][row][teacher["mask"][row].bool()]
    n_completion = int(batch["completion_mask"][row].sum())
    with torch.no_grad(), trainer.model.disable_adapter():
        hidden = trainer.model.base_model.model.model(input_ids=t_ids[None]).last_hidden_state[0]
    expected = hidden[-n_completion - 1 : -1]
    torch.testing.assert_close(teacher["out"][row, :n_completion], expected, rtol=1e-4, atol=1e-5)


def test_teacher_prompt_template_builds_the_privileged_prompt(tmp_path, tokenizer):
    dataset = arithmetic_dataset("train", 8, 1).remove_columns("teacher_prompt")
    args = make_args(tmp_path, teacher_prompt_template="Reference solution:\n{solution}\n\n{prompt}")
    trainer = SparseOPDTrainer(
        model=tiny_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    batch = fixed_batch(trainer, dataset, n=4)
    text = tokenizer.decode(batch["teacher_prompt_ids"][0])
    assert "Reference solution" in text and "Answer" in text


@pytest.mark.parametrize("strategy", ["file", "near_zero", "random"])
def test_mask_strategies_build_the_adapter(tmp_path, tokenizer, train_set, strategy):
    student = tiny_llama(tokenizer)
    extra = {}
    if strategy == "file":
        mask = sparse_opd.masks.random_mask(student, density=0.05, seed=3)
        mask.save(tmp_path / "mask.safetensors")
        extra["mask_path"] = str(tmp_path / "mask.safetensors")
    trainer = SparseOPDTrainer(
        model=student,
        teacher_model=peaked_teacher(tokenizer),
        args=make_args(tmp_path, mask_strategy=strategy, mask_density=0.05, **extra),
        train_dataset=train_set,
        processing_class=tokenizer,
    )
    layers = sparse_delta_layers(trainer.model, "default")
    total = sum(m.sparse_delta_values["default"].numel() for m in layers.values())
    numel = sum(m.weight_numel for m in layers.values())
    assert math.isclose(total / numel, 0.05, rel_tol=0.05)
    ffn = sum(m.sparse_delta_values["default"].numel() for n, m in layers.items() if "mlp" in n)
    assert ffn / total > 0.5, "the budget is FFN-heavy by default"
    if strategy == "file":
        for name, layer in layers.items():
            assert torch.equal(
                layer.sparse_delta_indices["default"].cpu(), mask.indices[name.removeprefix("base_model.model.")]
            )


def test_accepts_a_sparse_delta_peft_model_and_a_peft_config(tmp_path, tokenizer, train_set):
    config = SparseDeltaConfig(mask_init="random", mask_density=0.1)
    peft_model = get_peft_model(tiny_llama(tokenizer), config)
    args = make_args(tmp_path, mask_strategy=None)
    trainer = SparseOPDTrainer(model=peft_model, args=args, train_dataset=train_set, processing_class=tokenizer)
    assert trainer.model is peft_model
    trainer = SparseOPDTrainer(
        model=tiny_llama(tokenizer),
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=SparseDeltaConfig(mask_init="near_zero", mask_density=0.1),
    )
    assert sparse_delta_layers(trainer.model, "default")


def test_setup_errors_name_the_problem_and_the_fix(tmp_path, tokenizer, train_set):
    no_context = train_set.remove_columns("teacher_prompt")
    with pytest.raises(ValueError, match="no teacher"):
        SparseOPDTrainer(
            model=tiny_llama(tokenizer), args=make_args(tmp_path), train_dataset=no_context, processing_class=tokenizer
        )
    with pytest.raises(ValueError, match="mask_strategy"):
        SparseOPDTrainer(
            model=tiny_llama(tokenizer),
            args=make_args(tmp_path, mask_strategy=None),
            train_dataset=train_set,
            processing_class=tokenizer,
        )
    from peft import LoraConfig

    with pytest.raises(TypeError, match="SparseDeltaConfig"):
        SparseOPDTrainer(
            model=tiny_llama(tokenizer),
            args=make_args(tmp_path, mask_strategy=None),
            train_dataset=train_set,
            processing_class=tokenizer,
            peft_config=LoraConfig(),
        )
    with pytest.raises(ValueError, match="mask_path"):
        make_args(tmp_path, mask_strategy="file")
    with pytest.raises(ValueError, match="mask_strategy must be"):
        make_args(tmp_path, mask_strategy="magic")
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        make_args(tmp_path, teacher_prompt_template="Solution: {solution}")
    with pytest.raises(ValueError, match="lacks"):
        SparseOPDTrainer(
            model=tiny_llama(tokenizer),
            args=make_args(tmp_path, teacher_prompt_template="{hint} {prompt}"),
            train_dataset=no_context,
            processing_class=tokenizer,
        )


def test_telemetry_counts_moved_and_bf16_visible_values(tokenizer):
    model = get_peft_model(tiny_llama(tokenizer), SparseDeltaConfig(mask_init="random", mask_density=0.1))
    layers = sparse_delta_layers(model, "default")
    name, layer = next(iter(layers.items()))
    values = layer.sparse_delta_values["default"]
    base = layer.get_base_layer().weight.reshape(-1)[layer.sparse_delta_indices["default"]]
    with torch.no_grad():
        values[0] = 1e-9  # moved, invisible in bf16 and below tau
        values[1] = base[1].abs() + 1.0  # clearly visible
    stats = sparse_delta_stats(model, "default")
    total = sum(m.sparse_delta_values["default"].numel() for m in layers.values())
    assert stats["moved_frac"] == pytest.approx(2 / total)
    assert stats["moved_frac_tau"] == pytest.approx(1 / total)
    assert stats["bf16_visible_frac"] == pytest.approx(1 / total)
    block = "attention" if "self_attn" in name else "ffn"
    assert stats[f"delta_norm_{block}"] == pytest.approx(math.hypot(1e-9, float(values[1])))


def test_composed_merged_weight_rounds_once_and_leaves_the_base_untouched(tokenizer):
    model = tiny_llama(tokenizer).to(torch.bfloat16)
    peft_model = get_peft_model(model, SparseDeltaConfig(mask_init="random", mask_density=0.3))
    layer = next(iter(sparse_delta_layers(peft_model, "default").values()))
    with torch.no_grad():
        layer.sparse_delta_values["default"].normal_(0, 1e-3)
    weight = layer.get_base_layer().weight
    original = weight.clone()
    merged = compose_merged_weight(layer)
    assert torch.equal(weight, original)
    idx = layer.sparse_delta_indices["default"]
    expected = original.reshape(-1).clone()
    expected[idx] = (original.reshape(-1)[idx].float() + layer.sparse_delta_values["default"].float()).to(
        torch.bfloat16
    )
    assert torch.equal(merged.reshape(-1), expected)
    assert merged.dtype == torch.bfloat16


def test_merged_generation_matches_unmerged_and_restores_the_base(tokenizer):
    from sparse_opd.tuner import merged_sparse_delta

    model = get_peft_model(
        tiny_llama(tokenizer), SparseDeltaConfig(mask_init="random", mask_density=0.2, init_weights=False)
    )
    model.eval()
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = torch.tensor([tokenizer("Ava has 3 apples .")["input_ids"]])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    unmerged = model.generate(input_ids=ids, **kwargs)
    with merged_sparse_delta(model):
        assert all(m.merged for m in sparse_delta_layers(model).values())
        merged = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(merged, unmerged)
    assert not any(m.merged for m in sparse_delta_layers(model).values())
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} was not restored bit for bit"


def test_gradient_accumulation_and_evaluation_with_context_distillation(tmp_path, tokenizer, train_set):
    args = make_args(
        tmp_path,
        max_steps=2,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=4,
    )
    trainer = SparseOPDTrainer(
        model=student_model(tokenizer),
        args=args,
        train_dataset=train_set,
        eval_dataset=arithmetic_dataset("validation", 4, 1),
        processing_class=tokenizer,
    )
    trainer.train()
    history = trainer.state.log_history
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) == 2 and all(math.isfinite(v) for v in evals)
    assert trainer.state.global_step == 2
    assert [h["sparse/update_norm"] > 0 for h in history if "loss" in h] == [True, True]


class StandInVLLMServer:
    """What TRL's `VLLMClient` does for a sync, as a server: receive (name, dtype, shape) metadata and the named
    tensors, load them into its own copy of the model (plain names, as vLLM names them)."""

    def __init__(self, plain_state):
        self.weights = {k: v.clone() for k, v in plain_state.items()}
        self.received: list[dict] = []

    def update_named_params(self, metadata, named_params):
        received = dict(named_params)
        assert [(n, list(t.shape)) for n, t in received.items()] == [(n, s) for n, _, s in metadata]
        for name, tensor in received.items():
            assert self.weights[name].shape == tensor.shape, name
            self.weights[name] = tensor.clone()
        self.received.append(received)

    def reset_prefix_cache(self):
        pass


def _stand_in_generation(server, mode="server"):
    import types

    return types.SimpleNamespace(mode=mode, enable_sleep_mode=False, vllm_client=server,
                                 accelerator=types.SimpleNamespace(is_main_process=True),
                                 _fix_param_name_to_vllm=lambda name: name)


def test_vllm_sync_sends_the_trained_policy_and_then_only_what_changed(tokenizer):
    from sparse_opd.trainer.vllm_sync import install_vllm_sync
    from sparse_opd.tuner import compose_merged_weight

    base = tiny_llama(tokenizer).to(torch.bfloat16)
    server = StandInVLLMServer(tiny_llama(tokenizer, seed=9).to(torch.bfloat16).state_dict())  # stale weights
    model = get_peft_model(base, SparseDeltaConfig(mask_init="random", mask_density=0.2, init_weights=False))
    sync = install_vllm_sync(_stand_in_generation(server), model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    for step in range(3):
        with torch.no_grad():
            for layer in sparse_delta_layers(model).values():
                layer.sparse_delta_values["default"].add_(1e-3 * (step + 1))
        sync()
        for name, layer in sparse_delta_layers(model, "default").items():
            key = name.removeprefix("base_model.model.") + ".weight"
            assert torch.equal(server.weights[key], compose_merged_weight(layer)), f"step {step}: {key}"
        plain = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in before.items()
                 if "sparse_delta" not in n}
        for key, value in server.weights.items():  # everything else is the base, bit for bit
            if key not in {n.removeprefix("base_model.model.") + ".weight" for n in sparse_delta_layers(model)}:
                assert torch.equal(value, plain[key]), key
    assert set(server.received[0]) == set(server.weights), "the first sync sends the whole model"
    adapted = {n.removeprefix("base_model.model.") + ".weight" for n in sparse_delta_layers(model)}
    assert all(set(r) == adapted for r in server.received[1:]), "later syncs send only the adapted weights"
    assert sync.sync_bytes[1] < sync.sync_bytes[0]
    for name, param in model.named_parameters():  # the student's base was never written
        if "sparse_delta" not in name:
            assert torch.equal(param, before[name]), name


def test_sparse_payload_rebuilds_the_merged_weights_on_a_stand_in_server(tokenizer):
    from sparse_opd.trainer.vllm_sync import SparseDeltaReceiver, payload_bytes, sparse_payload
    from sparse_opd.tuner import compose_merged_weight

    model = get_peft_model(tiny_llama(tokenizer).to(torch.bfloat16),
                           SparseDeltaConfig(mask_init="random", mask_density=0.05, init_weights=False))
    layers = sparse_delta_layers(model, "default")
    receiver = SparseDeltaReceiver({n.removeprefix("base_model.model.") + ".weight": m.get_base_layer().weight
                                    for n, m in layers.items()})  # the first (dense) sync
    first = sparse_payload(model, with_indices=True)
    receiver.apply(first)
    with torch.no_grad():
        for layer in layers.values():
            layer.sparse_delta_values["default"].mul_(-3.0)
    later = sparse_payload(model, with_indices=False)
    rebuilt = receiver.apply(later)
    for name, layer in layers.items():
        assert torch.equal(rebuilt[name.removeprefix("base_model.model.") + ".weight"], compose_merged_weight(layer))
    k = sum(m.sparse_delta_values["default"].numel() for m in layers.values())
    assert payload_bytes(later) == 2 * k, "a later sync sends k bf16 values and nothing else"
    assert payload_bytes(first) == 2 * k + 8 * k


def test_probe_strategy_keeps_the_top_scoring_coordinates_and_restores_the_weights(
    tmp_path, tokenizer, train_set, monkeypatch
):
    from sparse_opd.trainer.probe import ProbeCallback

    captured = {}
    original_to_mask = ProbeCallback.to_mask

    def spy(self, *args, **kwargs):
        captured["scores"] = {n: s.clone() for n, s in self.current_scores().items()}
        captured["steps"] = self.steps
        return original_to_mask(self, *args, **kwargs)

    monkeypatch.setattr(ProbeCallback, "to_mask", spy)
    student = student_model(tokenizer)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    args = make_args(tmp_path, mask_strategy="probe", mask_density=0.05, mask_probe_steps=2,
                     mask_probe_learning_rate=1e-3)
    trainer = SparseOPDTrainer(model=student, teacher_model=peaked_teacher(tokenizer), args=args,
                               train_dataset=train_set, processing_class=tokenizer)
    assert captured["steps"] == 2
    for key, value in trainer.model.base_model.model.state_dict().items():
        plain = key.replace(".base_layer", "")
        if plain in before:
            assert torch.equal(value, before[plain]), f"{plain} was not restored after the probe"
    layers = sparse_delta_layers(trainer.model, "default")
    assert math.isclose(sum(m.sparse_delta_values["default"].numel() for m in layers.values())
                        / sum(m.weight_numel for m in layers.values()), 0.05, rel_tol=0.05)
    for name, layer in layers.items():
        scores = captured["scores"][name.removeprefix("base_model.model.")].reshape(-1)
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen[layer.sparse_delta_indices["default"]] = True
        assert scores[chosen].min() >= scores[~chosen].max(), f"{name}: the mask is not the top-k of the probe"
        assert scores[chosen].max() > 0, f"{name}: the probe saw no update"


def test_diff_strategy_trains_exactly_the_coordinates_that_changed(tmp_path, tokenizer, train_set):
    base = student_model(tokenizer)
    base.save_pretrained(tmp_path / "base")
    tuned = student_model(tokenizer)
    changed = {"model.layers.0.mlp.up_proj": [3, 70, 500], "model.layers.1.self_attn.q_proj": [0, 33]}
    with torch.no_grad():
        for name, flat in changed.items():
            tuned.get_submodule(name).weight.view(-1)[flat] += 0.01
    tuned.save_pretrained(tmp_path / "tuned")
    args = make_args(tmp_path, mask_strategy="diff", mask_diff_base=str(tmp_path / "base"),
                     mask_diff_tuned=str(tmp_path / "tuned"))
    trainer = SparseOPDTrainer(model=base, teacher_model=peaked_teacher(tokenizer), args=args,
                               train_dataset=train_set, processing_class=tokenizer)
    layers = {n.removeprefix("base_model.model."): m for n, m in sparse_delta_layers(trainer.model, "default").items()}
    assert set(layers) == set(changed)
    for name, flat in changed.items():
        assert layers[name].sparse_delta_indices["default"].tolist() == flat


def test_dense_opd_trainer_moves_every_weight_against_a_frozen_copy_of_the_start(tmp_path, tokenizer, train_set):
    student = student_model(tokenizer)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = OPDTrainer(
        model=student,
        args=make_args(tmp_path, mask_strategy=None, max_steps=2, learning_rate=1e-3),
        train_dataset=train_set,
        processing_class=tokenizer,
    )
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    assert teacher is not student and not any(p.requires_grad for p in teacher.parameters())
    trainer.train()
    moved = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, start[k])]
    assert any("mlp" in k for k in moved) and any("self_attn" in k for k in moved)
    assert all(torch.equal(v, start[k]) for k, v in teacher.state_dict().items())


def test_dense_opd_trainer_with_lora_uses_the_disabled_adapter_as_teacher(tmp_path, tokenizer, train_set):
    from peft import LoraConfig

    trainer = OPDTrainer(
        model=student_model(tokenizer),
        args=make_args(tmp_path, mask_strategy=None, max_steps=2, learning_rate=1e-2),
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False),
    )
    assert isinstance(trainer.teacher_model, BaseWeightsTeacher)
    batch = fixed_batch(trainer, train_set)
    assert "teacher_prompt_ids" in batch
    assert divergence(trainer, batch) > 0  # random-init LoRA: the student differs from its base weights
    trainer.train()
    with pytest.raises(ValueError, match="no teacher"):
        OPDTrainer(
            model=student_model(tokenizer),
            args=make_args(tmp_path, mask_strategy=None, teacher_prompt_column=None),
            train_dataset=train_set,
            processing_class=tokenizer,
        )


# ---------------------------------------------------------------------------------- the path users actually run


def test_every_teacher_pass_runs_in_eval_mode(tmp_path, tokenizer, train_set):
    student = tiny_llama(tokenizer)
    student.config.attention_dropout = 0.5  # dropout live in train mode, as in GPT-2 / OPT / Phi defaults
    for layer in student.model.layers:
        layer.self_attn.attention_dropout = 0.5
    trainer = SparseOPDTrainer(model=student, args=make_args(tmp_path, disable_dropout=False),  # the student's kept
                               train_dataset=train_set, processing_class=tokenizer)
    batch = fixed_batch(trainer, train_set, n=4)
    trainer.model.train()  # the student trains
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad(), trainer.scoring(batch):
        n = batch["completion_ids"].shape[1]
        first, second = (trainer._get_last_hidden_state(trainer.teacher_model, ids, mask, n) for _ in range(2))
    assert torch.equal(first, second), "dropout was live in the teacher pass"
    assert trainer.model.training, "the student's mode is restored"


def test_a_separate_teacher_reads_the_students_prompt_unless_asked(tmp_path, tokenizer, train_set):
    plain = SparseOPDTrainer(model=student_model(tokenizer), teacher_model=peaked_teacher(tokenizer),
                             args=make_args(tmp_path), train_dataset=train_set, processing_class=tokenizer)
    assert "teacher_prompt_ids" not in fixed_batch(plain, train_set, n=2), "standard OPD: the plain prompt"
    privileged = SparseOPDTrainer(model=student_model(tokenizer), teacher_model=peaked_teacher(tokenizer),
                                  args=make_args(tmp_path, teacher_privileged_context=True), train_dataset=train_set,
                                  processing_class=tokenizer)
    assert "teacher_prompt_ids" in fixed_batch(privileged, train_set, n=2)
    with pytest.raises(ValueError, match="teacher_privileged_context=False with no teacher model"):
        SparseOPDTrainer(model=student_model(tokenizer), args=make_args(tmp_path, teacher_privileged_context=False),
                         train_dataset=train_set, processing_class=tokenizer)


def test_the_probe_of_a_bf16_model_is_not_the_near_zero_prior(tmp_path, tokenizer, train_set):
    from sparse_opd.masks import near_zero_mask

    student = student_model(tokenizer).to(torch.bfloat16)
    prior = near_zero_mask(student, density=0.05)
    args = make_args(tmp_path, mask_strategy="probe", mask_density=0.05, mask_probe_steps=2,
                     mask_probe_learning_rate=1e-5, model_init_kwargs=None)
    trainer = SparseOPDTrainer(model=student, teacher_model=peaked_teacher(tokenizer).to(torch.bfloat16), args=args,
                               train_dataset=train_set, processing_class=tokenizer)
    probe = sparse_opd.adapter_mask(trainer.model)
    lift = probe.overlap(prior)["total"].jaccard_lift
    assert lift < 3, f"the probe mask shares {lift:.1f}x chance with the near-zero prior: bf16 rounded its steps away"
    assert all(p.dtype == torch.bfloat16 for n, p in trainer.model.named_parameters() if "sparse_delta" not in n)


def test_the_student_and_teacher_can_be_given_by_path(tmp_path, tokenizer, train_set):
    student_model(tokenizer).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    peaked_teacher(tokenizer).save_pretrained(tmp_path / "teacher")
    mask = sparse_opd.masks.random_mask(student_model(tokenizer), density=0.1)
    mask.save(tmp_path / "mask.safetensors")
    for extra in ({"mask_strategy": "near_zero"},
                  {"mask_strategy": "file", "mask_path": str(tmp_path / "mask.safetensors")}):
        trainer = SparseOPDTrainer(model=str(tmp_path / "student"), teacher_model=str(tmp_path / "teacher"),
                                   args=make_args(tmp_path, max_steps=1, **extra), train_dataset=train_set,
                                   processing_class=tokenizer)
        trainer.train()
        assert sparse_delta_layers(trainer.model)
    trainer = SparseOPDTrainer(model=str(tmp_path / "student"), args=make_args(tmp_path, mask_strategy=None),
                               peft_config=SparseDeltaConfig(mask=mask), train_dataset=train_set,
                               processing_class=tokenizer)
    assert sparse_opd.adapter_mask(trainer.model) == mask
    OPDTrainer(model=str(tmp_path / "student"), args=make_args(tmp_path, mask_strategy=None, max_steps=1),
               train_dataset=train_set, processing_class=tokenizer).train()


def test_bf16_rollouts_come_from_the_trained_policy_not_a_rounded_merge(tokenizer):
    """bf16(W + delta) drops a small delta; the generation path must add it as the training forward does."""
    from sparse_opd.tuner import merged_sparse_delta

    model = get_peft_model(student_model(tokenizer).to(torch.bfloat16),
                           SparseDeltaConfig(mask_init="random", mask_density=0.3))
    with torch.no_grad():
        for layer in sparse_delta_layers(model).values():
            w = layer.get_base_layer().weight.reshape(-1)[layer.sparse_delta_indices["default"]].float()
            layer.sparse_delta_values["default"].copy_(0.3 * w.abs() * 2.0**-8)  # ~0.3 bf16 steps of W
    ids = torch.tensor([tokenizer("Ava has 3 apples .")["input_ids"]])
    with torch.no_grad(), model.disable_adapter():
        base = model(ids).logits.float()
    train = model(ids).logits.float().detach()  # the training forward (gradients on)
    with torch.no_grad(), merged_sparse_delta(model):  # what generation runs under
        generation = model(ids).logits.float()
    effect = (train - base).norm()
    assert effect > 0
    assert (generation - train).norm() / effect < 0.1
    layers = list(sparse_delta_layers(model).values())
    with torch.no_grad():
        for layer in layers:
            layer.merge()  # the old path: merge into the bf16 weights
        rounded = model(ids).logits.float()
        for layer in layers:
            layer.unmerge()
    assert (rounded - train).norm() / effect > 0.5, "a bf16 merge should lose most of this delta"


def dropout_student(tokenizer, arch: str, rate: float = 0.1):
    """A student with dropout live in train mode: GPT-2's `nn.Dropout` modules, or Llama's float attention rate."""
    if arch == "gpt2":
        return tiny_gpt2(tokenizer, dropout=rate)
    student = tiny_llama(tokenizer)
    student.config.attention_dropout = rate
    for layer in student.model.layers:
        layer.self_attn.attention_dropout = rate
    return student


def logged_gaps(trainer) -> list[float]:
    return [h["rollout/logp_abs_diff_max"] for h in trainer.state.log_history if "rollout/logp_abs_diff_max" in h]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rollouts_are_sampled_with_dropout_off_by_default(tmp_path, tokenizer, train_set, arch):
    """With dropout live, generation and the training forward draw different masks: the completions are not sampled
    from the distribution the loss differentiates. OPDConfig turns the student's dropout off by default."""
    gaps = {}
    for disable in (True, False):
        args = make_args(tmp_path, per_device_train_batch_size=1, max_steps=2, **({} if disable else
                                                                                  {"disable_dropout": False}))
        trainer = SparseOPDTrainer(model=dropout_student(tokenizer, arch), args=args, train_dataset=train_set,
                                   processing_class=tokenizer)
        trainer.train()
        gaps[disable] = max(logged_gaps(trainer))
    assert gaps[True] <= 1e-5, f"default: sampled-token log-probabilities differ by {gaps[True]:.3g}"
    assert gaps[False] > 1e-3, f"dropout kept on should show in the gap ({gaps[False]:.3g})"


def unpadded_hidden_states(trainer, model, ids, mask, n_completion):
    """Hidden states of one row read alone, without padding, before each of its first n completion tokens."""
    ids = ids[mask.bool()][None]
    with torch.no_grad():
        hidden = DistillationTrainer._get_last_hidden_state(trainer, model, ids, torch.ones_like(ids), n_completion)
    return hidden[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_loss_scores_each_rollout_at_the_positions_it_was_sampled_at(tmp_path, tokenizer, train_set, arch):
    """In a left-padded batch of mixed-length prompts, student and teacher states of every row equal the row's own
    unpadded forward: generate() numbers positions from a row's first token, and so must every scoring forward (the
    teacher's privileged prompt is padded on its own). GPT-2's absolute position embeddings make a shift visible."""
    student = tiny_gpt2(tokenizer) if arch == "gpt2" else tiny_llama(tokenizer)
    trainer = SparseOPDTrainer(model=student, args=make_args(tmp_path), train_dataset=train_set,
                               processing_class=tokenizer)
    batch = fixed_batch(trainer, train_set, n=4)
    assert len(set(batch["prompt_mask"].sum(1).tolist())) > 1, "the prompts should differ in length"
    assert len(set(batch["teacher_prompt_mask"].sum(1).tolist())) > 1
    k = batch["completion_ids"].shape[1]
    student_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    student_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    teacher_ids = torch.cat([batch["teacher_prompt_ids"], batch["completion_ids"]], dim=1)
    teacher_mask = torch.cat([batch["teacher_prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad(), trainer.scoring(batch):
        scored = {"student": trainer._get_last_hidden_state(trainer.model, student_ids, student_mask, k),
                  "teacher": trainer._get_last_hidden_state(trainer.teacher_model, student_ids, student_mask, k)}
    for row in range(4):
        n = int(batch["completion_mask"][row].sum())
        alone = {"student": unpadded_hidden_states(trainer, trainer.model, student_ids[row], student_mask[row], n)}
        with trainer.model.disable_adapter():  # the teacher: the student's base weights
            alone["teacher"] = unpadded_hidden_states(trainer, trainer.model, teacher_ids[row], teacher_mask[row], n)
        for who in ("student", "teacher"):
            torch.testing.assert_close(scored[who][row, :n], alone[who], rtol=0, atol=1e-5,
                                       msg=lambda m, who=who, row=row: f"{who}, row {row}: {m}")


def test_rollout_metrics_are_a_token_weighted_mean_and_a_true_maximum(tmp_path, tokenizer, train_set, monkeypatch):
    """TRL's log() averages every metric list; the rollout gap over a logging window (2 steps x 2 micro-batches here)
    must be the mean over all sampled tokens and their maximum, not a mean of per-micro-batch means and maxima."""
    from sparse_opd.trainer.rollout_check import SampledLogprobs

    offsets, recorded = [0.1, 0.2, 0.3, 0.4], []  # added to each row's generation log-probabilities
    original = SampledLogprobs.per_completion

    def shifted(self, lengths):
        recorded.append(lengths)
        return [lp + offset for lp, offset in zip(original(self, lengths), offsets, strict=True)]

    monkeypatch.setattr(SampledLogprobs, "per_completion", shifted)
    args = make_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
                     logging_steps=2)
    trainer = SparseOPDTrainer(model=student_model(tokenizer), args=args, train_dataset=train_set,
                               processing_class=tokenizer)
    trainer.train()
    (logged,) = [h for h in trainer.state.log_history if "rollout/logp_abs_diff" in h]
    tokens = sum(n for lengths in recorded for n in lengths)
    expected_mean = sum(o * n for lengths in recorded for o, n in zip(offsets, lengths, strict=True)) / tokens
    assert len(recorded) == 2 and tokens > 0
    assert logged["rollout/logp_abs_diff_max"] == pytest.approx(0.4, abs=1e-4)
    assert logged["rollout/logp_abs_diff"] == pytest.approx(expected_mean, abs=1e-4)
    assert logged["rollout/logp_diff"] == pytest.approx(expected_mean, abs=1e-4)  # generation above training


def test_vllm_rollouts_come_from_the_synced_policy_and_are_checked(tmp_path, tokenizer, train_set, monkeypatch):
    """Through TRL's own VLLMGeneration (server mode), with a stand-in server that starts from other weights: the
    rollouts match the training forward to rounding only if every weight sync arrived, and the sampled tokens'
    log-probabilities come from vLLM's answer (logprobs=0), which TRL's distillation trainer discards."""
    import trl.trainer.distillation_trainer as distillation

    from tests.helpers.vllm_stand_in import stand_in_generation

    monkeypatch.setattr(distillation, "is_vllm_available", lambda: True)
    monkeypatch.setattr(distillation, "VLLMGeneration", stand_in_generation(lambda: peaked_teacher(tokenizer)))
    args = make_args(tmp_path, use_vllm=True, vllm_mode="server", max_steps=3, mask_strategy="random")
    trainer = SparseOPDTrainer(model=student_model(tokenizer), args=args, train_dataset=train_set,
                               processing_class=tokenizer)
    trainer.train()
    server = trainer.vllm_generation.server
    assert len(server.synced) == 3, "one sync per optimizer step"
    assert server.synced[0] > server.synced[1], "the first sync sends everything, later ones the adapted weights"
    assert trainer.vllm_generation.logprobs is None, "the request for log-probabilities is scoped to generation"
    gaps = logged_gaps(trainer)
    assert len(gaps) == 3 and max(gaps) <= 1e-5, gaps
