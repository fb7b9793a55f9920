"""One process of the trainer test matrix (tests/trainer/test_matrix.py): runs SparseOPDTrainer cells under the
launch's distribution (single process, DDP, FSDP2 or DeepSpeed ZeRO-3, gloo on the CPU) and writes what each cell
measured to `<out>/<dist>/<cell>/rank<r>.pt`; the test compares ranks and checks every property.

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/opd_matrix_worker.py OUT DIST CELL [CELL ...]

DIST is single, ddp, fsdp2 or zero3. A CELL is `dtype-teacher-mask[+variant...]` (e.g. `bf16-base-near_zero`,
`fp32-separate-file+vllm`): dtype fp32 or bf16; teacher `base` (the student's base weights with the privileged
reference solution) or `separate` (a perturbed copy, shown the plain prompt); mask `file`, `gradient` (discovery at
the start of training), `probe` or `near_zero`.
Variants: `resume` (a straight run against a resumed one), `vllm` (rollouts from TRL's vLLM server path, the server a
stand-in that starts from the teacher's weights and samples the student only through the trainer's weight sync),
`gpt2` (the student is a GPT-2 as it ships, absolute position embeddings and 0.1 dropout, trained 4 mixed-length
prompts per micro-batch). OUT holds `student/`, `teacher/`, `gpt2/` and `mask.safetensors` made by the test. The
cells run on the CPU; with `OPD_MATRIX_DEVICE=cuda` (benchmarks/gpu_check.py) a single-process cell runs on the GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.helpers
warnings.simplefilter("ignore")

ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False},
    "bf16": {"enabled": "auto"}, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_force_ds_cpu_optimizer": False,
}
FSDP2 = {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
         "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "state_dict_type": "FULL_STATE_DICT",
         "reshard_after_forward": True}
STEPS = 4


def make_args(out, dist, dtype, mask, teacher, **overrides):
    from sparse_opd.trainer import SparseOPDConfig

    fields = {
        "output_dir": out, "mask_density": 0.2, "per_device_train_batch_size": 2, "max_steps": STEPS,
        "logging_steps": 1, "max_completion_length": 6, "learning_rate": 2e-2 if teacher == "separate" else 2e-3,
        "use_cpu": os.environ.get("OPD_MATRIX_DEVICE", "cpu") == "cpu", "bf16": dtype == "bf16", "report_to": "none",
        "save_strategy": "no", "seed": 0,
        "dataloader_num_workers": 0, "model_init_kwargs": {"dtype": _dtype(dtype)},
        "teacher_model_init_kwargs": {"dtype": _dtype(dtype)} if teacher == "separate" else None,
        "mask_probe_steps": 2, "mask_probe_learning_rate": 1e-3, "mask_gradient_steps": 2,
    }
    fields["mask_strategy"] = mask
    if mask == "file":
        fields["mask_path"] = os.path.join(os.path.dirname(os.path.dirname(out.rstrip("/"))), "mask.safetensors")
    if dist == "zero3":
        fields["deepspeed"] = ZERO3
    if dist == "fsdp2":
        fields.update(fsdp="full_shard", fsdp_config=FSDP2)
    fields.update(overrides)
    return SparseOPDConfig(**fields)


def _dtype(name: str) -> str:
    return "bfloat16" if name == "bf16" else "float32"


def _allow_fsdp_on_cpu(args) -> None:
    """accelerate turns an FSDP request into plain multi-CPU DDP when `use_cpu` is set (FSDP is a GPU feature to it);
    FSDP2 itself runs on the CPU under gloo, so the test restores the FSDP distributed type."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    _ = args.device
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def parse_cell(cell: str) -> tuple[str, str, str, set[str]]:
    """`dtype-teacher-mask[+variant...]` -> (dtype, teacher, mask, variants)."""
    spec, *variants = cell.split("+")
    dtype, teacher, mask = spec.split("-")
    return dtype, teacher, mask, set(variants)


def make_trainer(root: str, dist: str, cell: str, out: str, **overrides):
    from transformers import AutoTokenizer

    from sparse_opd.tasks import arithmetic_dataset
    from sparse_opd.trainer import SparseOPDTrainer

    dtype, teacher, mask, variants = parse_cell(cell)
    student = os.path.join(root, "gpt2" if "gpt2" in variants else "student")
    if "gpt2" in variants:
        if teacher != "base" or mask == "file":
            raise ValueError(f"{cell}: a GPT-2 cell has the base-weights teacher and a mask strategy, not a file")
        overrides = {"per_device_train_batch_size": 4, **overrides}  # left padding in every micro-batch
    server = None
    if "vllm" in variants:
        overrides = {"use_vllm": True, "vllm_mode": "server", **overrides}
        server = _server_model(os.path.join(root, "teacher"), dtype)  # before this cell's ZeRO-3 config
    args = make_args(out, dist, dtype, mask, teacher, **overrides)
    if dist == "fsdp2":
        _allow_fsdp_on_cpu(args)
    tokenizer = AutoTokenizer.from_pretrained(student)
    train = arithmetic_dataset("train", 32, 1)
    with _stand_in_vllm(server) if "vllm" in variants else _nothing():
        trainer = SparseOPDTrainer(
            model=student,  # by path, as TRL users pass it (ZeRO-3 builds it under zero.Init)
            teacher_model=os.path.join(root, "teacher") if teacher == "separate" else None,
            args=args, train_dataset=train, processing_class=tokenizer,
        )
    return trainer, train


@contextlib.contextmanager
def _nothing():
    yield


def _server_model(path: str, dtype: str):
    """The stand-in vLLM server's own model (main process only), a separate process's in real life."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # an earlier cell's ZeRO-3 config would build it partitioned (a collective)
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, _dtype(dtype)))


@contextlib.contextmanager
def _stand_in_vllm(server_model):
    """TRL's `VLLMGeneration` with a stand-in server (tests/helpers/vllm_stand_in.py) whose model starts from other
    weights (the teacher's): it samples the student only if the trainer's weight sync works."""
    import trl.trainer.distillation_trainer as distillation

    from tests.helpers.vllm_stand_in import stand_in_generation

    saved = distillation.is_vllm_available, distillation.VLLMGeneration
    distillation.is_vllm_available = lambda: True
    distillation.VLLMGeneration = stand_in_generation(lambda: server_model)
    try:
        yield
    finally:
        distillation.is_vllm_available, distillation.VLLMGeneration = saved


def run_resume(root: str, dist: str, cell: str) -> dict:
    """A straight run saving at step 2, then a fresh run resumed from that checkpoint: the same final values."""
    out = os.path.join(root, dist, cell)
    straight, _ = make_trainer(root, dist, cell, out, save_strategy="steps", save_steps=2)
    straight.train()
    resumed, _ = make_trainer(root, dist, cell, out + "-resumed", save_strategy="no")
    resumed.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    return {"straight": _gathered_values(straight.model, straight.adapter_name),
            "resumed": _gathered_values(resumed.model, resumed.adapter_name)}


def run_cell(root: str, dist: str, cell: str) -> dict:
    if "resume" in parse_cell(cell)[3]:
        return run_resume(root, dist, cell)
    out = os.path.join(root, dist, cell)
    trainer, train = make_trainer(root, dist, cell, out)
    from sparse_opd import adapter_mask
    from sparse_opd.tuner import iter_merged_named_weights, sparse_delta_layers

    result = {}
    trainer.add_callback(_FixedBatchProbe(trainer, train, result))
    trainer.train()
    result["log"] = [h for h in trainer.state.log_history if "loss" in h]
    model = trainer.model
    result["mask"] = {n: digest(i) for n, i in adapter_mask(model).indices.items()}
    result["indices"] = {n: m.sparse_delta_indices[trainer.adapter_name].cpu().clone()
                         for n, m in sparse_delta_layers(model).items()}
    # copies: a tensor viewing FSDP's own storage does not load back from a file
    result["merged"] = {n: w.detach().float().cpu().clone() for n, w in iter_merged_named_weights(model)}
    result["logits"] = _logits(trainer)
    discovery = getattr(trainer, "discovery", None)
    result["discovery"] = discovery.report if discovery is not None else None
    trainer.save_model(os.path.join(out, "adapter"))
    result["values"] = _gathered_values(model, trainer.adapter_name)
    if trainer.use_vllm:
        server = getattr(trainer.vllm_generation, "server", None)
        result["vllm"] = {"sync_bytes": list(trainer.vllm_generation.sync_weights.sync_bytes),
                          "synced": server.synced if server is not None else None}  # the server: main process
    return result


class _FixedBatchProbe:
    """At the start of training (the model prepared: sharded, wrapped) and at its end, the divergence on one fixed
    batch; at the start, whether two teacher passes agree."""

    def __init__(self, trainer, dataset, result):
        self.trainer, self.dataset, self.result, self.batch = trainer, dataset, result, None

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_train_begin(self, *args, **kwargs):
        self.batch = _fixed_batch(self.trainer, self.dataset)
        self.result["divergence_before"] = _divergence(self.trainer, self.batch)
        self.result["teacher_deterministic"] = _teacher_twice(self.trainer, self.batch)
        self.result["teacher_vs_unpadded"] = _teacher_vs_unpadded(self.trainer, self.batch)
        self.result["prompt_lengths"] = self.batch["prompt_mask"].sum(1).tolist()

    def on_train_end(self, *args, **kwargs):
        self.result["divergence_after"] = _divergence(self.trainer, self.batch)


def _fixed_batch(trainer, dataset):
    torch.manual_seed(123)
    trainer.model.eval()
    n, rank = trainer.args.per_device_train_batch_size, trainer.accelerator.process_index
    batch = trainer._generate_and_score_completions([dataset[i] for i in range(n * rank, n * rank + n)])
    trainer.model.train()
    return batch


@torch.no_grad()
def _divergence(trainer, batch) -> float:
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model_wrapped, batch)
    trainer.model.train()
    return float(trainer.accelerator.gather(loss.detach()[None]).mean())


@torch.no_grad()
def _teacher_twice(trainer, batch) -> bool:
    """Two teacher passes over one batch give the same hidden states (the teacher runs in eval mode)."""
    trainer.model.train()  # the student trains; dropout would be live in a train-mode teacher pass
    inputs = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    with trainer.scoring(batch):
        first, second = (trainer._get_last_hidden_state(teacher, inputs, mask, batch["completion_ids"].shape[1])
                         for _ in range(2))
    return bool(torch.equal(first, second))


@torch.no_grad()
def _teacher_vs_unpadded(trainer, batch) -> float:
    """Largest difference between the teacher's states over the padded batch (as the loss computes them) and over
    each row read alone without padding (its privileged prompt if it has one, then the completion)."""
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    k = batch["completion_ids"].shape[1]
    student_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    student_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with trainer.scoring(batch):
        scored = trainer._get_last_hidden_state(teacher, student_ids, student_mask, k).float()
    prompt = "teacher_prompt" if "teacher_prompt_ids" in batch else "prompt"
    ids = torch.cat([batch[f"{prompt}_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch[f"{prompt}_mask"], batch["completion_mask"]], dim=1)
    worst = 0.0
    for row in range(ids.shape[0]):  # the same number of rows on every rank: the forwards may gather parameters
        n = int(batch["completion_mask"][row].sum())
        alone = ids[row][mask[row].bool()][None]
        hidden = trainer._get_last_hidden_state(teacher, alone, torch.ones_like(alone), n).float()
        worst = max(worst, float((scored[row, :n] - hidden[0]).abs().max()))
    return worst


@torch.no_grad()
def _logits(trainer) -> torch.Tensor:
    """Logits of a fixed input under the trained model (gathered as needed; every rank takes part)."""
    from sparse_opd.distributed import gathered, is_zero3_param

    model = trainer.model
    model.eval()
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]], device=trainer.accelerator.device)
    with gathered([p for p in model.parameters() if is_zero3_param(p)]):
        logits = model(input_ids=ids).logits.float().cpu().clone()
    model.train()
    return logits


def _gathered_values(model, adapter) -> dict:
    from sparse_opd.distributed import gathered
    from sparse_opd.tuner import sparse_delta_layers

    out = {}
    for name, layer in sparse_delta_layers(model, adapter).items():
        with gathered([layer.sparse_delta_values[adapter]]) as (values,):
            out[name] = values.detach().float().cpu().clone()
    return out


def main(out: str, dist: str, cells: list[str]) -> None:
    if dist == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    for cell in cells:
        result = run_cell(out, dist, cell)
        os.makedirs(os.path.join(out, dist, cell), exist_ok=True)
        torch.save(result, os.path.join(out, dist, cell, f"rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    with open(os.path.join(out, f"done-{dist}-rank{rank}.json"), "w") as f:
        json.dump(cells, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
