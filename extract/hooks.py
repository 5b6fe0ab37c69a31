"""Capture sites: find a model's decoder blocks and record hidden states with forward hooks.

Capture sites follow the Hugging Face `hidden_states` convention; see `extract.settings` (layer 0 =
input of block 1 = embedding output; layer i = output of block i; the last layer is AFTER the final
norm, exactly like `hidden_states[-1]`). Hooks keep, for every forward call, only the LAST position's
hidden state at each requested layer (`[batch, hidden]` per layer and call), and are always removed
(`capture_hidden_states` is a context manager).

Blocks are found at the usual attribute paths (`_BLOCK_PATHS`: Llama, Mistral, Qwen, Gemma 2/3, Phi-3,
GPT-2, NeoX, OPT, MPT, OLMo); a model that keeps them elsewhere is named once with
`register_block_path("backbone.layers", final_norm="backbone.norm_f")`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from extract.settings import POSITIONS

log = logging.getLogger(__name__)


class CaptureError(ValueError):
    """A capture request that cannot work (bad layer, position, model layout, input)."""


# ----------------------------------------------------------------------------------------------
# Where the blocks are
# ----------------------------------------------------------------------------------------------

# (path of the block list, relative to the model) -- the parent object holds the final norm.
_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma/Gemma2/Gemma3 (text), Phi3, OLMo, SmolLM
    "model.language_model.layers",  # Gemma3ForConditionalGeneration and other multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "model.transformer.blocks",  # OLMo (v1)
)
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f")
_EMBED_NAMES = ("embed_tokens", "wte", "embed_in", "word_embeddings", "tok_embeddings")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

# Paths added with `register_block_path`, tried before the built-in ones: block path -> final norm path.
_registered_paths: dict[str, str | None] = {}


def register_block_path(blocks: str, final_norm: str | None = None) -> None:
    """Teach probecal where a model family keeps its decoder blocks (process-wide; call it before
    extraction or serving). Paths are attribute paths relative to the loaded causal LM.

    blocks: the `nn.ModuleList` of decoder blocks, e.g. "backbone.layers".
    final_norm: the norm applied after the last block (so that the last layer equals HF
    `hidden_states[-1]`), e.g. "backbone.norm_f"; default: looked up by the usual names ("norm",
    "ln_f", ...) next to the block list. Registered paths are tried before the built-in ones.
    """
    for name, path in (("blocks", blocks), ("final_norm", final_norm)):
        if path is not None and (not isinstance(path, str) or not _PATH.fullmatch(path)):
            raise ValueError(
                f"register_block_path: {name}={path!r} is not a dotted attribute path like 'model.layers'"
            )
    _registered_paths[blocks] = final_norm


@dataclass
class DecoderLayout:
    """The modules the capture hooks attach to. `num_layers` counts decoder blocks."""

    model_class: str
    embeddings: nn.Module | None
    blocks: list[nn.Module]
    final_norm: nn.Module | None  # None: the last layer is the last block's output

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


def _attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _module_lists(model: nn.Module, limit: int = 5) -> str:
    """The non-empty ModuleLists of a model, for the error message: the block list is usually one."""
    found = [
        f"{name!r} ({len(m)} modules)"
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0
    ]
    return ", ".join(found[:limit]) + (" ..." if len(found) > limit else "") if found else "none"


def find_decoder_blocks(model: nn.Module) -> DecoderLayout:
    """Locate embeddings, decoder blocks and final norm of a causal LM (registered paths, then `_BLOCK_PATHS`)."""
    candidates = [*_registered_paths, *(p for p in _BLOCK_PATHS if p not in _registered_paths)]
    for path in candidates:
        blocks = _attr_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            parent = _attr_path(model, path.rpartition(".")[0]) if "." in path else model
            break
    else:
        raise CaptureError(
            f"cannot find the decoder blocks of {type(model).__name__}: none of {', '.join(candidates)} is a "
            f"non-empty nn.ModuleList. Its ModuleLists: {_module_lists(model)}. Point probecal at the block list "
            "before extracting or serving: extract.hooks.register_block_path('<path>', final_norm='<path>')."
        )
    norm_path = _registered_paths.get(path)
    if norm_path is not None:
        norm = _attr_path(model, norm_path)
        if not isinstance(norm, nn.Module):
            raise CaptureError(
                f"register_block_path: final_norm={norm_path!r} is not a module of {type(model).__name__}"
            )
    else:
        norm = next((m for n in _NORM_NAMES if isinstance(m := getattr(parent, n, None), nn.Module)), None)
    if norm is None:
        log.warning(
            "%s: no final norm next to %s (looked for %s): the last layer is the last block's output, "
            "which differs from HF hidden_states[-1] if the model normalizes it; name it with "
            "register_block_path(%r, final_norm=...)",
            type(model).__name__,
            path,
            ", ".join(_NORM_NAMES),
            path,
        )
    embed = next((m for n in _EMBED_NAMES if isinstance(m := getattr(parent, n, None), nn.Module)), None)
    if embed is None and hasattr(model, "get_input_embeddings"):
        embed = model.get_input_embeddings()
    return DecoderLayout(type(model).__name__, embed, list(blocks), norm)


def resolve_layers(
    layers: str | Sequence[int] | None, num_layers: int, model_name: str = "the model"
) -> list[int]:
    """ "all"/None -> [0..num_layers]; otherwise validate (negative indices count from the end)."""
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return list(range(num_layers + 1))
    if isinstance(layers, (str, int)):
        raise CaptureError(f"extract.layers={layers!r}: use 'all' or a list of layer indices")
    valid = f"valid layers are 0..{num_layers} (0 = embeddings, {num_layers} = after the final norm)"
    resolved = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise CaptureError(f"extract.layers: {layer!r} is not an integer; {valid}")
        if not -(num_layers + 1) <= layer <= num_layers:
            raise CaptureError(f"extract.layers: layer {layer} is out of range for {model_name}: {valid}")
        resolved.append(int(layer) % (num_layers + 1))
    if not resolved:
        raise CaptureError("extract.layers is empty: use 'all' or a list of layer indices")
    if len(set(resolved)) != len(resolved):
        raise CaptureError(f"extract.layers={list(layers)} names a layer twice")
    return resolved


def check_positions(positions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(positions, str):
        positions = [positions]
    unknown = [p for p in positions if p not in POSITIONS]
    if unknown or not positions:
        raise CaptureError(
            f"extract.positions: unknown {unknown or 'empty list'}; allowed: {', '.join(POSITIONS)}"
        )
    if len(set(positions)) != len(positions):
        raise CaptureError(f"extract.positions={list(positions)} names a position twice")
    return tuple(positions)


# ----------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------


class Recorder:
    """Last-position hidden state of every forward call, per hooked layer.

    One entry per forward call: during `generate` that is the prefill (entry 0 = last prompt token)
    and then one entry per fed token. `last_token(layer)` -> `[calls, batch, hidden]`.
    """

    def __init__(self, layers: Sequence[int]):
        self.layers = tuple(layers)
        self._steps: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    def record(self, layer: int, hidden: torch.Tensor) -> None:
        # clone: a view would keep the whole [batch, seq, hidden] prefill output alive.
        self._steps[layer].append(hidden[:, -1, :].detach().clone())

    @property
    def num_calls(self) -> int:
        return len(self._steps[self.layers[0]])

    def last_token(self, layer: int) -> torch.Tensor:
        """`[calls, batch, hidden]` in the model's dtype."""
        if layer not in self._steps:
            raise CaptureError(f"layer {layer} is not hooked; hooked layers: {list(self.layers)}")
        if not self._steps[layer]:
            raise CaptureError("nothing recorded yet: run the model inside the capture context")
        return torch.stack(self._steps[layer])

    def stacked(self, calls: int | None = None) -> torch.Tensor:
        """`[calls, batch, len(layers), hidden]` float32, the first `calls` forward calls, on the first
        hooked layer's device: a model split by a device map (`device_map="auto"`) records each
        layer on the device of its block."""
        per_layer = [torch.stack(self._steps[la][:calls]) for la in self.layers]
        return torch.stack([t.to(per_layer[0].device) for t in per_layer], dim=2).float()

    def clear(self) -> None:
        for steps in self._steps.values():
            steps.clear()


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def hook_layer(layout: DecoderLayout, layer: int, receive: Callable[[torch.Tensor], None]) -> Any:
    """Register the hook that hands `receive` the hidden state of probecal `layer` on every forward call; returns
    the handle (call `.remove()`). The ONE layer -> module rule, shared by capture and the scoring forward:
    layer 0 = the input of the first block (HF `hidden_states[0]`), layer i < num_layers = the output of block i,
    layer num_layers = the final norm's output (block num_layers's output when the model has no final norm)."""
    if layer == 0:
        return layout.blocks[0].register_forward_pre_hook(
            lambda module, args, kwargs: receive(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
    last_with_norm = layer == layout.num_layers and layout.final_norm is not None
    module = layout.final_norm if last_with_norm else layout.blocks[layer - 1]
    return module.register_forward_hook(lambda module, args, output: receive(_first_tensor(output)))


@contextmanager
def capture_hidden_states(model: nn.Module, layers: str | Sequence[int] | None = "all") -> Iterator[Recorder]:
    """Hook `layers` of `model` for the duration of the block (`hook_layer`); the hooks are always removed.

    Example (runtime wrapper):
        with capture_hidden_states(model, [12]) as rec:
            model.generate(...)
        vectors = rec.last_token(12)  # [calls, batch, hidden]
    """
    layout = find_decoder_blocks(model)
    resolved = resolve_layers(layers, layout.num_layers, layout.model_class)
    recorder = Recorder(resolved)
    handles = []
    try:
        for layer in resolved:
            handles.append(hook_layer(layout, layer, partial(recorder.record, layer)))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
