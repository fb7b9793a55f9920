"""bitsandbytes 8-bit and 4-bit base layers (on the CPU): delta on top of the quantized forward, no merge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from sparse_opd import SparseDeltaConfig
from sparse_opd.masks import random_mask
from sparse_opd.tuner.bnb import QuantizedLinear
from tiny_models import make_model

QUANT = {
    "8bit": dict(load_in_8bit=True),
    "4bit": dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_model("llama").save_pretrained(path)
    return path


def _quantized(base_dir, bits):
    return AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=BitsAndBytesConfig(**QUANT[bits]), device_map="cpu"
    )


@pytest.mark.parametrize("bits", list(QUANT))
def test_quantized_layer_adds_the_delta_and_trains(base_dir, tokens, bits):
    model = _quantized(base_dir, bits)
    mask = random_mask(make_model("llama"), density=0.1)
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=mask, init_weights=False))
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantizedLinear)
    x = torch.randn(3, layer.weight_shape[1])
    with torch.no_grad():
        expected = layer.base_layer(x) + F.linear(x, layer.get_delta_weight("default"))
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    peft_model(tokens, labels=tokens).loss.backward()
    assert layer.sparse_delta_values["default"].grad.abs().sum() > 0
    assert layer.sparse_delta_values["default"].dtype == torch.float32
    with pytest.raises(ValueError, match="cannot merge a sparse delta into the quantized layer"):
        peft_model.merge_adapter()


def test_adapter_trained_on_full_precision_loads_onto_a_4bit_base(base_dir, tokens, tmp_path):
    full = make_model("llama")
    peft_model = get_peft_model(full, SparseDeltaConfig(mask=random_mask(full, density=0.1), init_weights=False))
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_quantized(base_dir, "4bit"), tmp_path)
    layer = loaded.base_model.model.model.layers[1].mlp.down_proj
    source = peft_model.base_model.model.model.layers[1].mlp.down_proj
    assert torch.equal(layer.sparse_delta_indices["default"], source.sparse_delta_indices["default"])
    assert torch.equal(layer.sparse_delta_values["default"], source.sparse_delta_values["default"])
    assert torch.isfinite(loaded(tokens).logits).all()
