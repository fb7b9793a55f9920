"""The job's device and models: the student (TRL's `ModelConfig` plus `--model_init_kwargs`), its tokenizer, and a
separate teacher (`--teacher_model_*`) when there is one, loaded the way TRL's distillation script loads them."""

from __future__ import annotations

import os

from .arguments import Arguments


def describe_device(args: Arguments) -> str:
    """Where the job runs and why, in one line (printed before anything loads)."""
    import torch

    config = args.training
    device = config.device
    where = "cpu" if device.type == "cpu" else str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    if args.preset_from_machine:
        reason = (f"the `{args.preset}` preset: " +
                  ("an accelerator is present" if args.preset == "gpu" else "no accelerator found"))
    else:
        reason = f"--config {args.preset}"
    if device.type == "cpu" and config.use_cpu:
        from .arguments import accelerator_available

        if accelerator_available():
            reason += "; use_cpu keeps it off the accelerator that is present"
    return f"device: {where} ({reason})"


def share_cpu_threads(config) -> None:
    """On a CPU, share the cores out between the processes (`accelerate launch` pins each to one thread)."""
    import torch

    if config.device.type != "cpu":
        return
    processes = config.world_size
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // processes))


def _torch_dtype(value):
    import torch

    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value), None)
    if isinstance(dtype, torch.dtype):
        return dtype
    raise ValueError(f"dtype {value!r} is not a torch dtype name; use float32, bfloat16, float16 or auto")


def student_init_kwargs(args: Arguments) -> dict:
    """`from_pretrained` keyword arguments of the student: `ModelConfig`'s revision, dtype, attention implementation
    and quantization, `trust_remote_code`, then `--model_init_kwargs` over them (as in TRL's scripts)."""
    from trl import get_quantization_config

    model, config = args.model, args.training
    kwargs = {"revision": model.model_revision, "dtype": model.dtype, "trust_remote_code": config.trust_remote_code,
              "attn_implementation": model.attn_implementation}
    quantization = get_quantization_config(model)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": str(config.device)})
    kwargs.update(config.model_init_kwargs or {})
    kwargs["dtype"] = _torch_dtype(kwargs.get("dtype"))
    return kwargs


def teacher_init_kwargs(args: Arguments) -> dict:
    """`from_pretrained` keyword arguments of a separate teacher: `--teacher_model_revision`, `ModelConfig`'s dtype and
    attention implementation, `trust_remote_code`, then `--teacher_model_init_kwargs` over them. The teacher is not
    quantized unless those say so (as in TRL's distillation script)."""
    model, config = args.model, args.training
    kwargs = {"revision": config.teacher_model_revision, "dtype": model.dtype,
              "trust_remote_code": config.trust_remote_code, "attn_implementation": model.attn_implementation}
    kwargs.update(config.teacher_model_init_kwargs or {})
    kwargs["dtype"] = _torch_dtype(kwargs.get("dtype"))
    return kwargs


def load_student(args: Arguments):
    """The student and its tokenizer (left padding), on the job's device; the embedded model is named by its
    upstream Hub checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..embedded import mark_embedded, resolve_model_path

    name = args.model.model_name_or_path
    path = resolve_model_path(name)
    kwargs = student_init_kwargs(args)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=kwargs.get("revision"), padding_side="left",
                                              trust_remote_code=args.training.trust_remote_code)
    if path != name:
        mark_embedded(model)
    if "device_map" not in kwargs:
        model.to(args.training.device)
    return model, tokenizer


def load_teacher(args: Arguments):
    """A separate teacher (`--teacher_model_name_or_path`) on the job's device, or None: the student's own base
    weights in the privileged context."""
    name = args.training.teacher_model_name_or_path
    if name is None:
        return None
    from transformers import AutoModelForCausalLM

    from ..embedded import resolve_model_path

    kwargs = teacher_init_kwargs(args)
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), **kwargs)
    if "device_map" not in kwargs:
        teacher.to(args.training.device)
    return teacher
