"""Weight sync to vLLM for a sparse-delta student: merged weights composed out of place.

TRL syncs a PEFT student into vLLM by merging the adapter in place, reading the weights and unmerging. For a sparse
delta on a bf16 base that round trip is a trap: `bf16(bf16(W + d) - d)` is not `W` in general, so the base would
drift a little every sync. Here each adapted weight is copied once, the k trained entries are added in fp32 and
rounded once (`sparse_opd.tuner.compose_merged_weight`), and the copy is sent; the base weights are never written.
"""

from __future__ import annotations

from torch import nn

from ..tuner.merging import iter_merged_named_weights


def install_vllm_sync(vllm_generation, model: nn.Module) -> None:
    """Make TRL's `VLLMGeneration` send out-of-place merged weights instead of merging and unmerging in place.

    FSDP students keep TRL's own path (it walks FSDP's sharded tree); the tuner's unmerge is bit-exact there because
    it restores the saved original entries.
    """
    if vllm_generation._dist.is_fsdp:
        return

    def _iter_named_params():
        yield from iter_merged_named_weights(
            model,
            gather=lambda params: vllm_generation._dist.gather_params(params),
            rename=vllm_generation._fix_param_name_to_vllm,
        )

    vllm_generation._iter_named_params = _iter_named_params
