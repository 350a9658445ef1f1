"""The logit lens: a layer's residual stream through the model's final norm and unembedding.

As tuned-lens's `Unembed`, one small object. The loop only records each layer's residual at the
new position (it exists anyway); the lens is applied to all layers of all steps in one batched
matmul when `trace.lens` is first read.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm")


def decoder_layers(model) -> nn.ModuleList:
    """The model's stack of decoder blocks (the ModuleList as long as `num_hidden_layers`)."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    best = None
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            if best is None or len(module) > len(best):
                best = module
            if n is not None:
                break
    if best is None:
        raise NotImplementedError(f"cannot find the decoder layers of {type(model).__name__}")
    return best


def final_norm(model) -> nn.Module:
    """The norm applied after the last block, before the unembedding: the shallowest module named
    like one (`norm`, `ln_f`, `final_layernorm`, ...) outside the decoder blocks."""
    blocks = decoder_layers(model)
    inside = {id(m) for m in blocks.modules()}
    found = [(name.count("."), name, module) for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in _NORM_NAMES and id(module) not in inside]
    if not found:
        raise NotImplementedError(f"cannot find the final norm of {type(model).__name__}")
    return min(found, key=lambda t: (t[0], t[1]))[2]


class Lens:
    """Final norm then unembedding (then the model's own logit scaling), applied to any layer's residual."""

    def __init__(self, model):
        self.norm = final_norm(model)
        self.unembed = model.get_output_embeddings()
        cfg = model.config.get_text_config()
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
        self.divide = getattr(cfg, "logits_scaling", None)  # Granite divides

    @property
    def device(self) -> torch.device:
        """Where the lens runs: the device of the unembedding (with the final norm; in a model sharded with
        device_map both usually sit on the last GPU, and the residuals of every layer are brought there)."""
        return self.unembed.weight.device

    name = "logit lens"

    def translate(self, residual: torch.Tensor, layers: torch.Tensor | None) -> torch.Tensor:
        """What the residual of each layer becomes before the final norm: itself (a tuned lens maps it first)."""
        return residual

    @torch.inference_mode()
    def logits(self, residual: torch.Tensor, layers: torch.Tensor | None = None) -> torch.Tensor:
        """[..., L, D] residuals of `layers` (the decoder blocks they came out of) -> [..., L, V] float32 logits,
        on `device`."""
        return self.differentiable_logits(residual, layers)

    def differentiable_logits(self, residual: torch.Tensor, layers: torch.Tensor | None = None) -> torch.Tensor:
        """`logits` outside inference mode, so that gradients flow through it (training a tuned lens's
        translators: tools/train_tuned_lens.py)."""
        w = self.unembed.weight
        norm_device = next(self.norm.parameters(), w).device  # a norm without weights runs where the unembedding is
        normed = self.norm(self.translate(residual.to(device=norm_device, dtype=w.dtype), layers))
        logits = self.unembed(normed.to(w.device, non_blocking=True)).float()
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.inference_mode()
    def top(self, residual: torch.Tensor, k: int, chosen: torch.Tensor | None = None, chunk: int = 64,
            layers: torch.Tensor | None = None):
        """Top-k ids and probabilities per residual, the entropy, and the chosen token's rank and prob.

        residual: [N, L, D] (out of the blocks `layers`, default 0..L-1); chosen: [N]. Processed `chunk` positions at
        a time to bound memory.
        """
        ids, probs, entropy, rank, chosen_prob = [], [], [], [], []
        for start in range(0, residual.shape[0], chunk):
            logits = self.logits(residual[start : start + chunk], layers)  # [n, L, V]
            p = torch.softmax(logits, dim=-1)
            top = torch.topk(p, k, dim=-1)
            ids.append(top.indices.cpu())
            probs.append(top.values.cpu())
            entropy.append(torch.special.entr(p).sum(-1).cpu())
            if chosen is not None:
                c = chosen[start : start + chunk].to(p.device)[:, None, None].expand(-1, p.shape[1], 1)
                pc = p.gather(-1, c)
                rank.append((p > pc).sum(-1).cpu())
                chosen_prob.append(pc.squeeze(-1).cpu())
        cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
        return cat(ids), cat(probs), cat(entropy), cat(rank), cat(chosen_prob)


@contextmanager
def capturing(model, sink: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, each decoder layer hands its output's last position to `sink(layer, [B, D])`."""

    def hook_for(index: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            sink(index, hidden[:, -1, :].detach())

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(decoder_layers(model))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
