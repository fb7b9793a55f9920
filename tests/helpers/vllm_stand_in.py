"""A stand-in for a vLLM server behind TRL's own `VLLMGeneration` (server mode), for CPU tests of the vLLM path.

`StandInVLLMGeneration` is TRL's `VLLMGeneration` with one method replaced: `_init_vllm` connects the main process to
a `StandInVLLMServer` instead of a `trl vllm-serve` process. Everything else is TRL's: prompts gathered from every
rank, generation on the main process, completions broadcast and sliced per rank, weight syncs (or the sparse-delta
sync the trainer installs), and the sampled tokens' log-probabilities with `logprobs=0`.

The server answers the calls TRL's `VLLMClient` makes (`update_named_params`, `reset_prefix_cache`, `generate`) from
its own plain transformers model: it loads the named tensors it is sent, and samples one prompt at a time (no padding,
as vLLM) returning vLLM's "processed" log-probabilities, `log_softmax(logits / temperature)` of each sampled token.

    import trl.trainer.distillation_trainer as distillation
    monkeypatch.setattr(distillation, "is_vllm_available", lambda: True)
    monkeypatch.setattr(distillation, "VLLMGeneration", stand_in_generation(server_model_path))
"""

from __future__ import annotations

import torch
from trl.generation.vllm_generation import VLLMGeneration


class StandInVLLMServer:
    """What `trl vllm-serve` does for a trainer, on a plain transformers model (which starts with stale weights when
    loaded from another checkpoint: only a sync makes it sample the student)."""

    def __init__(self, model):
        self.model = model.eval()
        self.synced: list[set[str]] = []  # names received per sync

    def update_named_params(self, metadata, named_params) -> None:
        received = dict(named_params)
        expected = {name: (dtype, list(shape)) for name, dtype, shape in metadata}
        state = self.model.state_dict()
        assert set(received) == set(expected), sorted(set(received) ^ set(expected))
        for name, tensor in received.items():
            assert [str(tensor.dtype).removeprefix("torch."), list(tensor.shape)] == list(expected[name]), name
            assert state[name].shape == tensor.shape, name
            state[name].copy_(tensor)
        self.synced.append(set(received))

    def reset_prefix_cache(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts, features=None, n=1, temperature=1.0, max_tokens=16, logprobs=None, **sampling):
        assert n == 1 and features is None
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "logprob_token_ids": []}
        for prompt in prompts:
            ids = torch.tensor([prompt], device=self.model.device)
            result = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature, top_k=0,
                top_p=1.0, max_new_tokens=max_tokens, return_dict_in_generate=True, output_logits=True,
                synced_gpus=False,  # the server is one process, whatever the trainer runs under
            )
            tokens = result.sequences[0, len(prompt):].tolist()
            steps = [torch.log_softmax(logits[0].float() / temperature, dim=-1) for logits in result.logits]
            cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))  # up to the first EOS
            tokens = tokens[:cut]
            out["prompt_ids"].append(list(prompt))
            out["completion_ids"].append(tokens)
            out["logprobs"].append(
                [[float(step[t])] for step, t in zip(steps, tokens)] if logprobs is not None else None)
            out["logprob_token_ids"].append([[t] for t in tokens])
        if logprobs is None:
            out["logprobs"] = out["logprob_token_ids"] = None
        return out


def stand_in_generation(server_model_loader):
    """A `VLLMGeneration` subclass whose main process talks to a `StandInVLLMServer` over the model that
    ``server_model_loader()`` returns (called on the main process only)."""

    class StandInVLLMGeneration(VLLMGeneration):
        server: StandInVLLMServer | None = None

        def _init_vllm(self):
            if self.mode != "server":
                raise ValueError("the stand-in serves vllm_mode='server' only")
            if self.accelerator.is_main_process:
                self.vllm_client = StandInVLLMServer(server_model_loader())
                type(self).server = self.vllm_client
            self.accelerator.wait_for_everyone()

    return StandInVLLMGeneration
