"""Mask strategies of `SparseOPDConfig`: build the `SparseDeltaConfig` a sparse OPD run trains, from a mask file,
a checkpoint diff, a short dense probe, or a prior."""

from __future__ import annotations

import copy
import tempfile

import torch

from ..masks import ProbeCallback, SparseMask, near_zero_mask, random_mask
from ..tuner import SparseDeltaConfig


def peft_config_from_strategy(model, teacher_model, args, train_dataset, processing_class):
    strategy = args.mask_strategy
    target = args.mask_target_modules
    if strategy == "file":
        return SparseDeltaConfig(mask=SparseMask.load(args.mask_path))
    if strategy == "near_zero":
        return SparseDeltaConfig(
            mask=near_zero_mask(
                model, density=args.mask_density, block_weights=args.mask_block_weights, target_modules=target
            )
        )
    if strategy == "random":
        return SparseDeltaConfig(
            mask=random_mask(
                model,
                density=args.mask_density,
                block_weights=args.mask_block_weights,
                target_modules=target,
                seed=args.mask_seed,
            )
        )
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
        return SparseDeltaConfig(mask=probe_mask(model, teacher_model, args, train_dataset, processing_class))
    raise ValueError(f"unknown mask_strategy {strategy!r}")


def probe_mask(model, teacher_model, args, train_dataset, processing_class) -> SparseMask:
    """Run `mask_probe_steps` dense OPD steps with a `ProbeCallback`, take its mask, restore the weights."""
    from .opd_trainer import OPDTrainer

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    probe = ProbeCallback(statistic=args.mask_probe_statistic, target_modules=args.mask_target_modules)
    with tempfile.TemporaryDirectory(prefix="sparse-opd-probe-") as tmp:
        probe_args = copy.deepcopy(args)
        for key, value in {
            "output_dir": tmp,
            "max_steps": args.mask_probe_steps,
            "learning_rate": args.mask_probe_learning_rate,
            "save_strategy": "no",
            "eval_strategy": "no",
            "report_to": [],
            "push_to_hub": False,
            "logging_steps": args.mask_probe_steps,
            "mask_strategy": None,
            "log_weight_stats": False,
        }.items():
            setattr(probe_args, key, value)
        OPDTrainer(
            model=model,
            teacher_model=teacher_model,
            args=probe_args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            callbacks=[probe],
        ).train()
    mask = probe.to_mask(density=args.mask_density, block_weights=args.mask_block_weights)  # before restoring
    with torch.no_grad():
        model.load_state_dict(saved)
    for param in model.parameters():
        param.grad = None
    return mask
