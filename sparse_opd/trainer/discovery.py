"""Gradient discovery: the coordinates a sparse OPD run trains, found from the run's own first rollout batches.

`mask_strategy="gradient"` builds the sparse-delta adapter with the budget's exact coordinate count per module on
provisional coordinates (values zero: the policy is the base). When training starts, after accelerate has wrapped
the model for DDP / FSDP2 / ZeRO-3, `GradientDiscovery` scores `mask_gradient_steps` generation batches before any
optimizer step: rollouts from the student, the teacher's scores, the OPD loss, and a backward that shows each adapted
layer's weight gradient, one row block at a time, to `GradientStatistics` (two float32 accumulators per coordinate,
summed and sharded over the ranks: 8 bytes per adapted entry divided by the number of ranks; no gradient of the whole
model, no optimizer state, no copy of the weights). The top coordinates per module (`top_k_indices`, the same budget)
then replace the provisional ones in place, and training begins on them with a fresh optimizer.

During discovery the adapter's values do not require gradients and the input embeddings' output does: backward runs
through every layer (also under reentrant activation checkpointing, which TRL uses with DeepSpeed ZeRO-3), no
parameter gradient is accumulated and no DDP / FSDP / DeepSpeed gradient hook fires, so discovery leaves the training
state as it found it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from transformers import TrainerCallback

from ..masks.gradient_stats import GradientStatistics
from ..masks.sparse_mask import SparseMask, normalize_module_name
from ..masks.top_k import top_k_indices
from ..tuner import sparse_delta_layers
from ..tuner.functional import rows_per_block

logger = logging.getLogger(__name__)


def provisional_indices(counts: dict[str, int], shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Evenly spaced coordinates, ``counts[name]`` per module: where the adapter sits until discovery moves it."""
    return {name: torch.arange(k, dtype=torch.long) * (math.prod(shapes[name]) // k) for name, k in counts.items()}


@contextlib.contextmanager
def _embedding_leaves(model):
    """Make the input embeddings' output of every forward with gradients a leaf that requires grad (collected)."""
    leaves: list[torch.Tensor] = []

    def hook(module, args, output):
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)):
            return None
        if not output.requires_grad:  # (PEFT's enable_input_require_grads may have made it require grad already)
            output = output.detach().requires_grad_()
        leaves.append(output)
        return output

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield leaves
    finally:
        handle.remove()


@contextlib.contextmanager
def _frozen(params):
    """Values that require no gradient for the duration of one forward and backward. Not for the whole discovery:
    FSDP2 sets its mixed-precision dtypes up at the first forward (a generation) from the trainable parameters."""
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in params:
            param.requires_grad_(True)


class GradientDiscovery(TrainerCallback):
    """Runs discovery at the start of `train()` (skipped when resuming: the checkpoint holds the coordinates).

    After it ran, `report` holds what it did: batches, micro-batches, tokens scored, seconds, statistic, accumulator
    bytes per adapted entry on this rank.
    """

    def __init__(self, trainer, steps: int, statistic: str):
        self.trainer = trainer
        self.steps = steps
        self.statistic = statistic
        self.done = False
        self.report: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.done:
            return
        self.done = True
        if state.global_step > 0:
            return
        # A dataloader of its own, with the training sampler's order: discovery scores the prompts of the first
        # training steps and leaves the training loop's iteration as it is (a resumed run sees the same batches).
        self.run(self.trainer.get_train_dataloader())

    def _group(self):
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        return torch.distributed.new_group()  # its own communicator, beside the engines' collectives

    def collect(self, dataloader, group=None, statistics=None) -> tuple[GradientStatistics, int, int]:
        """Score `steps` generation batches of ``dataloader``: the statistics (the accumulators of ``statistics``,
        default the discovery's own), completion tokens scored (this rank) and micro-batches."""
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        layers = {normalize_module_name(n): m for n, m in sparse_delta_layers(model, trainer.adapter_name).items()}
        adapter = trainer.adapter_name
        block_rows = {n: rows_per_block(layer.weight_shape, layer.delta_specs[adapter].block_elements)
                      for n, layer in layers.items()}
        device = next(iter(layers.values())).sparse_delta_indices[adapter].device
        stats = GradientStatistics({n: layer.weight_shape for n, layer in layers.items()}, group=group,
                                   statistics=statistics or (self.statistic,), block_rows=block_rows, device=device)
        tokens_seen = trainer.state.num_input_tokens_seen
        values = [p for layer in layers.values() for p in layer.sparse_delta_values.parameters() if p.requires_grad]
        for name, layer in layers.items():
            layer.set_weight_grad_observer(stats.observer(name))
        try:
            tokens, micro_batches = self._score(model, dataloader, values)
        finally:
            for layer in layers.values():
                layer.set_weight_grad_observer(None)
            trainer._metrics["train"].clear()  # discovery's rollouts are not the first training step's
            trainer.state.num_input_tokens_seen = tokens_seen
        return stats, tokens, micro_batches

    def run(self, dataloader) -> None:
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        adapter = trainer.adapter_name
        layers = {normalize_module_name(n): m for n, m in sparse_delta_layers(model, adapter).items()}
        shapes = {n: layer.weight_shape for n, layer in layers.items()}
        counts = {n: int(layer.sparse_delta_indices[adapter].numel()) for n, layer in layers.items()}
        group = self._group()
        started = time.perf_counter()
        stats, tokens, micro_batches = self.collect(dataloader, group)
        tokens = trainer.accelerator.reduce(torch.tensor(float(tokens), device=trainer.accelerator.device), "sum")
        if tokens.item() == 0:
            raise ValueError("gradient discovery scored no completion token: every rollout was empty; raise "
                             "max_completion_length or check the prompts")
        held = stats.accumulator_bytes()
        selected = top_k_indices(stats.scores(self.statistic, eps=trainer.args.adam_epsilon), counts, group=group)
        config = move_adapter(model, adapter, selected)
        entries = sum(math.prod(s) for s in shapes.values())
        self.report = {
            "statistic": self.statistic, "batches": self.steps, "micro_batches": micro_batches,
            "tokens": int(tokens.item()), "seconds": time.perf_counter() - started,
            "accumulator_bytes_per_entry": held / entries, "processes": trainer.accelerator.num_processes,
        }
        logger.info("gradient discovery: %s", self.report)
        if group is not None:
            torch.distributed.destroy_process_group(group)
        if trainer.args.mask_save_path and trainer.is_world_process_zero():
            config.mask.save(trainer.args.mask_save_path)

    def _score(self, model, dataloader, values) -> tuple[int, int]:
        from trl.trainer.utils import split_tensor_dict

        trainer = self.trainer
        wrapped, accumulation = trainer.model_wrapped, trainer.args.gradient_accumulation_steps
        bar = None
        if trainer.is_world_process_zero() and not trainer.args.disable_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.steps, desc="discovery", unit="batch", dynamic_ncols=True)
        tokens = micro_batches = 0
        batches = iter(dataloader)
        wrapped.train()
        with _embedding_leaves(model) as leaves:
            for _ in range(self.steps):
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = iter(dataloader)
                    batch = next(batches)
                generation = trainer._generate_and_score_completions(batch)
                for micro in split_tensor_dict(generation, accumulation):
                    tokens += int(micro["completion_mask"].sum())
                    leaves.clear()
                    with _frozen(values), trainer.accelerator.no_sync(wrapped):
                        with trainer.compute_loss_context_manager():
                            loss = trainer.compute_loss(wrapped, micro)
                        if not leaves:
                            raise RuntimeError("gradient discovery saw no input embeddings in the training forward")
                        loss.backward()  # reaches the observers; the embeddings' leaf is the only tensor given a .grad
                    micro_batches += 1
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return tokens, micro_batches


def move_adapter(model, adapter: str, indices: dict[str, torch.Tensor]):
    """Put a not-yet-trained adapter on ``indices`` (module name -> flat indices, same counts); returns its config,
    updated to describe the new coordinates."""
    layers = {normalize_module_name(n): m for n, m in sparse_delta_layers(model, adapter).items()}
    if set(layers) != set(indices):
        raise ValueError(f"the new coordinates name other modules than adapter {adapter!r} adapts")
    config = model.peft_config[adapter]
    for name, layer in layers.items():
        layer.replace_indices(adapter, indices[name], config.index_encoding)
    config.mask = SparseMask(indices, {n: layer.weight_shape for n, layer in layers.items()})
    config.module_index_bytes = {n: int(layer.sparse_delta_index_stream[adapter].numel())
                                 for n, layer in layers.items()}
    return config


def adopt_checkpoint_mask(trainer, checkpoint) -> None:
    """Resuming a `"gradient"` run: take the coordinates from the checkpoint's adapter file instead of discovering
    them again (the checkpoint's values belong to those coordinates)."""
    import os

    from safetensors.torch import load_file
    from transformers.trainer_utils import get_last_checkpoint

    from ..masks.encoding import decode_indices

    if checkpoint is True:
        checkpoint = get_last_checkpoint(trainer.args.output_dir)
        if checkpoint is None:
            raise ValueError(f"resume_from_checkpoint=True but {trainer.args.output_dir} holds no checkpoint")
    path = os.path.join(str(checkpoint), "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint} has no adapter_model.safetensors to resume the discovered mask from")
    model = trainer.accelerator.unwrap_model(trainer.model)
    layers = {normalize_module_name(n): m for n, m in sparse_delta_layers(model, trainer.adapter_name).items()}
    marker = ".sparse_delta_index_stream"
    streams = {normalize_module_name(key.split(marker)[0]): tensor for key, tensor in load_file(path).items()
               if marker in key}
    missing = sorted(set(layers) - set(streams))
    if missing:
        raise ValueError(f"{path} has no coordinates for {missing[:3]}: it is not a checkpoint of this run")
    indices = {name: decode_indices(streams[name], layer.weight_numel, name=name) for name, layer in layers.items()}
    move_adapter(model, trainer.adapter_name, indices)
    trainer.discovery.done = True
