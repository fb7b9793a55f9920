"""Mask strategies of `SparseOPDConfig`: build the `SparseDeltaConfig` a sparse OPD run trains, from gradient
discovery (`discovery.py`), a mask file, a checkpoint diff, the AdamW probe (`probe.py`), or a prior."""

from __future__ import annotations

from accelerate.utils import DistributedType

from ..masks import SparseMask
from ..tuner import SparseDeltaConfig


def sharded_launch(args) -> str | None:
    """"FSDP" or "DeepSpeed" when this run shards the model (by its arguments or accelerate's launch), else None."""
    import os

    truthy = ("1", "true", "yes")
    if args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in truthy:
        return "DeepSpeed"
    if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in truthy:
        return "FSDP"
    kind = args.distributed_state.distributed_type
    return {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}.get(kind)


def check_strategy(args, train_dataset) -> None:
    """Refuse, before any model is loaded or rollout generated, a strategy that cannot run as configured."""
    if args.mask_strategy == "probe" and (sharding := sharded_launch(args)):
        raise ValueError(
            f"mask_strategy='probe' trains every weight densely with AdamW, which {sharding} cannot undo afterwards "
            "(it shards the model it prepares). Run the probe once without sharding with --mask_save_path "
            "probe.safetensors and train here with --mask_strategy file --mask_path probe.safetensors, or use "
            "mask_strategy='near_zero' (no discovery; second to the probe at 1% in docs/masks.md) or "
            "mask_strategy='gradient' (discovery that shards with the model; no better than random coordinates at 1% "
            "there)"
        )
    if args.mask_strategy in ("gradient", "probe") and train_dataset is not None:
        try:
            rows = len(train_dataset)
        except TypeError:  # an iterable dataset: its length is unknown until read
            rows = None
        if rows == 0:
            raise ValueError(f"mask_strategy={args.mask_strategy!r} scores rollouts of the training prompts, but the "
                             "training dataset is empty")


def gradient_placeholder(model, args) -> SparseMask:
    """The adapter `"gradient"` discovery starts from: the budget's count per module, on provisional coordinates."""
    from ..masks.budget import allocate_budget
    from ..masks.targets import linear_modules, stored_shape
    from .discovery import provisional_indices

    modules = linear_modules(model, args.mask_target_modules)
    if not modules:
        raise ValueError(f"mask_target_modules={args.mask_target_modules!r} matches no linear layer of the student")
    shapes = {name: tuple(stored_shape(module)) for name, module in modules.items()}
    counts = allocate_budget(shapes, density=args.mask_density, block_weights=args.mask_block_weights)
    return SparseMask(provisional_indices(counts, shapes), shapes)


def peft_config_from_strategy(model, teacher_model, args, train_dataset, processing_class):
    strategy = args.mask_strategy
    target = args.mask_target_modules
    if strategy == "gradient":
        return SparseDeltaConfig(mask=gradient_placeholder(model, args))
    if strategy == "file":
        return SparseDeltaConfig(mask=SparseMask.load(args.mask_path))
    if strategy in ("near_zero", "random"):  # the tuner draws the prior when the adapter is injected
        return SparseDeltaConfig(mask_init=strategy, mask_density=args.mask_density,
                                 mask_block_weights=args.mask_block_weights, mask_seed=args.mask_seed,
                                 target_modules=target)
    if strategy == "diff":
        mask = SparseMask.from_diff(
            args.mask_diff_base, args.mask_diff_tuned, threshold=args.mask_diff_threshold, target_modules=target
        )
        if not mask.modules():
            raise ValueError(
                f"{args.mask_diff_tuned} does not differ from {args.mask_diff_base} by more than "
                f"{args.mask_diff_threshold} anywhere in the targeted modules; lower mask_diff_threshold or check "
                "the checkpoints"
            )
        return SparseDeltaConfig(mask=mask)
    if strategy == "probe":
        from .probe import probe_mask

        return SparseDeltaConfig(mask=probe_mask(model, teacher_model, args, train_dataset, processing_class))
    raise ValueError(f"unknown mask_strategy {strategy!r}")
