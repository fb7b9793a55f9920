"""bitsandbytes 8-bit and 4-bit base layers (on the CPU): delta on top of the quantized forward, no merge.

Shapes are realistic for bitsandbytes' CPU kernels (in_features a multiple of 64). On CPUs with AVX512-BF16 a 4-bit
layer evaluated without gradients repacks its weight for an inference kernel without a backward; both CPU paths are
tested (the packed one where the CPU has it), each with an evaluation pass before training.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from sparse_opd import SparseDeltaConfig
from sparse_opd.masks import random_mask
from sparse_opd.tuner.bnb import QuantizedLinear

bnb = pytest.importorskip("bitsandbytes")

QUANT = {
    "8bit": dict(load_in_8bit=True),
    "4bit": dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
}
CASES = [("8bit", "plain"), ("4bit", "plain"), pytest.param("4bit", "avx512bf16", marks=pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(),
    reason="this CPU has no AVX512-BF16, so bitsandbytes never packs 4-bit weights"))]


def _model(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    _model().save_pretrained(path)
    return path


@pytest.fixture
def tokens():
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def _quantized(base_dir, bits, cpu_path="plain"):
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=BitsAndBytesConfig(**QUANT[bits]), device_map="cpu"
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = cpu_path == "avx512bf16"
    return model


def _dequantized_copy(quantized, base_dir):
    """A plain float32 model whose linear weights are the quantized model's, dequantized: the exact reference."""
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for name, module in quantized.named_modules():
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            scale = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
            weight = module.weight.data.float() * scale.float()[:, None] / 127
        else:
            continue
        reference.get_submodule(name).weight.data.copy_(weight.reshape(reference.get_submodule(name).weight.shape))
    return reference


@pytest.mark.parametrize("bits, cpu_path", CASES)
def test_quantized_layer_trains_like_its_dequantized_reference_after_an_eval_pass(base_dir, tokens, bits, cpu_path):
    mask = random_mask(_model(), density=0.1)
    quantized = _quantized(base_dir, bits, cpu_path)
    if cpu_path == "avx512bf16":
        with torch.no_grad():  # evaluated before the adapter is added: bitsandbytes packs its 4-bit weights
            quantized(tokens)
        assert quantized.model.layers[0].mlp.up_proj.weight.quant_state.packing_format_for_cpu
    peft_model = get_peft_model(quantized, SparseDeltaConfig(mask=mask, init_weights=False))
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantizedLinear) and layer.sparse_delta_values["default"].dtype == torch.float32
    with torch.no_grad():  # an evaluation pass (on AVX512-BF16 CPUs this repacks 4-bit weights)
        x = torch.randn(3, layer.in_features)
        expected = layer.base_layer(x) + F.linear(x, layer.get_delta_weight("default"))
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
        peft_model(tokens)
    peft_model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model(tokens, labels=tokens).loss.backward()
    assert not [w for w in caught if "autograd kernel" in str(w.message)], "backward ran through an inference kernel"
    for module in peft_model.modules():  # wrapped layers are never (left) packed for the inference-only kernel
        assert not getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu",
                           False)
    reference = get_peft_model(_dequantized_copy(peft_model, base_dir), SparseDeltaConfig(mask=mask,
                                                                                          init_weights=False))
    reference(tokens, labels=tokens).loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=2e-3, atol=2e-5, msg=name)
    with pytest.raises(ValueError, match="cannot merge a sparse delta into the quantized layer"):
        peft_model.merge_adapter()


def test_adapter_trained_on_full_precision_loads_onto_a_4bit_base(base_dir, tokens, tmp_path):
    full = _model()
    peft_model = get_peft_model(full, SparseDeltaConfig(mask=random_mask(full, density=0.1), init_weights=False))
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_quantized(base_dir, "4bit"), tmp_path)
    layer = loaded.base_model.model.model.layers[1].mlp.down_proj
    source = peft_model.base_model.model.model.layers[1].mlp.down_proj
    assert torch.equal(layer.sparse_delta_indices["default"], source.sparse_delta_indices["default"])
    assert torch.equal(layer.sparse_delta_values["default"], source.sparse_delta_values["default"])
    assert torch.isfinite(loaded(tokens).logits).all()
