"""A tuned lens (Belrose et al., 2023): the logit lens with a trained affine translator per layer, read from and
written to a folder in the format of the `tuned-lens` package, and trained here on text with no download.

Why a module of its own: the logit lens (`lens.Lens`) is part of every recording; a tuned lens is an optional
reading of the same residuals (`trace.with_lens`), with files and a training loop of its own.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import LensError
from .lens import Lens, decoder_layers


class TunedLens(Lens):
    """A tuned lens (Belrose et al., 2023): before the final norm and unembedding, each layer's residual h becomes
    h + A h + b, an affine translator trained for that layer, which reads intermediate layers more faithfully than
    the plain logit lens.

    Loaded from a folder in the format the `tuned-lens` package saves (`TunedLens.save`): `config.json`
    (`d_model`, `num_hidden_layers`, `bias`, ...) and `params.pt`, the state dict of its `layer_translators`
    (`"{i}.weight"`, `"{i}.bias"`). Translator i reads the hidden state entering block i (the embeddings for i = 0),
    so the output of block l is translated by translator l + 1; the last block's output needs none (it is what the
    model unembeds). Made with `tools/train_tuned_lens.py`, or by the `tuned-lens` package."""

    name = "tuned lens"

    def __init__(self, model, folder: str | Path):
        super().__init__(model)
        folder = Path(folder)
        try:
            config = json.loads((folder / "config.json").read_text())
            state = torch.load(folder / "params.pt", map_location="cpu", weights_only=True)
        except (OSError, ValueError) as err:
            raise LensError(f"{folder}: not a tuned lens folder (config.json and params.pt, as the tuned-lens package "
                            f"saves them): {err}") from err
        cfg = model.config.get_text_config()
        want = {"num_hidden_layers": cfg.num_hidden_layers, "d_model": cfg.hidden_size}
        wrong = {k: (config.get(k), v) for k, v in want.items() if config.get(k) != v}
        if wrong:
            raise LensError(f"{folder}: this tuned lens was trained for another shape "
                            + ", ".join(f"{k}={got} (the model has {v})" for k, (got, v) in wrong.items()))
        n, d = want["num_hidden_layers"], want["d_model"]
        missing = [f"{i}.weight" for i in range(n) if f"{i}.weight" not in state]
        if missing:
            raise LensError(f"{folder}/params.pt has no translator {missing[0]!r} (of {n})")
        w = self.unembed.weight
        self.weight = torch.stack([state[f"{i}.weight"] for i in range(n)]).to(w.device, torch.float32)  # [n, D, D]
        self.bias = torch.stack([state.get(f"{i}.bias", torch.zeros(d)) for i in range(n)]).to(w.device, torch.float32)
        self.folder = folder

    def translate(self, residual: torch.Tensor, layers: torch.Tensor | None) -> torch.Tensor:
        """h + A h + b with the translator of the block after each layer; the last block's output as it is."""
        n = self.weight.shape[0]
        layers = torch.arange(residual.shape[-2]) if layers is None else torch.as_tensor(layers)
        parts = []
        for i, layer in enumerate(layers.tolist()):
            h = residual[..., i, :].float()  # a new tensor: the recorded residuals are never written
            if layer + 1 < n:
                h = h + h @ self.weight[layer + 1].to(h.device).T + self.bias[layer + 1].to(h.device)
            parts.append(h)
        return torch.stack(parts, dim=-2).to(residual.dtype)


def train_tuned_lens(model, texts: Sequence[torch.Tensor], out: str | Path, *, steps: int = 300, lr: float = 1e-3,
                     seed: int = 0, name: str = "", log: Callable[[int, float], None] | None = None) -> Path:
    """Train a tuned lens for `model` on token chunks `texts` ([T] id tensors) and save it to `out` (config.json,
    params.pt, as the `tuned-lens` package writes them); returns the folder.

    Each translator starts at zero (the logit lens) and all are trained together by Adam on the KL divergence from
    the model's own next-token distribution to each layer's tuned-lens distribution, averaged over positions and
    layers; `log(step, loss)` is called as it goes. `tools/train_tuned_lens.py` runs it on this repository's docs."""
    if steps < 1 or not texts:
        raise LensError(f"train_tuned_lens: needs steps >= 1 (got {steps}) and at least one text (got {len(texts)})")
    cfg = model.config.get_text_config()
    n, d = cfg.num_hidden_layers, cfg.hidden_size
    lens = Lens(model)
    translators = torch.nn.ModuleList([torch.nn.Linear(d, d) for _ in range(n)])
    for t in translators:
        torch.nn.init.zeros_(t.weight)
        torch.nn.init.zeros_(t.bias)
    optimiser = torch.optim.Adam(translators.parameters(), lr=lr)
    outputs: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(decoder_layers(model))]
    rng = random.Random(seed)
    frozen = [(p, p.requires_grad) for p in model.parameters()]  # only the translators learn; restored after
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        for step in range(steps):
            ids = rng.choice(list(texts)).to(lens.device)[None]
            with torch.no_grad():
                target = torch.log_softmax(model(input_ids=ids).logits.float(), -1)  # [1, T, V]
            loss = torch.zeros((), device=target.device)
            for layer in range(n - 1):  # block l's output goes through translator l + 1; the last needs none
                h = outputs[layer].detach().float()
                logp = torch.log_softmax(lens.differentiable_logits((h + translators[layer + 1](h))[:, :, None, :])
                                         [:, :, 0], -1)
                loss = loss + torch.sum(target.exp() * (target - logp), -1).mean() / (n - 1)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if log is not None:
                log(step, loss.item())
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(translators.state_dict(), out / "params.pt")
    (out / "config.json").write_text(json.dumps({
        "base_model_name_or_path": name, "d_model": d, "num_hidden_layers": n, "bias": True,
        "base_model_revision": None, "unembed_hash": None, "lens_type": "linear_tuned_lens"}, indent=2))
    return out
