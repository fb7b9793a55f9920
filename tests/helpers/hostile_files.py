"""Fuzz-style battery of broken and hostile adapter and mask files (used by tests/tuner/test_hostile_files.py).

Every case writes a damaged copy of a good sparse-delta adapter (or mask file) and loads it. The outcome is either a
clear error (a ValueError / RuntimeError / OSError whose message names the problem) with the model untouched, or a
file that is still valid and loads as exactly what it holds. Peak memory of each load is measured with Linux's
resettable high-water mark. Run it directly for the table in docs/reliability.md:

    python tests/helpers/hostile_files.py
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.helpers

from tests.helpers.tiny_models import VOCAB

CLEAR_ERRORS = (ValueError, RuntimeError, OSError)  # json.JSONDecodeError and safetensors' errors included
LOADERS = ("from_pretrained", "load_adapter", "transformers")


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
        "indices: 48 MiB stream": edit(
            lambda t: put(s, torch.cat([t[s], torch.full((48 << 20,), 1, dtype=torch.uint8)]))(t)),
        "indices: another module's stream": edit(
            lambda t: put(s, (t[streams[0]] if streams[0] != s else t[streams[-1]]).clone())(t)),
        "indices: int64 tensor": edit(lambda t: put(s, t[s].to(torch.int64))(t)),
        "indices: random bytes": edit(lambda t: put(s, torch.randint(
            0, 256, t[s].shape, dtype=torch.uint8,
            generator=torch.Generator().manual_seed(rng.randrange(1 << 30))))(t)),
        "indices: int32 out of range": edit(lambda t: put(s, torch.cat([
            torch.tensor([3], dtype=torch.uint8),
            torch.tensor([0, 1 << 30], dtype=torch.int32).view(torch.uint8)]))(t)),
        "indices: int32 unsorted": edit(lambda t: put(s, torch.cat([
            torch.tensor([3], dtype=torch.uint8), torch.tensor([5, 1], dtype=torch.int32).view(torch.uint8)]))(t)),
        "indices: bitmap of the wrong size": edit(lambda t: put(s, torch.tensor([2, 255, 255], dtype=torch.uint8))(t)),
        "extra tensor for an unknown module": edit(lambda t: t.__setitem__(
            "base_model.model.model.layers.9.mlp.up_proj.sparse_delta_values", t[v].clone())),
        # issue 21.1: a file that writes over the base model
        "extra tensor: the base embedding": edit(lambda t: t.__setitem__(
            "base_model.model.model.embed_tokens.weight", torch.full((VOCAB, 32), 7.0))),
        "extra tensor: an adapted module's base weight": edit(lambda t: t.__setitem__(
            v.replace("sparse_delta_values", "base_layer.weight"), torch.zeros(_shape_of(v)))),
        "extra tensor: NaN final norm": edit(lambda t: t.__setitem__(
            "base_model.model.model.norm.weight", torch.full((32,), float("nan")))),
        "extra tensor: the output head": edit(lambda t: t.__setitem__(
            "base_model.model.lm_head.weight", torch.full((VOCAB, 32), 3.0))),
        # issue 21.2: a file that writes over another adapter
        "extra tensor: values of adapter 'existing'": edit(lambda t: t.__setitem__(
            f"{v}.existing", torch.full_like(t[v], float("nan")))),
        # issue 21.10: values that are finite but absurd, or of a dtype no adapter holds
        "values: 3e38": edit(lambda t: t[v].__setitem__(0, 3e38)),
        "values: float8": edit(lambda t: put(v, t[v].to(torch.float8_e4m3fn))(t)),
        "values: float64": edit(lambda t: put(v, t[v].to(torch.float64))(t)),
    }


def _config_edits(config: dict) -> dict:
    module = min(config["module_counts"])

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
        "config: counts one off": edit(
            lambda c: c["module_counts"].__setitem__(module, c["module_counts"][module] + 1)),
        "config: shape claims 50000 x 50000": edit(set_(("module_shapes", module), [50_000, 50_000])),
        "config: module missing from counts": edit(lambda c: c["module_counts"].pop(module)),
        "config: unknown module in counts": edit(lambda c: (
            c["module_counts"].__setitem__("model.layers.9.x", 3),
            c["module_index_bytes"].__setitem__("model.layers.9.x", 4))),
        "config: foreign peft_type LORA": edit(set_(("peft_type",), "LORA")),
        "config: unknown peft_type": edit(set_(("peft_type",), "NOT_A_METHOD")),
        "config: other base weights": edit(lambda c: c["base_model_fingerprint"].__setitem__(
            "samples", _other_samples(c["base_model_fingerprint"]["samples"]))),
        "config: fingerprint not base64": edit(set_(("base_model_fingerprint", "samples"), "%%%")),
        "config: other base shapes": edit(set_(("base_model_fingerprint", "shapes"), "0" * 16)),
        "config: weights digest of another file": edit(set_(("weights_digest",), "0" * 32)),
        "config: value_dtype unknown": edit(set_(("value_dtype",), "float8")),
        # issue 21.9: the check that pairs config and weights cannot be switched off
        "config: weights digest removed": edit(lambda c: c.pop("weights_digest")),
        # issue 21.11: fields of the wrong type are one line naming the field
        "config: module_counts is a list": edit(set_(("module_counts",), [1, 2, 3])),
        "config: module_counts is null": edit(set_(("module_counts",), None)),
        "config: a count is Infinity": edit(set_(("module_counts", module), float("inf"))),
        "config: fingerprint is a string": edit(set_(("base_model_fingerprint",), "abc")),
        "config: merge probe malformed": edit(set_(("base_model_fingerprint", "merge_probe"), [["x", "y"]])),
        "config: grad_block_elements is 'big'": edit(set_(("grad_block_elements",), "big")),
        "config: target_modules is 123": edit(set_(("target_modules",), 123)),
        "config: modules_to_save without its tensor": edit(set_(("modules_to_save",), ["lm_head"])),
        "config: a mask key naming /dev/zero": edit(set_(("mask",), "/dev/zero")),
        "config: index bytes as a string": edit(set_(("module_index_bytes", module), "12")),
    }


def _shape_of(values_key: str) -> tuple[int, int]:
    from tests.helpers.tiny_models import make_model

    name = values_key.removeprefix("base_model.model.").removesuffix(".sparse_delta_values")
    return tuple(make_model("llama").get_submodule(name).weight.shape)


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
    def flipper(seed: int, header: bool):
        def flip(b):
            r = random.Random(seed)
            b = bytearray(b)
            end = 8 + int.from_bytes(b[:8], "little")
            pos = r.randrange(0, end) if header else r.randrange(end, len(b))
            b[pos] ^= 1 << r.randrange(8)
            return bytes(b)
        return flip

    for i in range(8):
        name = f"one bit flipped in the {'header' if i % 2 == 0 else 'data'} ({i // 2 + 1})"
        cases[name] = bytes_edit(flipper(rng.randrange(1 << 30), i % 2 == 0))
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
    for name, make in SPECIAL_FILES.items():
        cases[name] = lambda folder, make=make: ((folder / weights).unlink(), make(folder / weights))
    return cases


# weights files that are not regular files; transformers' own loader blocks forever on a FIFO and reads /dev/zero
# before any code of ours runs, so these run through PEFT's loaders only (docs/reliability.md)
SPECIAL_FILES = {
    "weights file is a FIFO": os.mkfifo,
    "weights file links to /dev/zero": lambda path: os.symlink("/dev/zero", path),
    "weights file is a folder": os.mkdir,
}


_GOOD: list[Path] = []  # (sparse-delta adapter dir, LoRA adapter dir), made by `prepare`


def prepare(root: Path):
    """A good sparse-delta adapter and a LoRA adapter of the same tiny model under ``root``."""
    from peft import LoraConfig, get_peft_model

    from sparse_opd import SparseDeltaConfig
    from sparse_opd.masks import random_mask
    from tests.helpers.tiny_models import make_model

    model = make_model("llama")
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=random_mask(model, density=0.1), init_weights=False))
    peft_model.save_pretrained(root / "good")
    get_peft_model(make_model("llama"), LoraConfig(target_modules=["up_proj"])).save_pretrained(root / "lora")
    _GOOD[:] = [root / "good", root / "lora"]


def outside(model, adapter: str) -> dict:
    """Every tensor of ``model`` that does not belong to ``adapter``, by its plain name (PEFT's wrappers removed)."""
    own = (f"sparse_delta_values.{adapter}", f"sparse_delta_index_stream.{adapter}", f"modules_to_save.{adapter}.")
    out = {}
    for key, value in model.state_dict().items():
        if not any(marker in key for marker in own):
            plain = key.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
            out[plain] = value.detach().clone()
    return out


def unchanged(before: dict, model, adapter: str) -> bool:
    after = outside(model, adapter)
    return all(key in after and torch.equal(value, after[key]) for key, value in before.items())


def load_with(how: str, folder: Path):
    """``(model before loading, function loading the adapter and using it once, adapter name)`` for ``how``:
    "from_pretrained" (PEFT, a fresh model), "load_adapter" (PEFT, over an existing adapter named "existing", which
    must survive untouched) or "transformers" (transformers' own `model.load_adapter`)."""
    from peft import PeftModel

    from tests.helpers.tiny_models import make_model

    tokens = torch.tensor([[1, 2, 3]])
    if how == "from_pretrained":
        model = make_model("llama")

        def load():
            loaded = PeftModel.from_pretrained(model, str(folder))
            loaded(input_ids=tokens)  # first use runs the tuner's load checks too
            return loaded
        return model, load, "default"
    model = make_model("llama")
    if how == "load_adapter":
        model = PeftModel.from_pretrained(model, _GOOD[0], adapter_name="existing")

    def load():
        model.load_adapter(str(folder), adapter_name="damaged")
        model.set_adapter("damaged")
        model(input_ids=tokens)
        return model
    return model, load, "damaged"


def run_adapter_case(name: str, damage, root: Path, how: str) -> Outcome:
    """Load a damaged copy of the good adapter with ``how`` (see `load_with`)."""
    folder = Path(tempfile.mkdtemp(dir=root))
    shutil.copytree(_GOOD[0], folder, dirs_exist_ok=True)
    damage(folder)
    model, load, adapter = load_with(how, folder)
    before = outside(model, adapter)
    result, peak = peak_rss_increase_mib(load)
    outcome = _classify(f"{name} [{how}]", result, peak, unchanged(before, model, adapter))
    if how == "transformers" and outcome.kind.startswith("PROBLEM") and type(result).__name__ == "SafetensorError":
        outcome.kind = "unreadable file: transformers' SafetensorError"  # raised before any code of ours runs
    if outcome.kind == "valid file" and _adapter_tensors(model, adapter) == _adapter_tensors(None, None):
        outcome.detail = "loads exactly the adapter that was saved; the rest of the model untouched"
    return outcome


def _adapter_tensors(model, adapter) -> dict:
    """The values and index streams of ``adapter`` (of the good adapter's file when ``model`` is None), as bytes."""
    if model is None:
        state, suffix = load_file(_GOOD[0] / "adapter_model.safetensors"), ""
    else:
        state, suffix = model.state_dict(), f".{adapter}"
    out = {}
    for key, value in state.items():
        for kind in ("sparse_delta_values", "sparse_delta_index_stream"):
            if key.endswith(kind + suffix):
                plain = key.removeprefix("base_model.model.").removesuffix(suffix)
                out[plain] = value.detach().float().numpy().tobytes() if kind.endswith("values") else \
                    value.numpy().tobytes()
    return out


def _is_other_method(model) -> bool:
    """PEFT loaded a config of another method with its own tuner (the sparse-delta tensors are then not used)."""
    configs = getattr(model, "peft_config", {})
    return any(getattr(c.peft_type, "value", c.peft_type) != "SPARSE_DELTA" for c in configs.values())


def _classify(case, result, peak, untouched) -> Outcome:
    if not isinstance(result, BaseException) and _is_other_method(result):
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
    if not untouched:
        return Outcome(case, "PROBLEM: the load changed the model outside the adapter", "", peak)
    return Outcome(case, "valid file", "loads as what it holds; the rest of the model untouched", peak)


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

    def first(t):
        return min(k for k in t if k.endswith(".shape")).removesuffix(".shape")

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
    from sparse_opd import SparseMask
    from sparse_opd.masks import random_mask
    from tests.helpers.tiny_models import make_model

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
    return _classify(name, result, peak, True)


def run_all(root: Path) -> list[Outcome]:
    from tests.helpers.hostile_scenarios import scenarios

    prepare(root)
    outcomes = []
    for how in LOADERS:
        for name, damage in adapter_cases().items():
            if how == "transformers" and name in SPECIAL_FILES:
                continue
            outcomes.append(run_adapter_case(name, damage, root, how))
    for name, damage in mask_cases().items():
        outcomes.append(run_mask_case(name, damage, root))
    for name, scenario in scenarios().items():
        outcomes.append(run_scenario(name, scenario, root))
    return outcomes


def run_scenario(name: str, scenario, root: Path) -> Outcome:
    """A scenario beyond a damaged file (a save, an operation on a model): ``scenario(folder)`` prepares what it
    needs and returns ``(model, adapter, act)``; ``act()`` is measured and must fail with a clear error leaving the
    model's tensors outside ``adapter`` untouched, or succeed, in which case it returns a string saying what holds
    (raising an AssertionError when what must hold does not)."""
    folder = Path(tempfile.mkdtemp(dir=root))
    try:
        model, adapter, act = scenario(folder)
    except Exception as err:  # noqa: BLE001 - the outcome is what the battery records
        return Outcome(name, "PROBLEM: the scenario could not be set up", f"{type(err).__name__}: {err}"[:200], 0.0)
    before = outside(model, adapter) if model is not None else {}
    result, peak = peak_rss_increase_mib(act)
    untouched = model is None or unchanged(before, model, adapter)
    if isinstance(result, AssertionError):
        return Outcome(name, "PROBLEM: expectation failed", str(result)[:200], peak)
    if isinstance(result, str):
        return Outcome(name, "expected result" if untouched else "PROBLEM: model changed", result, peak)
    return _classify(name, result, peak, untouched)


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
