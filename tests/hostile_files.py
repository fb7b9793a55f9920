"""Fuzz-style battery of broken and hostile adapter and mask files (used by tests/test_hostile_files.py).

Every case writes a damaged copy of a good sparse-delta adapter (or mask file) and loads it. The outcome is either a
clear error (a ValueError / RuntimeError / OSError whose message names the problem) with the model untouched, or a
file that is still valid and loads as exactly what it holds. Peak memory of each load is measured with Linux's
resettable high-water mark. Run it directly for the table in docs/reliability.md:

    python tests/hostile_files.py
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))

CLEAR_ERRORS = (ValueError, RuntimeError, OSError)  # json.JSONDecodeError and safetensors' errors included


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])  # KiB
    return 0


def peak_rss_increase_mib(fn):
    """``(result or exception, MiB)``: how far resident memory rose above its level at the start while ``fn`` ran."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark (VmHWM) to the current RSS
    except OSError:
        pass
    start = _status("VmRSS")
    try:
        result = fn()
    except BaseException as err:  # noqa: BLE001 - the outcome is what the battery records
        result = err
    return result, max(0, _status("VmHWM") - start) / 1024


@dataclass
class Outcome:
    case: str
    kind: str  # "clear error", "valid file", or "PROBLEM: ..."
    detail: str
    peak_mib: float


# ------------------------------------------------------------------------------------------------- adapter cases
def _tensor_edits(tensors: dict, rng: random.Random) -> dict:
    keys = sorted(tensors)
    values = [k for k in keys if k.endswith("sparse_delta_values")]
    streams = [k for k in keys if k.endswith("sparse_delta_index_stream")]
    v, s = values[len(values) // 2], streams[len(streams) // 2]

    def edit(fn):
        def apply(t):
            t = {k: x.clone() for k, x in t.items()}
            fn(t)
            return t
        return apply

    def put(key, value):
        return lambda t: t.__setitem__(key, value)

    return {
        "values: one module missing": edit(lambda t: t.pop(v)),
        "indices: one module missing": edit(lambda t: t.pop(s)),
        "all tensors missing": edit(lambda t: t.clear()),
        "values: NaN": edit(lambda t: t[v].__setitem__(0, float("nan"))),
        "values: inf": edit(lambda t: t[v].__setitem__(-1, float("inf"))),
        "values: integers": edit(lambda t: put(v, t[v].to(torch.int32))(t)),
        "values: one too many": edit(lambda t: put(v, torch.cat([t[v], t[v][:1]]))(t)),
        "values: one too few": edit(lambda t: put(v, t[v][:-1])(t)),
        "values: 2-D": edit(lambda t: put(v, t[v][None])(t)),
        "indices: unknown encoding": edit(lambda t: t[s].__setitem__(0, 9)),
        "indices: truncated stream": edit(lambda t: put(s, t[s][: max(2, t[s].numel() // 2)])(t)),
        "indices: 48 MiB stream": edit(lambda t: put(s, torch.cat([t[s], torch.full((48 << 20,), 1, dtype=torch.uint8)]))(t)),
        "indices: another module's stream": edit(lambda t: put(s, (t[streams[0]] if streams[0] != s else t[streams[-1]]).clone())(t)),
        "indices: int64 tensor": edit(lambda t: put(s, t[s].to(torch.int64))(t)),
        "indices: random bytes": edit(lambda t: put(s, torch.randint(0, 256, t[s].shape, dtype=torch.uint8,
                                                                      generator=torch.Generator().manual_seed(rng.randrange(1 << 30))))(t)),
        "indices: int32 out of range": edit(lambda t: put(s, torch.cat([torch.tensor([3], dtype=torch.uint8),
                                                                          torch.tensor([0, 1 << 30], dtype=torch.int32).view(torch.uint8)]))(t)),
        "indices: int32 unsorted": edit(lambda t: put(s, torch.cat([torch.tensor([3], dtype=torch.uint8),
                                                                      torch.tensor([5, 1], dtype=torch.int32).view(torch.uint8)]))(t)),
        "indices: bitmap of the wrong size": edit(lambda t: put(s, torch.tensor([2, 255, 255], dtype=torch.uint8))(t)),
        "extra tensor for an unknown module": edit(lambda t: t.__setitem__(
            "base_model.model.model.layers.9.mlp.up_proj.sparse_delta_values", t[v].clone())),
    }


def _config_edits(config: dict) -> dict:
    module = sorted(config["module_counts"])[0]

    def edit(fn):
        def apply(c):
            c = json.loads(json.dumps(c))
            fn(c)
            return c
        return apply

    def set_(path, value):
        def fn(c):
            target = c
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        return fn

    return {
        "config: index stream claims 2 GB": edit(set_(("module_index_bytes", module), 2 << 30)),
        "config: index stream claims -5 bytes": edit(set_(("module_index_bytes", module), -5)),
        "config: counts claim 10^12 coordinates": edit(set_(("module_counts", module), 10**12)),
        "config: counts claim 0 coordinates": edit(set_(("module_counts", module), 0)),
        "config: counts claim -1 coordinates": edit(set_(("module_counts", module), -1)),
        "config: counts one off": edit(lambda c: c["module_counts"].__setitem__(module, c["module_counts"][module] + 1)),
        "config: shape claims 50000 x 50000": edit(set_(("module_shapes", module), [50_000, 50_000])),
        "config: module missing from counts": edit(lambda c: c["module_counts"].pop(module)),
        "config: unknown module in counts": edit(lambda c: (c["module_counts"].__setitem__("model.layers.9.x", 3),
                                                            c["module_index_bytes"].__setitem__("model.layers.9.x", 4))),
        "config: foreign peft_type LORA": edit(set_(("peft_type",), "LORA")),
        "config: unknown peft_type": edit(set_(("peft_type",), "NOT_A_METHOD")),
        "config: other base weights": edit(lambda c: c["base_model_fingerprint"].__setitem__(
            "samples", _other_samples(c["base_model_fingerprint"]["samples"]))),
        "config: fingerprint not base64": edit(set_(("base_model_fingerprint", "samples"), "%%%")),
        "config: other base shapes": edit(set_(("base_model_fingerprint", "shapes"), "0" * 16)),
        "config: weights digest of another file": edit(set_(("weights_digest",), "0" * 32)),
        "config: value_dtype unknown": edit(set_(("value_dtype",), "float8")),
    }


def _other_samples(text: str) -> str:
    import base64

    import numpy as np

    values = np.frombuffer(base64.b64decode(text), dtype="<f4") + np.float32(0.01)
    return base64.b64encode(values.astype("<f4").tobytes()).decode()


def adapter_cases(seed: int = 0) -> dict:
    """Case name -> function(adapter_dir) damaging the adapter in place."""
    rng = random.Random(seed)
    weights, config = "adapter_model.safetensors", "adapter_config.json"
    cases = {}

    def bytes_edit(fn, name=weights):
        def apply(folder: Path):
            path = folder / name
            path.write_bytes(fn(path.read_bytes()))
        return apply

    for fraction in (0.0, 0.1, 0.5, 0.99):
        cases[f"file truncated to {fraction:.0%}"] = bytes_edit(lambda b, f=fraction: b[: int(len(b) * f)])
    cases["file truncated to its header"] = bytes_edit(lambda b: b[: 8 + int.from_bytes(b[:8], "little")])
    for i in range(8):
        def flip(b, r=random.Random(rng.randrange(1 << 30)), header=(i % 2 == 0)):
            b = bytearray(b)
            end = 8 + int.from_bytes(b[:8], "little")
            pos = r.randrange(0, end) if header else r.randrange(end, len(b))
            b[pos] ^= 1 << r.randrange(8)
            return bytes(b)
        cases[f"one bit flipped in the {'header' if i % 2 == 0 else 'data'} ({i // 2 + 1})"] = bytes_edit(flip)
    cases["file extended by 1 MiB of garbage"] = bytes_edit(lambda b: b + os.urandom(1 << 20))
    cases["header length claims 1 TB"] = bytes_edit(lambda b: (1 << 40).to_bytes(8, "little") + b[8:])
    cases["config: empty file"] = bytes_edit(lambda b: b"", config)
    cases["config: not JSON"] = bytes_edit(lambda b: b[: len(b) // 2], config)

    def tensor_case(fn):
        def apply(folder: Path):
            save_file(fn(load_file(folder / weights)), folder / weights, metadata={"format": "pt"})
        return apply

    def config_case(fn):
        def apply(folder: Path):
            (folder / config).write_text(json.dumps(fn(json.loads((folder / config).read_text()))))
        return apply

    probe = load_file(_GOOD[0] / weights) if _GOOD else None
    if probe is not None:
        cases.update({name: tensor_case(fn) for name, fn in _tensor_edits(probe, rng).items()})
        good_config = json.loads((_GOOD[0] / config).read_text())
        cases.update({name: config_case(fn) for name, fn in _config_edits(good_config).items()})
    cases["weights file of a LoRA adapter"] = lambda folder: shutil.copy(_GOOD[1] / weights, folder / weights)
    cases["config of a LoRA adapter"] = lambda folder: shutil.copy(_GOOD[1] / config, folder / config)
    cases["weights file missing"] = lambda folder: (folder / weights).unlink()
    return cases


_GOOD: list[Path] = []  # (sparse-delta adapter dir, LoRA adapter dir), made by `prepare`


def prepare(root: Path):
    """A good sparse-delta adapter and a LoRA adapter of the same tiny model under ``root``."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import make_model

    from sparse_opd import SparseDeltaConfig
    from sparse_opd.masks import random_mask

    model = make_model("llama")
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=random_mask(model, density=0.1), init_weights=False))
    peft_model.save_pretrained(root / "good")
    get_peft_model(make_model("llama"), LoraConfig(target_modules=["up_proj"])).save_pretrained(root / "lora")
    _GOOD[:] = [root / "good", root / "lora"]


def run_adapter_case(name: str, damage, root: Path, how: str) -> Outcome:
    """Load a damaged copy with ``how``: "from_pretrained" (a fresh model) or "load_adapter" (over an existing
    adapter of another name, which must survive untouched)."""
    from peft import PeftModel
    from tiny_models import make_model

    folder = Path(tempfile.mkdtemp(dir=root))
    shutil.copytree(_GOOD[0], folder, dirs_exist_ok=True)
    damage(folder)
    if how == "from_pretrained":
        model = make_model("llama")
    else:
        model = PeftModel.from_pretrained(make_model("llama"), _GOOD[0], adapter_name="existing")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def load():
        if how == "from_pretrained":
            loaded = PeftModel.from_pretrained(model, str(folder))
        else:
            model.load_adapter(str(folder), adapter_name="damaged")
            loaded = model
        loaded.set_adapter(loaded.active_adapters[-1] if how == "from_pretrained" else "damaged")
        loaded(input_ids=torch.tensor([[1, 2, 3]]))  # first use runs the tuner's load checks too
        return loaded

    result, peak = peak_rss_increase_mib(load)
    untouched = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items() if k in model.state_dict())
    return _classify(f"{name} [{how}]", result, peak, untouched, folder)


def _is_other_method(loaded) -> bool:
    """PEFT loaded a config of another method with its own tuner (the sparse-delta tensors are then not used)."""
    config = loaded.peft_config[loaded.active_adapters[-1]]
    return getattr(config.peft_type, "value", config.peft_type) != "SPARSE_DELTA"


def _classify(case, result, peak, untouched, folder) -> Outcome:
    if not isinstance(result, BaseException) and hasattr(result, "peft_config") and _is_other_method(result):
        return Outcome(case, "another method's config: PEFT's own tuner for it", "PEFT warns of missing keys", peak)
    if isinstance(result, KeyError) and "'NOT_A_METHOD'" in str(result):
        return Outcome(case, "unknown method: PEFT's KeyError", str(result), peak)
    if isinstance(result, BaseException):
        message = " ".join(str(result).split())
        if not isinstance(result, CLEAR_ERRORS) or not message:
            return Outcome(case, f"PROBLEM: {type(result).__name__}", message[:200], peak)
        if not untouched:
            return Outcome(case, "PROBLEM: model changed by a failed load", message[:200], peak)
        return Outcome(case, "clear error", f"{type(result).__name__}: {message[:160]}", peak)
    return Outcome(case, "valid file", "loads as what it holds (digest and structure check out)", peak)


# ---------------------------------------------------------------------------------------------------- mask cases
def mask_cases(seed: int = 0) -> dict:
    from safetensors.torch import load_file as load
    from safetensors.torch import save_file as save

    rng = random.Random(seed)

    def tensors(fn):
        def apply(path: Path):
            t = load(path)
            fn(t)
            save(t, path, metadata={"format": "sparse_opd.mask/1"})
        return apply

    first = lambda t: sorted(k for k in t if k.endswith(".shape"))[0].removesuffix(".shape")
    cases = {
        "mask truncated to 50%": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        "mask: one data bit flipped": lambda p: p.write_bytes(_flip_data(p.read_bytes(), rng)),
        "mask: wrong format metadata": lambda p: save(load(p), p, metadata={"format": "pt"}),
        "mask: claims a 50000 x 50000 shape": tensors(lambda t: t.__setitem__(
            first(t) + ".shape", torch.tensor([50_000, 50_000]))),
        "mask: negative shape": tensors(lambda t: t.__setitem__(first(t) + ".shape", torch.tensor([-4, 8]))),
        "mask: float shape": tensors(lambda t: t.__setitem__(first(t) + ".shape", torch.tensor([4.0, 8.0]))),
        "mask: 3-D shape": tensors(lambda t: t.__setitem__(first(t) + ".shape", torch.tensor([2, 2, 2]))),
        "mask: shape missing": tensors(lambda t: t.pop(first(t) + ".shape")),
        "mask: indices missing": tensors(lambda t: t.pop(first(t) + ".indices")),
        "mask: same module twice (x and x.weight)": tensors(lambda t: (
            t.__setitem__(first(t) + ".weight.indices", t[first(t) + ".indices"].clone()),
            t.__setitem__(first(t) + ".weight.shape", t[first(t) + ".shape"].clone()))),
        "mask: bitmap of the wrong size": tensors(lambda t: t.__setitem__(
            first(t) + ".indices", torch.tensor([2, 1, 2, 3], dtype=torch.uint8))),
    }
    return cases


def _flip_data(b: bytes, rng: random.Random) -> bytes:
    b = bytearray(b)
    end = 8 + int.from_bytes(b[:8], "little")
    b[rng.randrange(end, len(b))] ^= 0xFF
    return bytes(b)


def run_mask_case(name: str, damage, root: Path) -> Outcome:
    from tiny_models import make_model

    from sparse_opd import SparseMask
    from sparse_opd.masks import random_mask

    path = Path(tempfile.mkdtemp(dir=root)) / "mask.safetensors"
    mask = random_mask(make_model("llama"), density=0.05)
    mask.save(path)
    damage(path)

    def load_and_resave():
        loaded = SparseMask.load(path)
        loaded.save(path.with_suffix(".again.safetensors"))
        return loaded

    result, peak = peak_rss_increase_mib(load_and_resave)
    if not isinstance(result, BaseException) and result != mask:  # hand-edited (no checksum) but well formed
        return Outcome(name, "valid file", f"a well-formed mask of what the file now says: {result!r}", peak)
    return _classify(name, result, peak, True, path)


def run_all(root: Path) -> list[Outcome]:
    prepare(root)
    outcomes = []
    for how in ("from_pretrained", "load_adapter"):
        for name, damage in adapter_cases().items():
            outcomes.append(run_adapter_case(name, damage, root, how))
    for name, damage in mask_cases().items():
        outcomes.append(run_mask_case(name, damage, root))
    return outcomes


def main() -> None:
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = run_all(Path(tmp))
    kinds = {}
    for o in outcomes:
        kinds[o.kind] = kinds.get(o.kind, 0) + 1
    print(f"cases tried: {len(outcomes)}; " + "; ".join(f"{k}: {n}" for k, n in sorted(kinds.items())))
    print(f"largest rise of resident memory during one load: {max(o.peak_mib for o in outcomes):.1f} MiB")
    print("\n| case | outcome | peak MiB | detail |\n|---|---|---:|---|")
    for o in outcomes:
        print(f"| {o.case} | {o.kind} | {o.peak_mib:.1f} | {o.detail.replace('|', '/')} |")


if __name__ == "__main__":
    main()
