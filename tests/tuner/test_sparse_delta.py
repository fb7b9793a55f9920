"""One battery over (model kind x tuner setting): correctness of forward, gradients, merging, saving and loading."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model

from sparse_opd import SparseDeltaConfig, SparseDeltaLayer, SparseMask
from sparse_opd.masks import random_mask
from tests.helpers.tiny_models import make_model


def _mask(model, density=0.1, seed=0):
    return random_mask(model, density=density, seed=seed)


def _delta_layers(peft_model):
    return {n: m for n, m in peft_model.named_modules() if isinstance(m, SparseDeltaLayer)}


def _reference_with_delta(kind, peft_model, adapter="default"):
    """A plain model whose weights are W + delta, computed independently of the tuner's forward."""
    ref = make_model(kind)
    ref_modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, layer in _delta_layers(peft_model).items():
            key = name.removeprefix("base_model.model.")
            weight = ref_modules[key].weight
            flat = weight.view(-1)
            flat[layer.sparse_delta_indices[adapter]] += layer.sparse_delta_values[adapter].to(weight.dtype)
    return ref


SETTINGS = {
    "dense-compose": dict(value_grad="dense", compose="auto"),
    "dense-separate": dict(value_grad="dense", compose="never"),
    "sampled": dict(value_grad="sampled", compose="never"),
    "small-blocks": dict(value_grad="dense", grad_block_elements=7),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_forward_and_value_grads_match_a_dense_model_with_the_delta_added(kind, tokens, setting):
    model = make_model(kind)
    mask = _mask(model)
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=mask, init_weights=False, **SETTINGS[setting]))
    ref = _reference_with_delta(kind, peft_model)
    for p in ref.parameters():
        p.requires_grad_(True)

    out = peft_model(tokens, labels=tokens)
    ref_out = ref(tokens, labels=tokens)
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref_out.loss.backward()

    ref_modules = dict(ref.named_modules())
    for name, layer in _delta_layers(peft_model).items():
        dense_grad = ref_modules[name.removeprefix("base_model.model.")].weight.grad.reshape(-1)
        expected = dense_grad[layer.sparse_delta_indices["default"]]
        torch.testing.assert_close(layer.sparse_delta_values["default"].grad, expected, rtol=1e-4, atol=1e-6)


def test_identity_at_init_and_trainable_count_equals_mask_size(kind, tokens):
    """At init every adapted layer computes what its base layer computes, on the same input. Without a bias both run
    the same matmul on bit-equal weights (W + 0 = W): equal bit for bit, and so is the whole model (Llama). With a bias
    (Qwen2's q/k/v, GPT-2's Conv1D) the base fuses it into one addmm while the composed forward adds it after the
    product, so the same K + 1 terms are summed in another order: within 2 gamma_{K+1} (|b| + |x| |W|^T) (u = 2^-24,
    Higham's bound for any order), whichever order the CPU's GEMM kernel picks."""
    model = make_model(kind)
    base_logits = model(tokens).logits
    mask = _mask(model, density=0.05)
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=mask))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == mask.count()
    layers = _delta_layers(peft_model)
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda _, args, name=name: inputs.setdefault(name, args[0].detach()))
             for name, layer in layers.items()]
    logits = peft_model(tokens).logits
    for hook in hooks:
        hook.remove()
    for name, layer in layers.items():
        x, base = inputs[name], layer.get_base_layer()
        adapted, plain = layer(x), base(x)
        if base.bias is None:
            assert torch.equal(adapted, plain), name
            continue
        k = x.shape[-1]
        gamma = (k + 1) * 2.0**-24 / (1 - (k + 1) * 2.0**-24)
        weight = base.weight.T if layer.delta_specs["default"].transposed else base.weight  # (out, in)
        scale = base.bias.abs() + x.abs() @ weight.abs().T
        assert bool(((adapted - plain).abs() <= 2 * gamma * scale).all()), name
    if kind == "llama":  # no bias anywhere: the whole model is unchanged bit for bit
        assert torch.equal(logits, base_logits)


def test_only_masked_coordinates_move_when_training(kind, tokens):
    model = make_model(kind)
    before = copy.deepcopy(model.state_dict())
    mask = _mask(model, density=0.05)
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=mask))
    opt = torch.optim.AdamW(peft_model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        peft_model(tokens, labels=tokens).loss.backward()
        opt.step()
    merged = peft_model.merge_and_unload()
    after = merged.state_dict()
    for key, old in before.items():
        changed = (after[key] != old).reshape(-1)
        module = key.removesuffix(".weight")
        if module in mask and key.endswith(".weight"):
            allowed = torch.zeros_like(changed)
            allowed[mask[module]] = True
            assert not (changed & ~allowed).any(), f"{key} moved outside the mask"
            assert changed.any(), f"{key} did not move at all"
        else:
            assert not changed.any(), f"{key} is not masked but moved"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_base_weights_bit_exactly(kind, tokens, dtype):
    model = make_model(kind, dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=_mask(model), init_weights=False))
    unmerged = peft_model(tokens).logits
    peft_model.merge_adapter()
    merged = peft_model(tokens).logits
    if dtype == torch.float32:
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    peft_model.unmerge_adapter()
    after = peft_model.get_base_model().state_dict()
    for key, value in before.items():
        module, param = key.rsplit(".", 1)
        stored = after.get(key, after.get(f"{module}.base_layer.{param}"))
        assert torch.equal(stored, value), key


def test_values_stay_float32_on_a_bfloat16_base(tokens):
    model = make_model("llama", dtype=torch.bfloat16)
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=_mask(model)))
    values = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    assert values and all(p.dtype == torch.float32 for p in values)
    peft_model(tokens, labels=tokens).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in values)


def test_save_and_load_round_trip_with_different_counts_per_module(kind, tokens, tmp_path):
    model = make_model(kind)
    base_state = copy.deepcopy(model.state_dict())
    names = list(_mask(model).modules())
    counts = {name: 1 + 3 * i for i, name in enumerate(names)}
    shapes = _mask(model).shapes
    mask = SparseMask({n: torch.randperm(shapes[n][0] * shapes[n][1])[: counts[n]] for n in names}, shapes)
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=mask, init_weights=False))
    with torch.no_grad():  # the same (gradient-free) path as the reloaded, inference-mode adapter
        expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path)

    fresh = make_model(kind)
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert loaded.peft_config["default"].module_counts == counts
    torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=0)
    for name, layer in _delta_layers(loaded).items():
        assert torch.equal(layer.sparse_delta_indices["default"], mask[name.removeprefix("base_model.model.")])


def test_auto_peft_model_and_transformers_load_adapter(tokens, tmp_path):
    model = make_model("llama")
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=_mask(model), init_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    with torch.no_grad():  # the same (gradient-free) path as the reloaded, inference-mode adapter
        expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(auto(tokens).logits, expected, rtol=0, atol=0)

    plain = make_model("llama")
    plain.load_adapter(str(tmp_path / "adapter"))
    torch.testing.assert_close(plain(tokens).logits, expected, rtol=0, atol=0)  # the same gradient-free path


def test_adapter_file_is_compact(tmp_path):
    model = make_model("llama")
    mask = _mask(model, density=0.05)
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=mask, init_weights=False))
    peft_model.save_pretrained(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    # 4 bytes per fp32 value + ~1 byte of gap per index, plus the safetensors header (small for a tiny model)
    payload = size - int.from_bytes((tmp_path / "adapter_model.safetensors").read_bytes()[:8], "little") - 8
    assert payload / mask.count() < 5.1


def test_multiple_adapters_set_disable_and_delete(tokens):
    model = make_model("llama")
    base = model(tokens).logits
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=_mask(model, seed=1), init_weights=False))
    peft_model.add_adapter("other", SparseDeltaConfig(mask=_mask(model, seed=2), init_weights=False))
    out_default = peft_model(tokens).logits
    peft_model.set_adapter("other")
    out_other = peft_model(tokens).logits
    assert not torch.allclose(out_default, out_other)
    assert not torch.allclose(out_default, base)
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(tokens).logits, base, rtol=0, atol=0)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".other") for n in trainable)
    peft_model.delete_adapter("default")
    assert all("default" not in layer.sparse_delta_values for layer in _delta_layers(peft_model).values())
    torch.testing.assert_close(peft_model(tokens).logits, out_other, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tokens):
    grads = []
    for checkpointing in (False, True):
        model = make_model("llama")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model = get_peft_model(model, SparseDeltaConfig(mask=_mask(model), init_weights=False))
        peft_model(tokens, labels=tokens).loss.backward()
        grads.append(torch.cat([p.grad for p in peft_model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1])


def test_mask_init_near_zero_picks_the_smallest_weights():
    model = make_model("llama")
    weight = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    peft_model = get_peft_model(model, SparseDeltaConfig(mask_init="near_zero", mask_density=0.1))
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    idx = layer.sparse_delta_indices["default"]
    chosen = weight.abs().reshape(-1)[idx]
    rest = torch.ones(weight.numel(), dtype=torch.bool)
    rest[idx] = False
    assert chosen.max() <= weight.abs().reshape(-1)[rest].min()
    assert "lm_head" not in peft_model.peft_config["default"].module_counts


def test_add_weighted_adapter_sums_deltas_on_the_union_of_coordinates(tokens):
    model = make_model("llama")
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=_mask(model, seed=1), init_weights=False))
    peft_model.add_adapter("b", SparseDeltaConfig(mask=_mask(model, seed=2), init_weights=False))
    peft_model.base_model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "mix")
    for layer in _delta_layers(peft_model).values():
        expected = 0.5 * layer.get_delta_weight("default") + 2.0 * layer.get_delta_weight("b")
        torch.testing.assert_close(layer.get_delta_weight("mix"), expected)
        union = torch.unique(torch.cat([layer.sparse_delta_indices["default"], layer.sparse_delta_indices["b"]]))
        assert torch.equal(layer.sparse_delta_indices["mix"], union)


def test_mask_given_as_a_file_path_and_as_boolean_tensors(tokens, tmp_path):
    model = make_model("llama")
    mask = _mask(model, density=0.05)
    mask.save(tmp_path / "mask.safetensors")
    from_file = get_peft_model(make_model("llama"), SparseDeltaConfig(mask=str(tmp_path / "mask.safetensors")))
    from_bool = get_peft_model(make_model("llama"), SparseDeltaConfig(mask={n: mask.to_bool(n) for n in mask}))
    for peft_model in (from_file, from_bool):
        layers = _delta_layers(peft_model)
        assert {n.removeprefix("base_model.model.") for n in layers} == set(mask.modules())
        for name, layer in layers.items():
            assert torch.equal(layer.sparse_delta_indices["default"], mask[name])


@pytest.mark.parametrize("mask_init", ["near_zero", "random"])
def test_adapters_made_with_mask_init_reload(tokens, tmp_path, mask_init):
    model = make_model("llama")
    state = copy.deepcopy(model.state_dict())
    peft_model = get_peft_model(model, SparseDeltaConfig(mask_init=mask_init, mask_density=0.1, init_weights=False))
    with torch.no_grad():  # the same (gradient-free) path as the reloaded, inference-mode adapter
        expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path)
    fresh = make_model("llama")
    fresh.load_state_dict(state)
    torch.testing.assert_close(PeftModel.from_pretrained(fresh, tmp_path)(tokens).logits, expected, rtol=0, atol=0)


def _abs_linear_delta(layer, adapter: str) -> torch.Tensor:
    """``|D|`` of one adapter as the (out, in) matrix the layer applies, in float64, from its values and indices."""
    spec = layer.delta_specs[adapter]
    dense = torch.zeros(spec.shape[0] * spec.shape[1], dtype=torch.float64)
    dense[layer.sparse_delta_indices[adapter]] = layer.sparse_delta_values[adapter].detach().double().abs()
    dense = dense.view(spec.shape)
    return dense.T if spec.transposed else dense


def _bf16_paths_bound(layer, x: torch.Tensor, adapters: list[str], y_a: torch.Tensor, y_b: torch.Tensor):
    """How far two bf16 evaluations ``y_a``, ``y_b`` of ``y = base(x) + x D^T`` may differ when they share the base
    product (the same kernel call on the same input) and compute the delta term differently (a scatter into a dense
    bf16 delta and a matmul, or a gather-sum over the k entries), from bf16's unit roundoff u = 2^-8 alone:
    - both round the same float32 values to bf16 (|D_bf16| <= (1 + u) |D|), so they multiply the same numbers;
    - each sums at most n products per output (n: every adapter's entries in the row, plus one addition per adapter)
      and rounds the delta term once: within gamma_{n+1} (1 + u) |x| |D|^T of the exact product in any order and
      accumulation dtype (gamma_k = k u / (1 - k u), Higham's bound);
    - each rounds its output once: within u / (1 - u) |y| of the unrounded sum."""
    u = 2.0**-8
    abs_delta = sum(_abs_linear_delta(layer, a) for a in adapters)
    n = int((abs_delta != 0).sum(1).max()) + len(adapters) + 1
    gamma = n * u / (1 - n * u)
    scale = (x.double().abs().reshape(-1, x.shape[-1]) @ abs_delta.T).reshape(*x.shape[:-1], -1)
    return u / (1 - u) * (y_a.abs() + y_b.abs()) + 2 * gamma * (1 + u) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gradient_free_sparse_path_equals_the_training_forward(kind, tokens, dtype):
    """Generation and evaluation run each layer's O(k) CSR path; it computes what the training forward computes.

    float32: the whole model's logits within 1e-5. bf16: the two paths round at different places, and every later
    layer amplifies a difference of rounding, so whole-model logits would need a tolerance fitted to this model (one
    bf16 step of the largest logit was 0.6-0.93 used here); each layer is compared on the same input instead, within
    the bound of its own roundings (`_per_layer_rounding_bound`), which holds on every CPU and every kernel."""
    model = make_model(kind, dtype=dtype)
    peft_model = get_peft_model(model, SparseDeltaConfig(mask_init="random", mask_density=0.1, init_weights=False))
    peft_model.add_adapter("b", SparseDeltaConfig(mask_init="near_zero", mask_density=0.05, init_weights=False))
    peft_model.base_model.set_adapter(["default", "b"])  # two active adapters: their deltas add
    for name, param in peft_model.named_parameters():  # values that need gradients take the training path
        param.requires_grad_("sparse_delta_values" in name)
    training = peft_model(tokens).logits.float()
    with torch.no_grad():
        sparse = peft_model(tokens).logits.float()
        with peft_model.disable_adapter():
            base = peft_model(tokens).logits.float()
    assert (training - base).abs().max() > 1e-3, "the adapters change the output"
    if dtype == torch.float32:
        torch.testing.assert_close(sparse, training, rtol=0, atol=1e-5)
        return
    layers = _delta_layers(peft_model)
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda _, args, name=name: inputs.setdefault(name, args[0].detach()))
             for name, layer in layers.items()]
    with torch.no_grad():
        peft_model(tokens)
    for hook in hooks:
        hook.remove()
    for name, layer in layers.items():
        x = inputs[name]
        with torch.no_grad():
            gradient_free = layer(x).double()
            base_only = layer.base_layer(x).double()
        training_path = layer(x).detach().double()
        bound = _bf16_paths_bound(layer, x, ["default", "b"], gradient_free, training_path)
        excess = float(((gradient_free - training_path).abs() - bound).max())
        assert excess <= 0, f"{name}: the paths differ beyond their roundings by {excess:.3g}"
        # the bound is tight enough to see the delta: a path that dropped or misplaced it would fail
        assert float(((training_path - base_only).abs() - bound).max()) > 0, f"{name}: the delta hides in the bound"


def test_the_gradient_free_path_follows_in_place_optimizer_updates(tokens):
    """After an in-place optimizer step, the gradient-free path computes with the new values: bit for bit what a fresh
    copy of the model holding those values computes on the same path (so no cached state went stale)."""
    model = get_peft_model(make_model("llama", dtype=torch.bfloat16),
                           SparseDeltaConfig(mask_init="random", mask_density=0.1, init_weights=False))
    fresh = copy.deepcopy(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=True)
    with torch.no_grad():
        before = model(tokens).logits.float()
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()  # in place, without bumping a version counter the path could have cached on
    with torch.no_grad():
        after = model(tokens).logits.float()
        for (name, param), (fresh_name, fresh_param) in zip(model.named_parameters(), fresh.named_parameters()):
            assert name == fresh_name
            fresh_param.copy_(param)
        expected = fresh(tokens).logits.float()
    assert (after - before).abs().max() > 1e-3
    assert torch.equal(after, expected), "the gradient-free path used values from before the optimizer step"
