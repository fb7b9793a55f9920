"""Classify weight names into module types (q, k, v, o, gate, up, down, ...), blocks (attention / ffn) and layers."""

from __future__ import annotations

import re

# (regex on the last name component(s), module type, block)
_RULES = (
    (r"(^|\.)(q_proj|query|q|wq)$", "q", "attention"),
    (r"(^|\.)(k_proj|key|k|wk)$", "k", "attention"),
    (r"(^|\.)(v_proj|value|v|wv)$", "v", "attention"),
    (r"(^|\.)(qkv_proj|c_attn|query_key_value|Wqkv)$", "qkv", "attention"),
    (r"(attn|attention)\.(o_proj|out_proj|dense|c_proj|wo|o)$", "o", "attention"),
    (r"(^|\.)(o_proj|out_proj)$", "o", "attention"),
    (r"(^|\.)(gate_proj|w1)$", "gate", "ffn"),
    (r"(^|\.)(up_proj|w3|fc1|c_fc|fc_in|dense_h_to_4h)$", "up", "ffn"),
    (r"(^|\.)(gate_up_proj)$", "gate_up", "ffn"),
    (r"(^|\.)(down_proj|w2|fc2|fc_out|dense_4h_to_h)$", "down", "ffn"),
    (r"(mlp|ffn|feed_forward)\.(c_proj|dense)$", "down", "ffn"),
)
_LAYER_RE = re.compile(r"\.(?:layers|h|layer|blocks|block)\.(\d+)\.")


def _classify(name: str) -> tuple[str, str]:
    name = name.removesuffix(".weight")
    for pattern, kind, block in _RULES:
        if re.search(pattern, name):
            return kind, block
    return "other", "other"


def module_type(name: str) -> str:
    """Short type of a weight (``"q"``, ``"up"``, ...), or ``"other"``."""
    return _classify(name)[0]


def block_of(name: str) -> str:
    """``"attention"``, ``"ffn"`` or ``"other"``."""
    return _classify(name)[1]


def layer_index(name: str) -> int | None:
    """Transformer block index parsed from the name, or None."""
    match = _LAYER_RE.search("." + name + ".")
    return int(match.group(1)) if match else None
