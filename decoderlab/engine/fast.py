"""The fast path: a static KV cache and the decode step captured once as a CUDA graph, replayed every step,
with recording on (`lm.generate(..., compile=True)`).

Why: on a GPU a decode step of a model this size is bound by the host (Python and kernel launches), not by
the GPU. transformers' own fast path (`generate(cache_implementation="static")`) captures the step with CUDA
graphs, and shows nothing of the decoding. Here the model's own forward is captured while decoderlab's
recording is attached: the attention function writes each layer's row into a buffer of the run
(`attention.rows_into_buffers`), the lens hooks take the residuals, and the recording gathers both inside the
graph, into tensors of the graph's memory that every replay rewrites; before each replay the recording is
handed them, to copy out what an eager forward would have handed it (`Recording.forward_capture` /
`replay_capture`). The processors, the chooser and the recorders run
after the forward, as in the eager loop (as transformers' processors run after its compiled forward).

Order of forwards: the prompt runs uncaptured (its length is the prompt's); the first decode step runs
uncaptured on a side stream (the warm-up CUDA graphs need); the second is captured, and every later one
replays. The cache tracks its own length on the device (`StaticCache`), so a replay needs no new positions.
On a CPU there is nothing to capture: the same static-cache steps run uncaptured (this is how CI tests the
path's logic; the graph itself is tested on a GPU, tests/test_cuda.py).
"""
from __future__ import annotations

import contextlib
import time
import types
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from transformers import StaticCache

from . import attention
from . import loop
from ..errors import StrategyError
from .lens import decoder_layers

LENGTH_STEP = 256  # static caches are sized in multiples of this, so runs of similar lengths reuse compiled layers
COMPILE_NOTICE_AFTER = 0.5  # seconds into the warm-up step after which its layers are said to be compiling


def cache_length(needed: int, window: int | None) -> int:
    """The static cache's length for a run that needs `needed` positions: rounded up to a multiple of LENGTH_STEP
    (compiled code is specialised to the cache's shape), within the context window."""
    length = -(-needed // LENGTH_STEP) * LENGTH_STEP
    return length if window is None else min(length, window)


@contextmanager
def compiled_layers(model) -> Iterator[None]:
    """Within the block each decoder layer's forward runs compiled by torch.compile (inductor): the step's many
    small kernels (norms, rotary embeddings, activations) fused, which a captured graph replays without launches.
    The recording's attention sink, where it is still called, runs outside compiled code
    (`attention.sink_outside_compiled_code`); the lens hooks sit on the layers' calls, around their compiled
    forwards; transformers' output-capturing hooks are taken off meanwhile (`_without_output_capturing_hooks`).
    The model's own forwards come back after.

    Each layer is compiled once per process and cache shape (the first run waits; later runs with a cache of the
    same length do not)."""
    import torch._dynamo

    layers = list(decoder_layers(model))
    config = torch._dynamo.config
    before = config.cache_size_limit
    config.cache_size_limit = max(before, 4 * len(layers) + 8)  # one entry per layer (their indices differ)
    try:
        with attention.sink_outside_compiled_code(), _without_output_capturing_hooks(model):
            for layer in layers:
                cls = type(layer)
                if cls not in _COMPILED:  # torch.compile's wrapper costs milliseconds to make: once per class
                    _COMPILED[cls] = torch.compile(cls.forward, dynamic=False)
                layer.forward = types.MethodType(_COMPILED[cls], layer)
            yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        config.cache_size_limit = before


@contextmanager
def _without_output_capturing_hooks(model) -> Iterator[None]:
    """Within the block, transformers' output-capturing hooks are off the model's modules. They are installed for
    good the first time a model is asked for its hidden states or attentions (DoLa, contrastive search, the logit
    lens of `score`), and each reads a ContextVar, which compiled code cannot trace: every hooked module inside a
    compiled layer would cut it in pieces. The fast path asks for no such output, so the hooks would do nothing;
    they are put back, in place, afterwards."""
    removed = []
    for module in model.modules():
        hooks = module._forward_hooks
        for key, hook in list(hooks.items()):
            if getattr(hook, "__name__", "") == "output_capturing_hook":
                removed.append((hooks, key, hook, list(hooks)))
                del hooks[key]
    try:
        yield
    finally:
        for hooks, key, hook, order in reversed(removed):
            hooks[key] = hook
            for k in order:  # the order they ran in
                if k in hooks:
                    hooks.move_to_end(k)


_COMPILED: dict[type, Callable] = {}  # a decoder layer class -> its compiled forward (no model is kept alive)
_WARMED: set = set()  # (layer class, cache length, rows, dtype) of the warm-ups run in this process


class CapturedDecoder:
    """A run's forwards over a static cache: `state.forward` of a `loop.State` (the loop calls it instead of
    `loop.forward`). One decoder per run: its graph is captured for the run's rows and maximum length."""

    def __init__(self, model, max_length: int, observers: Sequence = (), compile_layers: bool | None = None,
                 notice: Callable[[str | None], None] | None = None):
        self.model = model
        self.notice = notice  # shown what the first steps wait for (compiling layer i/L, capturing); None: done
        self._noticed = False  # a notice is showing (cleared after the capture)
        self.row_buffers: dict[int, torch.Tensor] | None = None  # where the warm-up and the graph write attention rows
        on_gpu = next(model.parameters()).device.type == "cuda"
        self.compile_layers = on_gpu if compile_layers is None else compile_layers
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise StrategyError(f"compile=True: {type(model).__name__} has sliding-window layers, whose static cache "
                                "decides on the host, step by step, where a new key goes and which keys a query "
                                "sees; a captured step would replay the first step's decision. Leave compile off "
                                "for this model")
        self.max_length = max_length
        self.observers = [o for o in observers if hasattr(o, "forward_capture")]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.decode_steps = 0  # decode forwards so far (0: the next is the warm-up, 1: the capture)
        self.token: torch.Tensor | None = None  # [B, 1]: the captured step's input
        self.logits: torch.Tensor | None = None  # [B, V]: the captured step's output, rewritten by each replay
        self.captured: list = []  # per observer, what it took from the captured forward

    @contextmanager
    def _layers(self, rows: int) -> Iterator[dict[int, torch.Tensor]]:
        """The block the warm-up and the capture run in: with compiled layers where asked (on a GPU, by default),
        and the attention rows, if recorded, written into buffers the recording reads (`attention.
        rows_into_buffers`: no Python sink inside compiled code). Yields those buffers ({} when none). The
        prompt's forward runs uncompiled (compiled code would be specialised to each prompt's length), and replays
        run no Python at all."""
        if self.row_buffers is None:  # kept by the decoder: the captured graph writes them at every replay
            self.row_buffers = attention.row_buffers(self.model, rows, self.max_length)
        with contextlib.ExitStack() as stack:
            if self.compile_layers:
                stack.enter_context(compiled_layers(self.model))
            stack.enter_context(attention.rows_into_buffers(self.model, self.row_buffers))
            yield self.row_buffers

    def forwards_ahead(self, state: loop.State, strategy) -> bool:
        """Whether the step being taken should forward its token at once (`loop.choose`'s `ahead`): on a GPU,
        whenever another step follows within `max_new_tokens` and the cache. The host then records the step while
        the GPU runs the next forward; a run that ends at EOS has made one forward it does not use. (On a CPU
        nothing overlaps, but the order is kept, so CI tests the order a GPU runs.)"""
        return state.steps + 1 < strategy.max_new_tokens and state.ids.shape[1] < self.max_length

    @staticmethod
    def host_flag(flag: torch.Tensor) -> Callable[[], bool]:
        """A function that reads the one-element bool `flag` on the host, waiting only for the work queued before
        this call, not for what is queued after it (the next forward): on a GPU the flag is copied to page-locked
        memory without waiting and an event marks the copy. `bool(flag)` instead would wait for everything queued
        by the time it is read. (On a CPU there is nothing to wait for: the flag is read when asked.)"""
        if flag.device.type != "cuda":
            return lambda: bool(flag)
        value = torch.empty((), dtype=torch.bool, pin_memory=True)  # torch's host allocator reuses these blocks
        value.copy_(flag.reshape(()), non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(flag.device))  # the stream the copy was queued on

        def read() -> bool:
            copied.synchronize()
            return bool(value)

        return read

    @property
    def captures(self) -> bool:
        """Whether decode steps are captured (a CUDA device) or run uncaptured (a CPU)."""
        return self.cache.layers[0].device.type == "cuda" if self.cache.is_initialized else False

    @torch.inference_mode()
    def __call__(self, model, state: loop.State, input_ids: torch.Tensor) -> torch.Tensor:
        """The logits [B, V] float32 of the forward over `input_ids` (the prompt, or one pending token per row)."""
        length = state.ids.shape[1]
        if length > self.max_length:
            raise RuntimeError(f"the static cache holds {self.max_length} positions; the run reached {length}")
        if input_ids.shape[1] > 1 or not self.captures:
            return loop.forward(model, input_ids, self.cache)
        self.decode_steps += 1
        if self.decode_steps == 1:
            return self._warm_up(model, input_ids)
        if self.graph is None:
            self._capture(model, input_ids)
        self.token.copy_(input_ids)
        for observer, captured in zip(self.observers, self.captured):
            observer.replay_capture(captured)
        self.graph.replay()
        return self.logits.clone()  # the graph rewrites its output at the next replay

    def _warm_up(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """One uncaptured decode step on a side stream: kernels choose their plans and workspaces before capture."""
        side = torch.cuda.Stream(device=input_ids.device)
        side.wait_stream(torch.cuda.current_stream(input_ids.device))
        with torch.cuda.stream(side), self._layers(input_ids.shape[0]) as rows, \
                self._compile_progress(input_ids.shape[0]):
            logits = loop.forward(model, input_ids, self.cache)
            gathered = [o.forward_capture(rows) for o in self.observers]
        torch.cuda.current_stream(input_ids.device).wait_stream(side)
        for observer, captured in zip(self.observers, gathered):  # recorded as a replay's: copied out at the flush
            observer.replay_capture(captured)
        return logits

    @contextmanager
    def _compile_progress(self, rows: int) -> Iterator[None]:
        """Within the warm-up step, where each decoder layer's first call compiles it (seconds each, the first time
        in a process for a cache length): `notice` says which layer the step has reached ("compiling layer 3/16"),
        then that the step is being captured. From the first layer when this process has not run a layer of this
        class over a cache of this shape yet; otherwise once the step has taken COMPILE_NOTICE_AFTER seconds (the
        recording asked for may need a compile of its own), so a warm-up whose layers are compiled shows
        nothing."""
        if self.notice is None or not self.compile_layers:
            yield
            return
        layers = list(decoder_layers(self.model))
        shape = (type(layers[0]), self.max_length, rows, self.model.dtype) if layers else None
        start, shown = time.perf_counter(), [] if shape in _WARMED else [None]
        _WARMED.add(shape)

        def reached(i: int):
            def hook(module, args) -> None:
                if shown or time.perf_counter() - start > COMPILE_NOTICE_AFTER:
                    shown.append(i)
                    self.notice(f"compile=True: compiling layer {i + 1}/{len(layers)} (once per cache length)")
            return hook

        handles = [layer.register_forward_pre_hook(reached(i)) for i, layer in enumerate(layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if shown:
            self.notice("compile=True: capturing the step")
            self._noticed = True

    @torch.inference_mode()
    def _capture(self, model, input_ids: torch.Tensor) -> None:
        """Capture one decode step (nothing runs: the first replay computes it). What the recording gathers during
        the capture are tensors of the graph's memory, handed to it again before each replay."""
        self.token = input_ids.clone()
        self.graph = torch.cuda.CUDAGraph()
        with self._layers(input_ids.shape[0]) as rows, torch.cuda.graph(self.graph):
            self.logits = loop.forward(model, self.token, self.cache)
            self.captured = [o.forward_capture(rows) for o in self.observers]  # their gathering is in the graph
        if self._noticed:
            self.notice(None)
            self._noticed = False
