"""SparseDelta behaves like the PEFT methods a user knows: a matrix over configs and models of PEFT's conventions."""

from __future__ import annotations

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import HfArgumentParser

from sparse_opd import SparseDeltaConfig, adapter_mask
from sparse_opd.masks import random_mask
from tests.helpers.tiny_models import make_model

CONFIGS = {
    "default": {},
    "target_modules": dict(target_modules=["up_proj", "c_fc"]),
    "random": dict(mask_init="random", mask_density=0.05, mask_seed=3),
    "near_zero_uniform": dict(mask_init="near_zero", mask_density=0.02, mask_block_weights="uniform"),
    "mask": None,  # a SparseMask built from the model
}


def _config(name, model, **extra):
    if name == "mask":
        return SparseDeltaConfig(mask=random_mask(model, density=0.05), **extra)
    kwargs = dict(CONFIGS[name])
    if name == "target_modules" and not any(n.endswith("c_fc") for n, _ in model.named_modules()):
        kwargs["target_modules"] = ["up_proj"]
    if name == "target_modules" and not any(n.endswith("up_proj") for n, _ in model.named_modules()):
        kwargs["target_modules"] = ["c_fc"]
    return SparseDeltaConfig(**kwargs, **extra)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_config_constructs_round_trips_and_adapts(kind, config_name, tokens):
    model = make_model(kind)
    config = _config(config_name, model, init_weights=False)
    if config.mask is None:  # a mask is not JSON: it travels in the adapter weights
        assert SparseDeltaConfig(**{k: v for k, v in config.to_dict().items() if k != "peft_type"}).to_dict() == \
            config.to_dict()
    peft_model = get_peft_model(model, config)
    assert adapter_mask(peft_model).count() == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert torch.isfinite(peft_model(tokens).logits).all()
    for module in peft_model.modules():  # PEFT's layers expose the linear sizes
        if isinstance(module, BaseTunerLayer):
            out_features, in_features = module.out_features, module.in_features
            assert module(torch.randn(2, in_features)).shape == (2, out_features)


def test_default_config_is_the_ffn_weighted_near_zero_prior_at_one_percent():
    config = SparseDeltaConfig()
    assert (config.mask_init, config.mask_density, config.mask_block_weights) == ("near_zero", 0.01, "ffn")
    assert type(PeftConfig.from_peft_type(peft_type="SPARSE_DELTA")) is SparseDeltaConfig


def test_hf_argument_parser_builds_the_config_from_flags():
    parser = HfArgumentParser(SparseDeltaConfig)
    (default,) = parser.parse_args_into_dataclasses(args=[])
    assert default.mask_init == "near_zero"
    (config,) = parser.parse_args_into_dataclasses(args=[
        "--mask_init", "random", "--mask_density", "0.05", "--mask_block_weights", '{"ffn": 2.0}',
        "--target_modules", "up_proj", "--value_dtype", "bfloat16", "--mask_seed", "7",
    ])
    assert (config.mask_init, config.mask_density, config.mask_seed) == ("random", 0.05, 7)
    assert config.mask_block_weights == {"ffn": 2.0} and config.value_dtype == "bfloat16"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_is_honoured_everywhere(tmp_path, dtype, autocast):
    expected = torch.float32 if autocast else dtype
    model = make_model("llama", dtype=dtype)

    def value_dtypes(m, adapter):
        return {p.dtype for n, p in m.named_parameters() if f"sparse_delta_values.{adapter}" in n}

    peft_model = get_peft_model(model, SparseDeltaConfig(init_weights=False), autocast_adapter_dtype=autocast)
    assert value_dtypes(peft_model, "default") == {expected}
    peft_model.add_adapter("other", SparseDeltaConfig(mask_init="random"), autocast_adapter_dtype=autocast)
    assert value_dtypes(peft_model, "other") == {expected}
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("llama", dtype=dtype), tmp_path, autocast_adapter_dtype=autocast)
    assert value_dtypes(loaded, "default") == {expected}
    loaded.load_adapter(tmp_path, adapter_name="again", autocast_adapter_dtype=autocast)
    assert value_dtypes(loaded, "again") == {expected}
    explicit = get_peft_model(make_model("llama", dtype=dtype), SparseDeltaConfig(value_dtype="float32"),
                              autocast_adapter_dtype=False)
    assert value_dtypes(explicit, "default") == {torch.float32}, "an explicit value_dtype always wins"


def test_multiple_adapters_from_every_kind_of_mask(tokens):
    model = make_model("llama")
    mask = random_mask(model, density=0.05, seed=1)
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=mask, init_weights=False))
    peft_model.add_adapter("prior", SparseDeltaConfig(mask_init="near_zero", mask_density=0.02, init_weights=False))
    peft_model.add_adapter("random", SparseDeltaConfig(mask_init="random", mask_density=0.02, init_weights=False))
    peft_model.add_adapter("dict", SparseDeltaConfig(mask={"model.layers.0.mlp.up_proj": torch.tensor([1, 5, 9])},
                                                     init_weights=False))
    outputs = {}
    for name in ("default", "prior", "random", "dict"):
        peft_model.set_adapter(name)
        outputs[name] = peft_model(tokens).logits
    assert len({round(float(o.sum()), 4) for o in outputs.values()}) == 4, "each adapter changes the output its way"
    with peft_model.disable_adapter():
        base = peft_model(tokens).logits
    peft_model.delete_adapter("random")
    assert "random" not in peft_model.peft_config
    assert not torch.equal(base, outputs["default"])


def test_saving_never_adds_embedding_layers_to_a_sparse_delta_adapter(tmp_path, monkeypatch):
    """PEFT's save_embedding_layers="auto" adds the embeddings when the base's Hub config reports another vocabulary
    size (a resized model); a sparse-delta adapter holds none, so the save asks PEFT for none."""
    import peft.peft_model

    model = get_peft_model(make_model("llama"), SparseDeltaConfig(mask_init="random", mask_density=0.05))
    seen = {}
    original = peft.peft_model.get_peft_model_state_dict

    def spy(*args, **kwargs):
        seen["save_embedding_layers"] = kwargs.get("save_embedding_layers")
        return original(*args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "get_peft_model_state_dict", spy)
    model.save_pretrained(tmp_path / "a")
    assert seen["save_embedding_layers"] is False
    with pytest.raises(ValueError, match="holds no embedding layers.*modules_to_save"):
        model.save_pretrained(tmp_path / "b", save_embedding_layers=True)
