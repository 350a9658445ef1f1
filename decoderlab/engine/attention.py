"""The new token's attention row, recorded without switching the model to eager attention.

A function registered with transformers' `AttentionInterface` (and a mask function of the same
name with `AttentionMaskInterface`) computes the layer's output with the normal sdpa kernel and,
for the record, only softmax(q·Kᵀ·scale + mask) of the last query: O(heads × context) per layer
and step. GQA (fewer KV heads), sliding windows (through the mask), soft-capping and attention
sinks are honoured; where sdpa cannot compute the output (soft-capping, sinks) the model's own
eager function computes it, and its weights give the row.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "decoderlab_sdpa"

# The sink a recording run writes to: (layer_idx, weights [B, H, K]) -> None; None when not recording.
_sink: Callable[[int, torch.Tensor, torch.Tensor | None], None] | None = None
_recording = False  # whether a sink is set: a bool, which code compiled by torch.compile specialises on once


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = attend) as the additive float mask eager functions expect."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _causal(q_len: int, k_len: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The causal mask sdpa leaves implicit (`is_causal`) when no mask tensor was built: aligned to the first
    keys, as sdpa aligns it (query i sees keys 0..i). Only a forward from an empty cache builds no mask, and a
    static cache holds more key slots than that forward fills."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    out = torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill(j > i, torch.finfo(dtype).min)
    return out[None, None]


def attention_weights(module, query, key, attention_mask, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """softmax(q·Kᵀ·scale + mask) for the given queries, the forward's last ones: [B, H, Q, K] in float32.

    GQA keys are repeated to the query heads; the mask's last Q rows apply (none given: causal);
    a learned sink logit per head (gpt-oss) takes its share of the mass and is dropped.
    """
    groups = query.shape[1] // key.shape[1]
    k = repeat_kv(key, groups).float() if groups > 1 else key.float()
    q_len, k_len = query.shape[2], k.shape[-2]
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling  # [B, H, Q, K]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = attention_mask
    if mask is None and q_len > 1:
        mask = _causal(q_len, k_len, torch.float32, query.device)
    if mask is not None:
        rows = mask[:, :, -q_len:, :k_len]
        scores = scores.masked_fill(~rows, float("-inf")) if rows.dtype == torch.bool else scores + rows.float()
    sinks = getattr(module, "sinks", None)
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, q_len, 1)
        return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.softmax(scores, dim=-1)


def last_row(module, query, key, attention_mask, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """The last query position's attention row: [B, H, K] in float32."""
    return attention_weights(module, query[:, :, -1:, :], key, attention_mask, scaling, softcap).squeeze(2)


def _eager_for(module) -> Callable | None:
    """The model's own eager attention function (it knows the architecture's soft-capping and sinks)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def recording_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa for the output; the last query's attention row for the record."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    special = softcap is not None or getattr(module, "sinks", None) is not None
    if special:
        eager = _eager_for(module)
        if eager is None:
            raise NotImplementedError(f"{type(module).__name__} needs eager attention that decoderlab cannot find")
        mask = _additive(attention_mask, query.dtype)
        if mask is None and query.shape[2] > 1:
            mask = _causal(query.shape[2], key.shape[2], query.dtype, query.device)
        out, weights = eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
        if _recording:
            _hand(module, query, key, attention_mask, scaling, weights=weights)
        return out, None
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if _recording:
        if attention_mask is None and query.shape[2] > 1:
            key = key[:, :, : query.shape[2]]  # is_causal: the last query sees the first Q keys (see `_causal`)
        # with a mask (every decode step over a static cache) the row is computed here, where compiled code fuses it
        into = getattr(module, ROWS_INTO, None)
        if into is not None and attention_mask is not None and \
                into.shape == (query.shape[0], query.shape[1], key.shape[2]):
            into.copy_(last_row(module, query, key, attention_mask, scaling))  # no Python sink: `rows_into_buffers`
            return out, None
        row = None if attention_mask is None else last_row(module, query, key, attention_mask, scaling)
        _hand(module, query, key, attention_mask, scaling, row=row)
    return out, None


def _hand_to_sink(module, query, key, attention_mask, scaling: float, row: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None) -> None:
    """Give the sink this layer's row: `row` computed already, read off `weights` (the model's eager function
    computed them), or computed here from the last query and the keys (or handed over as they are, for
    `last_rows`). Nothing without a sink."""
    if _sink is None:
        return
    if weights is not None:
        _sink(module.layer_idx, weights[:, :, -1, :].float(), weights if query.shape[2] > 1 else None)
        return
    if row is not None and not (query.shape[2] > 1 and getattr(_sink, "wants_full", False)):
        _sink(module.layer_idx, row, None)
        return
    wants_full = query.shape[2] > 1 and getattr(_sink, "wants_full", False)
    defer = getattr(_sink, "defer", None)
    if defer is not None and attention_mask is None and not wants_full:
        defer(module.layer_idx, query[:, :, -1:], key, scaling)  # rows of all layers at once: `last_rows`
        return
    full = attention_weights(module, query, key, attention_mask, scaling) if wants_full else None
    _sink(module.layer_idx, last_row(module, query, key, attention_mask, scaling), full)


ROWS_INTO = "_decoderlab_rows"  # an attention module's attribute: where its decode rows go (`rows_into_buffers`)


def _indexed_attention_modules(model) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, self-attention module), in layer order."""
    return [(m.layer_idx if m.layer_idx is not None else i, m) for i, m in enumerate(_attention_modules(model))]


def row_buffers(model, rows: int, keys: int) -> dict[int, torch.Tensor]:
    """One zeroed buffer per attention layer, [rows, heads, keys] float32 on the layer's device, for
    `rows_into_buffers`; {} when no recording asks for attention rows. The caller keeps them for as long as
    anything writes them (a captured graph does at every replay)."""
    if not _recording:
        return {}
    buffers = {}
    for index, module in _indexed_attention_modules(model):
        heads = getattr(module, "num_heads", None) or module.config.num_attention_heads
        device = next(module.parameters()).device
        buffers[index] = torch.zeros(rows, heads, keys, dtype=torch.float32, device=device)
    return buffers


@contextmanager
def rows_into_buffers(model, buffers: dict[int, torch.Tensor]) -> Iterator[None]:
    """Within the block the attention function writes each decode step's row (over a static cache: a mask is
    given) into its layer's buffer (`row_buffers`), set on the attention module, instead of handing it to the
    sink. The recording reads the buffers after the forward (`Recording.forward_capture`); a layer whose row does
    not fit its buffer goes to the sink as before. Their width is a symbol in compiled code (`key_length_dynamic`).

    Why: the sink is Python, which compiled code must leave (a graph break, `sink_outside_compiled_code`): each
    layer's compiled forward is then cut in pieces, and the code between runs as separate kernels (twice the
    kernels of a step at the Llama-1B shape). A copy into a tensor is traced like any other op, and compiled code
    matches buffers of the same shape without compiling again."""
    modules = [(i, m) for i, m in _indexed_attention_modules(model) if i in buffers]
    for index, module in modules:
        key_length_dynamic(buffers[index], -1)
        object.__setattr__(module, ROWS_INTO, buffers[index])
    try:
        yield
    finally:
        for _, module in modules:
            module.__dict__.pop(ROWS_INTO, None)


def key_length_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """Compiled code is to take `tensor`'s size along `dim` (a key length: the static cache's, the mask's, a row
    buffer's) as a symbol, not a constant, so that one compiled layer serves every cache length. Where the code
    needs the size as a constant after all, it is one, silently (torch._dynamo.maybe_mark_dynamic)."""
    import torch._dynamo

    torch._dynamo.maybe_mark_dynamic(tensor, dim % tensor.dim())


_hand = _hand_to_sink  # what the attention function calls (`sink_outside_compiled_code` swaps it)
_hand_uncompiled: Callable | None = None


@contextmanager
def sink_outside_compiled_code() -> Iterator[None]:
    """Within the block, handing a row to the sink runs eagerly even where torch.compile traces the attention
    function (a graph break): the sink is Python that records, and changes from run to run, which compiled code
    must neither trace nor guard on. The disabled function is made once, so compiled code keeps matching it."""
    global _hand, _hand_uncompiled
    if _hand_uncompiled is None:
        import torch._dynamo

        _hand_uncompiled = torch._dynamo.disable(_hand_to_sink)
    before, _hand = _hand, _hand_uncompiled
    try:
        yield
    finally:
        _hand = before


def last_rows(queries: list[torch.Tensor], keys: list[torch.Tensor], scaling: float,
              max_elements: int = 1 << 24) -> torch.Tensor:
    """The last query's attention row of several layers at once, where no mask applies (the last query of a
    causal forward sees every key): [L, B, H, K] in float32, as `last_row` gives each layer's.

    Why: a decode step is bound by the host on a GPU, and one batched product for every layer costs a handful
    of kernel launches where a product per layer costs a dozen each. `queries` are [B, H, 1, d], `keys`
    [B, H_kv, K, d], all of one shape; query heads share their key head (GQA) without repeating the keys.
    Layers are taken `max_elements` key elements at a time, to bound the float32 copy.
    """
    B, H, _, d = queries[0].shape
    H_kv, K = keys[0].shape[1], keys[0].shape[2]
    per_layer = max(1, max_elements // max(1, B * H_kv * K * d))
    out = []
    for start in range(0, len(queries), per_layer):
        q = torch.stack(queries[start : start + per_layer]).float()  # [L, B, H, 1, d]
        k = torch.stack(keys[start : start + per_layer]).float()  # [L, B, H_kv, K, d]
        L = q.shape[0]
        scores = torch.matmul(q.view(L, B, H_kv, H // H_kv, d), k.transpose(-1, -2)) * scaling  # [L, B, H_kv, G, K]
        out.append(torch.softmax(scores, dim=-1).view(L, B, H, K))
    return out[0] if len(out) == 1 else torch.cat(out)


AttentionInterface.register(NAME, recording_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def supported(model) -> bool:
    """Whether the model dispatches attention through `AttentionInterface` (else: eager fallback)."""
    can = getattr(model, "_can_set_attn_implementation", None)
    try:
        return bool(can()) if callable(can) else bool(getattr(model, "_supports_attention_backend", False))
    except Exception:  # noqa: BLE001 - a model that cannot answer cannot be switched
        return False


def _set_implementation(model, name: str) -> None:
    """Switch the model's attention function (through transformers where the model allows it)."""
    if supported(model):
        try:
            model.set_attn_implementation(name)
        except Exception:  # noqa: BLE001 - older releases: set the config directly
            model.config._attn_implementation = name
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and getattr(cfg, "_attn_implementation", None) != name:
            cfg._attn_implementation = name


@contextmanager
def recording(model, sink: Callable[[int, torch.Tensor, torch.Tensor | None], None]) -> Iterator[str]:
    """Within the block the model records attention rows into `sink`; the user's implementation comes back after.

    Yields "fast" (the recording function) or "eager" (fallback: the caller reads `output_attentions`).
    """
    global _sink, _recording
    before = model.config._attn_implementation
    if supported(model):
        _set_implementation(model, NAME)
        _sink, _recording = sink, True
        try:
            yield "fast"
        finally:
            _sink, _recording = None, False
            _set_implementation(model, before)
    else:
        warnings.warn(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface: "
            "decoderlab records its attention with eager attention (slower, same weights)",
            stacklevel=3,
        )
        _set_implementation(model, "eager")
        handles = [m.register_forward_hook(_eager_hook(i, sink)) for i, m in enumerate(_attention_modules(model))]
        try:
            yield "eager"
        finally:
            for h in handles:
                h.remove()
            _set_implementation(model, before)


def _attention_modules(model) -> list[torch.nn.Module]:
    """Self-attention modules in layer order (those that know their `layer_idx`)."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and "atten" in type(m).__name__.lower()]
    return sorted(found, key=lambda m: m.layer_idx if m.layer_idx is not None else 0)


def _eager_hook(index: int, sink):
    def hook(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if isinstance(weights, torch.Tensor) and weights.dim() == 4:
            layer = module.layer_idx if module.layer_idx is not None else index
            sink(layer, weights[:, :, -1, :].float(), weights.float() if weights.shape[2] > 1 else None)

    return hook
