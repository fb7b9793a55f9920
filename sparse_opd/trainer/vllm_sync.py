"""Weight sync to vLLM for a sparse-delta student: composed out of place, and only what changed.

TRL syncs a PEFT student into vLLM by merging the adapter in place, reading every parameter of the model and
unmerging, at every sync. For a sparse delta that is wrong twice over: on a bf16 base `bf16(bf16(W + d) - d)` is not
`W`, so the base would drift a little every sync; and every frozen parameter (embeddings, norms, the head, every
weight outside the mask) is sent again although it never changes.

`SparseDeltaVLLMSync` replaces `VLLMGeneration.sync_weights`: each adapted weight is composed once out of place
(`compose_merged_weight`: the trained entries added and rounded once, the base never written), the first sync sends
the whole model, and every later sync sends only the adapted weights. It works with TRL's own server
(`trl vllm-serve`, named dense tensors over NCCL) and with colocated vLLM. `sync_bytes` records what each sync sent.

A server that can apply coordinates (an engine hook that scatters values into its copy of a weight) needs even less:
`sparse_payload` gives, per adapted weight, the merged values at the trained coordinates (the coordinates themselves
once), and `SparseDeltaReceiver` is that server side, which rebuilds the dense weights to load. vLLM's stock servers
load named dense tensors only, so the trainer uses the dense-but-changed-only sync with them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..distributed import full_shape, gathered
from ..tuner import SparseDeltaLayer, compose_merged_weight, iter_merged_named_weights, sparse_delta_layers
from ..tuner.functional import merged_entries


def _adapted_names(model: nn.Module) -> set[str]:
    return {f"{name}.base_layer.weight" for name, m in model.named_modules() if isinstance(m, SparseDeltaLayer)}


class SparseDeltaVLLMSync:
    """The replacement of `VLLMGeneration.sync_weights` (see the module docstring)."""

    def __init__(self, vllm_generation, model: nn.Module):
        self.vllm, self.model = vllm_generation, model
        self.sync_bytes: list[int] = []
        self._sent_everything = False

    def _named_tensors(self, changed_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
        adapted = _adapted_names(self.model)
        only = {n for n, _ in self.model.named_parameters() if n in adapted} if changed_only else None
        sent = 0
        for name, tensor in iter_merged_named_weights(self.model, rename=self.vllm._fix_param_name_to_vllm,
                                                      only=only):
            sent += tensor.numel() * tensor.element_size()
            yield name, tensor
        self.sync_bytes.append(sent)

    def _metadata(self, changed_only: bool) -> list[tuple[str, str, list[int]]]:
        adapted = _adapted_names(self.model)
        out = []
        for name, param in self.model.named_parameters():
            if "sparse_delta_" in name or (changed_only and name not in adapted):
                continue
            plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
            plain = self.vllm._fix_param_name_to_vllm(plain)
            out.append((plain, str(param.dtype).removeprefix("torch."), list(full_shape(param))))
        return out

    def __call__(self) -> None:
        vllm = self.vllm
        if vllm.mode == "colocate" and vllm.enable_sleep_mode:
            vllm.llm.wake_up(tags=["weights"])
            vllm._llm_weights_sleeping = False
        changed_only = self._sent_everything
        if vllm.mode == "server":
            if vllm.accelerator.is_main_process:
                vllm.vllm_client.update_named_params(self._metadata(changed_only), self._named_tensors(changed_only))
                vllm.vllm_client.reset_prefix_cache()
            else:
                for _ in self._named_tensors(changed_only):  # take part in the gather collectives
                    pass
        else:
            engine_model = vllm.llm.llm_engine.model_executor.driver_worker.model_runner.model
            for name, tensor in self._named_tensors(changed_only):
                engine_model.load_weights([(name, tensor)])
            vllm.llm.reset_prefix_cache()
        self._sent_everything = True


def install_vllm_sync(vllm_generation, model: nn.Module) -> SparseDeltaVLLMSync:
    """Make TRL's `VLLMGeneration` sync a sparse-delta student with `SparseDeltaVLLMSync` (any distribution: sharded
    weights are gathered one at a time); returns it, so its `sync_bytes` can be read."""
    sync = SparseDeltaVLLMSync(vllm_generation, model)
    vllm_generation.sync_weights = sync
    return sync


@torch.no_grad()
def sparse_payload(model: nn.Module, adapter_name: str = "default", with_indices: bool = True) -> dict:
    """Per adapted weight (plain name): ``{"values": merged W + delta at the trained coordinates, in the base dtype}``
    and, with ``with_indices`` (the first sync), ``"indices"`` (int64 flat indices, fixed for the adapter's life)."""
    payload = {}
    for name, layer in sparse_delta_layers(model, adapter_name).items():
        weight = layer.get_base_layer().weight
        indices = layer.sparse_delta_indices[adapter_name]
        with gathered([weight, layer.sparse_delta_values[adapter_name]]) as (full, values):
            merged = merged_entries(full.detach().reshape(-1)[indices.to(full.device)], values.detach())
        entry = {"values": merged.cpu()}
        if with_indices:
            entry["indices"] = indices.cpu()
        payload[name.removeprefix("base_model.model.") + ".weight"] = entry
    return payload


class SparseDeltaReceiver:
    """Server side of `sparse_payload`: keeps the base of every adapted weight (from the first, dense sync) and the
    coordinates, and turns a values-only payload into the dense weights an engine's ``load_weights`` takes."""

    def __init__(self, base_weights: dict[str, torch.Tensor]):
        self.base = {name: tensor.detach().clone() for name, tensor in base_weights.items()}
        self.indices: dict[str, torch.Tensor] = {}

    def apply(self, payload: dict) -> dict[str, torch.Tensor]:
        out = {}
        for name, entry in payload.items():
            if "indices" in entry:
                self.indices[name] = entry["indices"]
            if name not in self.base or name not in self.indices:
                raise ValueError(f"{name}: the receiver has no base weight or coordinates for it (send them first)")
            weight = self.base[name].clone()
            weight.view(-1)[self.indices[name].to(weight.device)] = entry["values"].to(weight)
            out[name] = weight
        return out


def payload_bytes(payload: dict) -> int:
    return sum(t.numel() * t.element_size() for entry in payload.values() for t in entry.values())


__all__ = ["SparseDeltaReceiver", "SparseDeltaVLLMSync", "compose_merged_weight", "install_vllm_sync",
           "payload_bytes", "sparse_payload"]
