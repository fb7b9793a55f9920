"""The GPU smoke check: one command, under 10 minutes on one H100-class GPU, one JSON file of results.

    python benchmarks/gpu_check.py [--out gpu_check.json]      # on a machine with a GPU
    python benchmarks/gpu_check.py --dry-run                   # the same steps on this CPU, on tiny models

Steps (each recorded with its time; a failing step is recorded and the others still run):

1. job: the default job (`sparse-opd train`) with the `gpu` preset, bf16, on the embedded SmolLM2-135M-Instruct,
   shortened to fit (fewer steps, shorter completions, fewer evaluation problems: the flags are in the JSON).
2. matrix_bf16: the trainer matrix's bf16 cells (tests/trainer/test_matrix.py), each run as one process on the GPU
   and checked with the matrix's own checks (the distributed cells need 2 GPUs; on one GPU they run single-process).
3. generation: `generate` tokens/s in bf16, the bare model against the model with an unmerged 1% sparse delta.
4. rollout_gap: `rollout/logp_abs_diff` (token-weighted mean) and `rollout/logp_abs_diff_max` of a few OPD steps
   on left-padded batches, in bf16 and fp32, with the largest logit and the heuristic bf16 bound 2^-6 * max|logit|.

`--dry-run` runs every step on the CPU with tiny models (a 2-layer Llama built from a config, the matrix's tiny
models, one bf16 cell) so that the script cannot rot: tests/benchmarks/test_gpu_check.py runs it. Record the GPU
results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # generation_bench; tests.helpers, tests.trainer

# The `gpu` preset shortened to a few minutes on one GPU (its own values: 500 steps x 64 prompts x 512 tokens)
JOB_FLAGS = ["--max_steps", "8", "--gradient_accumulation_steps", "1", "--max_completion_length", "192",
             "--mask_probe_steps", "2", "--num_train", "256", "--num_eval", "96", "--eval_max_new_tokens", "192",
             "--logging_steps", "1", "--save_steps", "1000"]
DRY_JOB_FLAGS = ["--max_steps", "1", "--num_train", "8", "--num_eval", "4", "--eval_max_new_tokens", "8",
                 "--max_completion_length", "8", "--mask_density", "0.1", "--mask_probe_steps", "1"]


def run_step(results: dict, name: str, function) -> None:
    """Run one step; store what it returns (or its error) and its time under `results[name]`."""
    start = time.perf_counter()
    try:
        results[name] = {"ok": True, **function()}
    except Exception as error:  # noqa: BLE001 (a smoke check reports every step, whatever fails)
        results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                         "traceback": traceback.format_exc()[-3000:]}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']} s)", flush=True)


def tiny_student_dir(root: Path) -> str:
    from tests.helpers.tiny_opd import tiny_llama, tiny_tokenizer

    path = root / "tiny-student"
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run_job(work: Path, dry_run: bool) -> dict:
    out = work / "job"
    if dry_run:
        flags = ["--config", "smoke", "--model_name_or_path", tiny_student_dir(work), *DRY_JOB_FLAGS]
    else:
        flags = ["--config", "gpu", *JOB_FLAGS]
    command = [sys.executable, "-m", "sparse_opd.cli", "train", *flags, "--output_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=420, cwd=ROOT, env=env)
    lines = proc.stdout.splitlines()
    picked = {key: line.split(":", 1)[1].strip() for line in lines for key in ("device", "student before",
                                                                               "student after", "gain", "total time")
              if line.startswith(f"{key}:")}
    if proc.returncode != 0:
        raise RuntimeError(f"the job exited with {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return {"flags": flags, "adapter_saved": (out / "adapter_model.safetensors").is_file(), **picked,
            "stdout_tail": lines[-25:]}


def run_matrix_bf16(work: Path, dry_run: bool, device: str) -> dict:
    import torch

    import sparse_opd  # noqa: F401  (registers the tuner for the checks' reloads)
    from tests.helpers.opd_matrix_worker import run_cell
    from tests.trainer.test_matrix import LAUNCHES, _prepare, check_cell

    cells = sorted({cell for cells in LAUNCHES.values() for cell in cells if cell.startswith("bf16")})
    cells = cells[:1] if dry_run else cells
    root = work / "matrix"
    root.mkdir()
    _prepare(root)
    os.environ["OPD_MATRIX_DEVICE"] = device
    out = {}
    for cell in cells:
        try:
            result = run_cell(str(root), "single", cell)
            (root / "single" / cell).mkdir(parents=True, exist_ok=True)
            torch.save(result, root / "single" / cell / "rank0.pt")
            gaps = [h for h in result["log"] if "rollout/logp_abs_diff" in h]
            out[cell] = {"gap_mean": max(h["rollout/logp_abs_diff"] for h in gaps),
                         "gap_max": max(h["rollout/logp_abs_diff_max"] for h in gaps),
                         "bound": 2.0**-6 * float(result["logits"].abs().max())}
            check_cell(root, "single", cell)
            out[cell]["passed"] = True
        except Exception as error:  # noqa: BLE001 (every cell is reported)
            out.setdefault(cell, {}).update(passed=False, error=f"{type(error).__name__}: {str(error)[:500]}")
    if not all(c["passed"] for c in out.values()):
        raise AssertionError(json.dumps(out))
    return {"cells": out}


def run_generation(dry_run: bool, device: str) -> dict:
    import torch
    from generation_bench import build

    batch, prompt, new = (2, 8, 8) if dry_run else (16, 64, 128)
    speeds = {}
    for method in ("base", "sparse_delta"):
        model = build("tiny" if dry_run else "smollm2", method, torch.bfloat16).to(device)
        ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0,
                  "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            model.generate(ids, **kwargs)  # warm-up
            times = []
            for _ in range(1 if dry_run else 3):
                _synchronize(device)
                start = time.perf_counter()
                model.generate(ids, **kwargs)
                _synchronize(device)
                times.append(time.perf_counter() - start)
        speeds[method] = batch * new / sorted(times)[len(times) // 2]
        del model
    return {"batch": batch, "prompt_tokens": prompt, "new_tokens": new, "tokens_per_s": speeds,
            "sparse_delta_vs_base": speeds["sparse_delta"] / speeds["base"]}


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_rollout_gap(work: Path, dry_run: bool, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    from sparse_opd.tasks import arithmetic_dataset
    from sparse_opd.trainer import SparseOPDConfig, SparseOPDTrainer

    if dry_run:
        from tests.helpers.tiny_opd import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        path = None
    else:
        from sparse_opd.embedded import embedded_model_path

        path = str(embedded_model_path())
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    out = {}
    for name in ("bfloat16", "float32"):
        dtype = getattr(torch, name)
        student = (tiny_llama(tokenizer) if dry_run else AutoModelForCausalLM.from_pretrained(path)).to(dtype)
        args = SparseOPDConfig(
            output_dir=str(work / f"gap-{name}"), mask_strategy="near_zero", mask_density=0.01,
            per_device_train_batch_size=2 if dry_run else 8, max_steps=2 if dry_run else 4, logging_steps=1,
            max_completion_length=8 if dry_run else 96, learning_rate=2e-3, use_cpu=device == "cpu",
            bf16=dtype == torch.bfloat16, gradient_checkpointing=False, report_to="none", save_strategy="no",
            seed=0, disable_tqdm=True,
        )
        trainer = SparseOPDTrainer(model=student, args=args, train_dataset=arithmetic_dataset("train", 64, 1),
                                   processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # the numbers go to the JSON
        trainer.train()
        logged = [h for h in trainer.state.log_history if "rollout/logp_abs_diff" in h]
        prompts = tokenizer.apply_chat_template([r["prompt"] for r in arithmetic_dataset("test", 4, 1)],
                                                add_generation_prompt=True, padding=True, return_tensors="pt",
                                                return_dict=True)
        with torch.no_grad():
            logits = trainer.model(**{k: v.to(trainer.model.device) for k, v in prompts.items()}).logits
        max_logit = float(logits.float().abs().max())
        out[name] = {"per_step_mean": [h["rollout/logp_abs_diff"] for h in logged],
                     "per_step_max": [h["rollout/logp_abs_diff_max"] for h in logged],
                     "max": max(h["rollout/logp_abs_diff_max"] for h in logged), "max_logit": max_logit,
                     "heuristic_bound_2^-6_max_logit": 2.0**-6 * max_logit}
        del trainer, student
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="where to write the JSON of results")
    parser.add_argument("--dry-run", action="store_true", help="run every step on the CPU with tiny models")
    args = parser.parse_args(argv)

    import torch
    import transformers
    import trl

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    results = {"mode": "dry-run" if args.dry_run else "gpu", "device": torch.cuda.get_device_name() if device == "cuda"
               else platform.processor() or "cpu", "versions": {"torch": torch.__version__, "trl": trl.__version__,
                                                                "transformers": transformers.__version__}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        run_step(results, "job", lambda: run_job(work, args.dry_run))
        run_step(results, "matrix_bf16", lambda: run_matrix_bf16(work, args.dry_run, device))
        run_step(results, "generation", lambda: run_generation(args.dry_run, device))
        run_step(results, "rollout_gap", lambda: run_rollout_gap(work, args.dry_run, device))
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["ok"] = all(results[k]["ok"] for k in ("job", "matrix_bf16", "generation", "rollout_gap"))
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"{'all steps passed' if results['ok'] else 'SOME STEPS FAILED'} in {results['seconds']} s: {args.out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
