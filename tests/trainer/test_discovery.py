"""Gradient discovery (`mask_strategy="gradient"`): the statistics, the distributed top-k, and the trainer's phase.

The sharded cells (DDP, FSDP2, ZeRO-3; fp32 and bf16) are in the trainer matrix (tests/trainer/test_matrix.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

from sparse_opd import SparseDeltaConfig
from sparse_opd.masks import SparseMask
from sparse_opd.masks.gradient_stats import GradientStatistics
from sparse_opd.masks.top_k import top_k_indices
from sparse_opd.trainer import SparseOPDConfig, SparseOPDTrainer, sparse_delta_layers
from tests.helpers.tiny_models import make_model
from tests.helpers.tiny_opd import make_args, peaked_teacher, student_model

pytestmark = pytest.mark.usefixtures("one_thread")


# the distributed top-k -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["continuous", "ties", "all_equal", "keep_all"])
def test_top_k_indices_is_the_top_k_with_ties_taken_by_position(case):
    gen = torch.Generator().manual_seed(7)
    scores = torch.rand(3000, generator=gen)
    if case == "ties":
        scores = torch.round(scores * 8) / 8
    if case == "all_equal":
        scores = torch.full((3000,), 0.25)
    k = 3000 if case == "keep_all" else 137
    pieces = [(0, scores[:1000]), (1000, scores[1000:1700]), (1700, scores[1700:])]
    chosen = top_k_indices({"m": pieces}, {"m": k})["m"]
    order = sorted(range(3000), key=lambda i: (-float(scores[i]), i))  # larger first, then by position
    assert chosen.tolist() == sorted(order[:k])


def test_top_k_indices_refuses_bad_scores_and_budgets():
    with pytest.raises(ValueError, match="cannot keep 11 coordinates out of 10"):
        top_k_indices({"m": [(0, torch.rand(10))]}, {"m": 11})
    with pytest.raises(ValueError, match="finite and >= 0"):
        top_k_indices({"m": [(0, torch.tensor([0.5, float("nan")]))]}, {"m": 1})


# the statistics ------------------------------------------------------------------------------------------------------
def test_gradient_statistics_are_the_formulas_over_micro_batches():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(5, 6, 4, generator=gen)  # 5 micro-batches of a 6 x 4 weight gradient
    stats = GradientStatistics({"w": (6, 4)}, statistics=("snr",), block_rows={"w": 4})
    observe = stats.observer("w")
    for g in grads:
        observe(0, g[:4])  # two row blocks, as the layer's backward hands them over
        observe(4, g[4:])
    assert stats.samples == 5 and stats.accumulator_bytes() == 6 * 4 * 8
    with pytest.raises(RuntimeError, match="does not match the blocks"):
        observe(2, grads[0][2:])  # a block the layout does not have
    mean, rms = grads.mean(0).reshape(-1), grads.pow(2).mean(0).sqrt().reshape(-1)
    expected = {"snr": mean.abs() / (rms + 1e-8), "gain": mean.pow(2) / (rms + 1e-8), "fisher": rms**2,
                "mean": mean.abs()}
    for statistic, reference in expected.items():
        fresh = GradientStatistics({"w": (6, 4)}, statistics=(statistic,), block_rows={"w": 4})
        for g in grads:
            fresh.observer("w")(0, g[:4])
            fresh.observer("w")(4, g[4:])
        assert fresh.accumulator_bytes() == 6 * 4 * (8 if statistic in ("snr", "gain") else 4)
        pieces = fresh.scores(statistic)["w"]
        assert [start for start, _ in pieces] == [0, 16]
        torch.testing.assert_close(torch.cat([s for _, s in pieces]), reference, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_layer_shows_its_observer_the_whole_weight_gradient_block_by_block(kind):
    """Linear and GPT-2's transposed Conv1D: the blocks are the autograd gradient of the base weight (the base
    layers compute their own part, compose="never", so that autograd can give the reference)."""
    model = make_model(kind)
    peft_model = get_peft_model(model, SparseDeltaConfig(mask_init="random", mask_density=0.05,
                                                         grad_block_elements=64, compose="never"))
    layers = sparse_delta_layers(peft_model, "default")
    seen = {}
    for name, layer in layers.items():
        def observe(first_row, block, name=name):
            seen.setdefault(name, {})[first_row] = block.clone()
        layer.set_weight_grad_observer(observe)
    weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    loss = peft_model(input_ids=ids).logits.float().pow(2).mean()
    reference = torch.autograd.grad(loss, list(weights.values()), retain_graph=True)
    loss.backward()
    for (name, layer), ref in zip(layers.items(), reference):
        blocks = seen[name]
        assert len(blocks) > 1, "the test should cover several row blocks"
        whole = torch.cat([blocks[r] for r in sorted(blocks)])
        torch.testing.assert_close(whole, ref.float(), rtol=1e-4, atol=1e-6)
        layer.set_weight_grad_observer(None)


# the trainer's discovery phase ---------------------------------------------------------------------------------------
def _trainer(tmp_path, tokenizer, train_set, **overrides):
    fields = {"mask_strategy": "gradient", "mask_density": 0.05, "mask_gradient_steps": 2,
              "gradient_accumulation_steps": 2, "max_steps": 2}
    fields.update(overrides)
    return SparseOPDTrainer(model=student_model(tokenizer), teacher_model=peaked_teacher(tokenizer),
                            args=make_args(tmp_path, **fields), train_dataset=train_set, processing_class=tokenizer)


def test_discovery_keeps_the_top_snr_coordinates_of_the_dense_weight_gradient(tmp_path, tokenizer, train_set,
                                                                              monkeypatch):
    trainer = _trainer(tmp_path, tokenizer, train_set)
    micro_batches = []
    original = SparseOPDTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        micro_batches.append(inputs)
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SparseOPDTrainer, "compute_loss", spy)
    trainer.discovery.run(trainer.get_train_dataloader())
    monkeypatch.setattr(SparseOPDTrainer, "compute_loss", original)
    assert len(micro_batches) == 4  # 2 generation batches x 2 accumulation steps
    assert trainer.discovery.report["accumulator_bytes_per_entry"] == 8.0
    layers = {n.removeprefix("base_model.model."): m for n, m in sparse_delta_layers(trainer.model, "default").items()}
    weights = [layer.get_base_layer().weight for layer in layers.values()]
    for layer, weight in zip(layers.values(), weights):
        weight.requires_grad_(True)
        layer.compose_mode["default"] = "never"  # the base layers' own matmul, so autograd gives the reference
    trainer.model.train()
    grads = [torch.autograd.grad(trainer.compute_loss(trainer.model, micro), weights) for micro in micro_batches]
    for i, (name, layer) in enumerate(layers.items()):
        g = torch.stack([step[i].reshape(-1) for step in grads])
        snr = g.mean(0).abs() / (g.pow(2).mean(0).sqrt() + trainer.args.adam_epsilon)
        k = layer.sparse_delta_indices["default"].numel()
        expected = torch.sort(torch.topk(snr, k).indices).values
        assert torch.equal(layer.sparse_delta_indices["default"], expected), f"{name}: not the top-{k} SNR"


def test_discovery_leaves_the_training_state_alone_and_training_moves_only_the_discovered_coordinates(
    tmp_path, tokenizer, train_set
):
    trainer = _trainer(tmp_path, tokenizer, train_set, mask_save_path=str(tmp_path / "found.safetensors"))
    layers = sparse_delta_layers(trainer.model, "default")
    provisional = {n: m.sparse_delta_indices["default"].clone() for n, m in layers.items()}
    base = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    seen_at_first_step = {}

    class FirstStep:
        def __getattr__(self, name):
            return (lambda *a, **k: None) if name.startswith("on_") else None

        def on_step_begin(self, args, state, control, **kwargs):
            if not seen_at_first_step:
                seen_at_first_step["grads"] = [p.grad for p in trainer.model.parameters()]
                seen_at_first_step["tokens"] = state.num_input_tokens_seen
                seen_at_first_step["values"] = [m.sparse_delta_values["default"].detach().clone()
                                                for m in layers.values()]

    trainer.add_callback(FirstStep())
    trainer.train()
    assert all(g is None for g in seen_at_first_step["grads"]), "discovery left gradients behind"
    assert seen_at_first_step["tokens"] == 0, "discovery's rollouts were counted as training tokens"
    assert all(float(v.abs().max()) == 0 for v in seen_at_first_step["values"]), "values moved before training"
    report = trainer.discovery.report
    assert report["micro_batches"] == 4 and report["tokens"] > 0
    saved = SparseMask.load(tmp_path / "found.safetensors")
    moved_somewhere = False
    for name, layer in layers.items():
        found = layer.sparse_delta_indices["default"]
        assert not torch.equal(found, provisional[name])
        assert torch.equal(saved.indices[name.removeprefix("base_model.model.")], found)
        layer.merge()
        changed = torch.nonzero((layer.get_base_layer().weight.detach() != base[name]).reshape(-1)).flatten()
        layer.unmerge()
        assert set(changed.tolist()) <= set(found.tolist())
        moved_somewhere |= changed.numel() > 0
    assert moved_somewhere
    config = trainer.model.peft_config["default"]
    assert config.module_index_bytes == {n.removeprefix("base_model.model."): int(m.sparse_delta_index_stream[
        "default"].numel()) for n, m in layers.items()}


def test_a_resumed_gradient_run_takes_its_coordinates_from_the_checkpoint(tmp_path, tokenizer, train_set):
    def run(out, resume=None, **extra):
        trainer = _trainer(tmp_path, tokenizer, train_set, output_dir=str(out), max_steps=4, save_strategy="steps",
                           save_steps=2, **extra)
        trainer.train(resume_from_checkpoint=resume)
        layers = sparse_delta_layers(trainer.model, "default")
        return trainer, {n: (m.sparse_delta_indices["default"].clone(), m.sparse_delta_values["default"].detach())
                         for n, m in layers.items()}

    _, straight = run(tmp_path / "a")
    trainer, resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.discovery.report is None, "a resumed run must not discover again"
    for name, (indices, values) in straight.items():
        assert torch.equal(resumed[name][0], indices)
        assert torch.equal(resumed[name][1], values)


def test_discovery_of_a_bf16_student_accumulates_in_float32(tmp_path, tokenizer, train_set):
    student = student_model(tokenizer).to(torch.bfloat16)
    captured = []
    original = GradientStatistics._add

    def spy(self, module, first_row, block):
        captured.append(block.dtype)
        original(self, module, first_row, block)

    GradientStatistics._add = spy
    try:
        trainer = SparseOPDTrainer(model=student, teacher_model=peaked_teacher(tokenizer).to(torch.bfloat16),
                                   args=make_args(tmp_path, mask_strategy="gradient", mask_density=0.05,
                                                  mask_gradient_steps=1, max_steps=1, bf16=True),
                                   train_dataset=train_set, processing_class=tokenizer)
        trainer.train()
    finally:
        GradientStatistics._add = original
    assert captured and set(captured) == {torch.float32}
    assert trainer.discovery.report["accumulator_bytes_per_entry"] == 8.0


def test_bad_discovery_input_fails_in_one_line_before_any_model_is_loaded(tmp_path, tokenizer, train_set,
                                                                          monkeypatch):
    with pytest.raises(ValueError, match="mask_gradient_steps must be >= 1"):
        make_args(tmp_path, mask_strategy="gradient", mask_gradient_steps=0)
    with pytest.raises(ValueError, match="mask_gradient_statistic must be one of"):
        make_args(tmp_path, mask_strategy="gradient", mask_gradient_statistic="adam")
    from datasets import Dataset

    empty = Dataset.from_dict({"prompt": [], "teacher_prompt": []})
    missing = str(tmp_path / "no-such-model")  # never read: the errors come first
    with pytest.raises(ValueError, match="training dataset is empty"):
        SparseOPDTrainer(model=missing, args=make_args(tmp_path, mask_strategy="gradient"), train_dataset=empty,
                         processing_class=tokenizer)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    refusal = "mask_strategy='probe'.*FSDP.*mask_strategy='near_zero'.*mask_strategy='gradient'"
    with pytest.raises(ValueError, match=refusal):
        SparseOPDTrainer(model=missing, args=make_args(tmp_path, mask_strategy="probe"), train_dataset=train_set,
                         processing_class=tokenizer)


def test_the_gradient_strategy_uses_the_budget_of_the_other_strategies(tmp_path, tokenizer, train_set):
    trainer = _trainer(tmp_path, tokenizer, train_set, mask_density=0.1)
    near_zero = SparseOPDTrainer(model=student_model(tokenizer), teacher_model=peaked_teacher(tokenizer),
                                 args=make_args(tmp_path, mask_strategy="near_zero", mask_density=0.1),
                                 train_dataset=train_set, processing_class=tokenizer)
    counts = {n: m.sparse_delta_indices["default"].numel() for n, m in sparse_delta_layers(trainer.model).items()}
    assert counts == {n: m.sparse_delta_indices["default"].numel()
                      for n, m in sparse_delta_layers(near_zero.model).items()}
    total = sum(m.weight_numel for m in sparse_delta_layers(trainer.model).values())
    assert math.isclose(sum(counts.values()) / total, 0.1, rel_tol=0.01)
    assert isinstance(trainer.args, SparseOPDConfig)
