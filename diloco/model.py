"""Model state: fingerprint, the weights file format, and the pieces of a state dict.

Weights and outer momentum are safetensors objects; the momentum file holds exactly the model's
parameters, so the aggregator tells parameters (outer step) from buffers (averaged or kept) without
building the model.
"""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from diloco import stbytes
from diloco.errors import BadInput

WEIGHTS_FORMAT = "diloco-weights/1"


def signature(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], str]]:
    return sorted((name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items())


def model_hash(state: dict[str, torch.Tensor]) -> str:
    """Hash of the sorted (name, shape, dtype) of the state dict: equal iff the models match."""
    blob = json.dumps(signature(state), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def describe_differences(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor],
                         limit: int = 5, names: tuple[str, str] = ("run", "local model")) -> list[str]:
    """Human-readable differences, first `limit` of them, for a model-mismatch error.

    `names` says what `expected` and `actual` are, as the message calls them.
    """
    ours, theirs = names
    exp = {n: (s, d) for n, s, d in signature(expected)}
    act = {n: (s, d) for n, s, d in signature(actual)}
    out = []
    for name in sorted(set(exp) | set(act)):
        if name not in act:
            out.append(f"{name}: missing from the {theirs}")
        elif name not in exp:
            out.append(f"{name}: not in the {ours}'s model")
        elif exp[name] != act[name]:
            (es, ed), (as_, ad) = exp[name], act[name]
            out.append(f"{name}: {ours} has {list(es)} {ed}, {theirs} has {list(as_)} {ad}")
        if len(out) >= limit:
            break
    return out


def state_to_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().to("cpu").clone() for n, t in model.state_dict().items()}


def float_names(state: dict[str, torch.Tensor]) -> list[str]:
    """Entries a delta carries: every floating tensor (parameters and float buffers)."""
    return sorted(n for n, t in state.items() if t.is_floating_point())


def to_parts(tensors: dict[str, torch.Tensor], **metadata: str) -> list[stbytes.Buffer]:
    """Deterministic safetensors bytes (one metadata key, since safetensors orders several keys at
    random) as pieces that alias the tensors (diloco/stbytes.py): the store writes and hashes them
    with no copy."""
    meta = json.dumps({"format": WEIGHTS_FORMAT, **metadata}, sort_keys=True, separators=(",", ":"))
    return stbytes.parts(tensors, {"diloco": meta})


def to_bytes(tensors: dict[str, torch.Tensor], **metadata: str) -> bytearray:
    """`to_parts` in one buffer."""
    return stbytes.join(to_parts(tensors, **metadata))


def from_bytes(data: bytes | bytearray, what: str, *, views: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors object; `views`: read-only views of `data` instead of copies (for
    weights that are only read: a worker loads them into its model and keeps them as the base of
    its next delta), one model-sized copy less on the round's critical path."""
    if views or not isinstance(data, bytes):
        # A bytearray (a direct read of the file store) would need a bytes copy for safetensors: a
        # copy of each view is one model-sized copy instead of two.
        try:
            tensors = stbytes.views(data)[0]
        except stbytes.FormatError as e:
            raise BadInput(f"{what} is not a valid safetensors object: {e}") from None
        return tensors if views else {name: t.clone() for name, t in tensors.items()}
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise BadInput(f"{what} is not a valid safetensors object: {e}") from None
