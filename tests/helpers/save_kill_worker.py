"""Kill a process that saves sparse-delta adapters in a loop with SIGKILL at random moments, and load the folder
after every kill (run by tests/tuner/test_loading_safety.py::test_a_save_loop_killed_at_random_moments_always_loads).

One long-lived worker builds two adapters of a tiny Llama on different masks once. For each trial it forks a child
that saves versions v+1, v+2, ... into the same folder (odd versions on one mask, even on the other, every value of
version n equal to n / 1000), announcing each save on a pipe before starting it; the worker waits for the first
announcement, sleeps a random part of one save's duration and kills the child. The folder must then load (through
PeftModel.from_pretrained) as exactly the version on disk before the killed save or the one it was writing, and hold
no staging leftovers. Prints a JSON summary.

    python tests/helpers/save_kill_worker.py FOLDER KILLS SEED
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.helpers
from sparse_opd import SparseDeltaConfig, adapter_mask
from sparse_opd.masks import random_mask
from tests.helpers.tiny_models import make_model

torch.set_num_threads(1)


def _version(model, n: int):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "sparse_delta_values" in name:
                param.fill_(n / 1000)
    return model


def _child(models, folder: str, start: int, announce: int) -> None:
    n = start
    while True:
        n += 1
        os.write(announce, n.to_bytes(4, "little"))
        _version(models[n % 2], n).save_pretrained(folder)


def _loaded_version(base, folder: str, masks) -> int:
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    values = torch.cat([p.detach().reshape(-1) for n, p in loaded.named_parameters() if "sparse_delta_values" in n])
    n = round(float(values[0]) * 1000)
    assert torch.equal(values, torch.full_like(values, n / 1000)), "values of two versions mixed"
    assert adapter_mask(loaded) == masks[n % 2], f"version {n} loaded with the other version's coordinates"
    return n


def main(folder: str, kills: int, seed: int) -> dict:
    base = make_model("llama")
    masks = [random_mask(base, density=0.05, seed=s) for s in (0, 1)]
    models = [get_peft_model(copy.deepcopy(base), SparseDeltaConfig(mask=m, init_weights=False)) for m in masks]
    started = time.perf_counter()
    for n in range(4):
        _version(models[n % 2], n).save_pretrained(folder)
    save_seconds = (time.perf_counter() - started) / 4
    on_disk, rng, landed = 3, random.Random(seed), {"previous": 0, "new": 0, "commit folder": 0, "staging folder": 0}
    for _ in range(kills):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                _child(models, folder, on_disk, write)
            finally:
                os._exit(1)
        os.close(write)
        first = os.read(read, 4)  # the child started its first save
        time.sleep(rng.uniform(0, 1.2 * save_seconds))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        rest = first
        while chunk := os.read(read, 4096):
            rest += chunk
        os.close(read)
        last = int.from_bytes(rest[-4:], "little")
        leftovers = [n for n in os.listdir(folder) if n.startswith(".sparse-delta-")]
        landed["commit folder"] += any(n.startswith(".sparse-delta-commit-") for n in leftovers)
        landed["staging folder"] += any(n.startswith(".sparse-delta-save-") for n in leftovers)
        version = _loaded_version(base, folder, masks)
        assert version in (last - 1, last), f"killed while saving version {last}, the folder loads as {version}"
        landed["new" if version == last else "previous"] += 1
        left = [n for n in os.listdir(folder) if n.startswith(".sparse-delta-")]
        assert not left, f"the load left {left}"
        on_disk = version
    return {"kills": kills, "save_ms": round(save_seconds * 1000, 1), "loaded": landed}


if __name__ == "__main__":
    start = time.perf_counter()
    summary = main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary))
