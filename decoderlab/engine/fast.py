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
A model keeps the decoder of its last run (`decoder_for`, `keep`): a run that fits it replays the step an
earlier run captured from its first decode step, when it records the same things over the same weights.
On a CPU there is nothing to capture: the same static-cache steps run uncaptured (this is how CI tests the
path's logic; the graph itself is tested on a GPU, tests/test_cuda.py).
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import time
import types
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from transformers import Cache, StaticCache

from . import attention
from . import loop
from ..errors import StrategyError
from .lens import decoder_layers
from torch.nn.modules import module as module_hooks  # torch's global forward hooks

LENGTH_STEP = 256  # static caches are sized in multiples of this, so runs of similar lengths reuse a kept decoder
COMPILE_NOTICE_AFTER = 0.5  # seconds into the warm-up step after which its layers are said to be compiling
GRAPHS_PER_DECODER = 4  # captured steps a kept decoder keeps, one per recording layout (`CapturedDecoder._graph_key`)


def cache_length(needed: int, window: int | None) -> int:
    """The static cache's length for a run that needs `needed` positions: rounded up to a multiple of LENGTH_STEP
    (a captured step is specialised to its cache: runs of similar lengths share one, `decoder_for`), within the
    context window."""
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

    Each layer is compiled once per process, for every cache length: the key length (the static cache's, the
    attention mask's, the row buffers') is a symbolic size in compiled code (`_key_length_dynamic`), so a prompt
    that needs a longer cache than the last run's waits for a capture only, not for a compile."""
    import torch._dynamo

    layers = list(decoder_layers(model))
    config = torch._dynamo.config
    before = config.cache_size_limit
    config.cache_size_limit = max(before, 4 * len(layers) + 8)  # one entry per layer (their indices differ)
    handles, compiled = [], []
    try:
        with attention.sink_outside_compiled_code(), _without_output_capturing_hooks(model):
            for layer in layers:
                if "forward" in layer.__dict__:  # a wrapper's (accelerate's device hooks): left as it is, uncompiled
                    continue
                cls = type(layer)
                if cls not in _COMPILED:  # torch.compile's wrapper costs milliseconds to make: once per class
                    _COMPILED[cls] = torch.compile(cls.forward)
                layer.forward = types.MethodType(_COMPILED[cls], layer)
                handles.append(layer.register_forward_pre_hook(_key_length_dynamic, with_kwargs=True))
                compiled.append(layer)
            yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in compiled:
            layer.__dict__.pop("forward", None)
        config.cache_size_limit = before


def _key_length_dynamic(layer, args: tuple, kwargs: dict) -> None:
    """A decoder layer's forward pre-hook (`compiled_layers`): the key length of the attention mask and of the
    static cache's keys and values it is handed is dynamic in its compiled forward (`attention.key_length_dynamic`).
    Arguments found by name, as each architecture passes them (GPT-2 passes the mask by position)."""
    cls = type(layer)
    if cls not in _SIGNATURES:
        signature = inspect.signature(cls.forward)
        rest = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        _SIGNATURES[cls] = (signature, rest)
    signature, rest = _SIGNATURES[cls]
    try:
        bound = signature.bind(layer, *args, **kwargs).arguments
    except TypeError:
        return
    named = {**bound, **(bound.get(rest) or {} if rest else {})}
    for value in named.values():
        if isinstance(value, Cache) and not value.__dict__.get(_MARKED):
            _cache_key_length_dynamic(value)
    mask = named.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
        attention.key_length_dynamic(mask, -1)


_MARKED = "_decoderlab_key_length_dynamic"  # set on a cache whose keys and values are all marked


def _cache_key_length_dynamic(cache: Cache) -> None:
    """The key length of a cache's keys and values [B, H, K, D] is dynamic in compiled code; once all its layers
    hold tensors, the cache is flagged, so the next layers' hooks pass it by."""
    complete = True
    for cached in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(cached, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 4:
                attention.key_length_dynamic(tensor, 2)
            else:
                complete = False
    if complete:
        cache.__dict__[_MARKED] = True


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
            if _is_output_capturing_hook(hook):
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
_SIGNATURES: dict[type, tuple] = {}  # a decoder layer class -> its forward's signature, its **name
_WARMED: set = set()  # (layer class, rows, dtype) of the warm-ups run in this process


class CapturedDecoder:
    """A run's forwards over a static cache: `state.forward` of a `loop.State` (the loop calls it instead of
    `loop.forward`). One run at a time: its graphs are captured for its rows and maximum length, and a later run
    of the same shape may take it over (`decoder_for`, `restart`)."""

    def __init__(self, model, max_length: int, observers: Sequence = (), compile_layers: bool | None = None,
                 notice: Callable[[str | None], None] | None = None):
        self._model = weakref.ref(model)  # a model keeps its decoders (`keep`), not the other way round
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
        self.graph: torch.cuda.CUDAGraph | None = None  # the graph this run replays
        self.decode_steps = 0  # this run's decode forwards so far (the first warms up unless a kept graph fits)
        self.token: torch.Tensor | None = None  # [B, 1]: the captured step's input
        self.logits: torch.Tensor | None = None  # [B, V]: the captured step's output, rewritten by each replay
        self.captured: list = []  # per observer, what it took from the captured forward
        # the graphs captured by this decoder's runs, by what they replay (`_graph_key`): (graph, token, logits,
        # captured); a later run whose key is among them replays that graph from its first decode step
        self.graphs: collections.OrderedDict = collections.OrderedDict()

    @property
    def model(self):
        return self._model()

    def fits(self, max_length: int, rows: int) -> bool:
        """Whether a run over `rows` rows and a cache of `max_length` can take this decoder over: the same shape,
        and each layer's cache (if made) on its decoder layer's device in a dtype of its weights (the model may
        have moved, or changed dtype, since)."""
        if max_length != self.max_length:
            return False
        for cached, layer in zip(self.cache.layers, decoder_layers(self.model)):
            keys = getattr(cached, "keys", None)
            if not cached.is_initialized or keys is None:
                continue
            weights = {(p.device, p.dtype) for p in layer.parameters()}
            if keys.shape[0] != rows or (weights and (keys.device, keys.dtype) not in weights):
                return False
        return True

    @torch.inference_mode()  # the cache's tensors were made in inference mode
    def restart(self, observers: Sequence = (), notice: Callable[[str | None], None] | None = None) -> None:
        """Make the decoder a new run's (`decoder_for`): its cache emptied, its graphs kept for the run to replay
        if one was captured for what it records."""
        self.cache.reset()
        self.observers = [o for o in observers if hasattr(o, "forward_capture")]
        self.notice, self._noticed = notice, False
        self.decode_steps = 0
        self.graph, self.token, self.logits, self.captured = None, None, None, []

    @contextmanager
    def _layers(self, rows: int) -> Iterator[dict[int, torch.Tensor]]:
        """The block the warm-up and the capture run in: with compiled layers where asked (on a GPU, by default),
        and the attention rows, if recorded, written into buffers the recording reads (`attention.
        rows_into_buffers`: no Python sink inside compiled code). Yields those buffers ({} when none). The
        prompt's forward runs uncompiled (compiled code would be specialised to each prompt's length), and replays
        run no Python at all."""
        if not self.row_buffers:  # kept by the decoder: its captured graphs write them at every replay
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
            key = self._graph_key()
            kept = self.graphs.get(key)
            if kept is None:
                return self._warm_up(model, input_ids)
            self.graph, self.token, self.logits, self.captured = kept  # captured by an earlier run: replayed now
            self.graphs.move_to_end(key)
        if self.graph is None:
            self._capture(model, input_ids)
        self.token.copy_(input_ids)
        for observer, captured in zip(self.observers, self.captured):
            observer.replay_capture(captured)
        self.graph.replay()
        return self.logits.clone()  # the graph rewrites its output at the next replay

    def _graph_key(self) -> tuple:
        """What a captured step depends on besides the cache and the input token, so that a graph captured by an
        earlier run serves this one only if it computes and gathers what this run's forward would: what each
        observer gathers (`Recording.capture_key`), the model's attention function, the weights and buffers it
        reads (by address, layout, dtype and device, a wrapper's by its inner tensors: weights changed in place are
        read anew at each replay, replaced ones are not), the forward hooks other than decoderlab's own (by
        handle: a hook added since, e.g. to steer, would be skipped) and each module's plain settings
        (`_module_state`: `training`, an adapter switched off, a forward replaced). What it cannot see is a change
        inside a hook's own variables, or a tensor kept as a plain attribute of a module (neither parameter nor
        buffer) replaced: after one, call `forget(model)`."""
        model = self.model
        hooks = tuple((i, handle) for i, module in enumerate(model.modules())
                      for registry in (module._forward_pre_hooks, module._forward_hooks)
                      for handle, hook in registry.items() if not _own_hook(hook))
        global_hooks = tuple(handle for registry in (module_hooks._global_forward_pre_hooks,
                                                     module_hooks._global_forward_hooks)
                             for handle, hook in registry.items() if not _own_hook(hook))
        state = tuple(_module_state(module) for module in model.modules())
        tensors = tuple(_tensor_key(t) for t in itertools.chain(model.parameters(), model.buffers()))
        return (tuple(o.capture_key() for o in self.observers),
                getattr(model.config, "_attn_implementation", None), hooks, global_hooks, state, tensors)

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
        in a process): `notice` says which layer the step has reached ("compiling layer 3/16"), then that the step
        is being captured. From the first layer when this process has not run a layer of this class for this many
        rows and this dtype yet; otherwise once the step has taken COMPILE_NOTICE_AFTER seconds (the
        recording asked for may need a compile of its own), so a warm-up whose layers are compiled shows
        nothing."""
        if self.notice is None or not self.compile_layers:
            yield
            return
        layers = list(decoder_layers(self.model))
        shape = (type(layers[0]), rows, self.model.dtype) if layers else None
        start, shown = time.perf_counter(), [] if shape in _WARMED else [None]
        _WARMED.add(shape)

        def reached(i: int):
            def hook(module, args) -> None:
                if shown or time.perf_counter() - start > COMPILE_NOTICE_AFTER:
                    shown.append(i)
                    self.notice(f"compile=True: compiling layer {i + 1}/{len(layers)} (once per process)")
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
        key = self._graph_key()  # what this capture depends on now (a callback may have added a hook since step 1)
        token, graph = input_ids.clone(), torch.cuda.CUDAGraph()
        with self._layers(input_ids.shape[0]) as rows, _capturing(graph, input_ids.device):
            logits = loop.forward(model, token, self.cache)
            captured = [o.forward_capture(rows) for o in self.observers]  # their gathering is in the graph
        self.graph, self.token, self.logits, self.captured = graph, token, logits, captured
        self.graphs[key] = (graph, token, logits, captured)
        while len(self.graphs) > GRAPHS_PER_DECODER:
            self.graphs.popitem(last=False)
        if self._noticed:
            self.notice(None)
            self._noticed = False


@contextmanager
def _capturing(graph: torch.cuda.CUDAGraph, device: torch.device) -> Iterator[None]:
    """`torch.cuda.graph(graph)` without what it does first: wait for the device, then free every block cached by
    torch's device and page-locked host allocators. After that each run's first allocations went to cudaMalloc
    and cudaHostAlloc again (page-locking anew the host memory the recording stages its chunks through), tens of
    milliseconds a run with everything recorded. The capture runs on a side stream, as there."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            graph.capture_begin()
            try:
                yield
            except BaseException:
                with contextlib.suppress(Exception):  # the capture's own error, not the ending's, is the one to see
                    graph.capture_end()
                raise
            graph.capture_end()
    finally:
        current.wait_stream(side)


def _module_state(module) -> tuple:
    """A module's plain settings, which its forward may branch on and a captured step would not see change:
    its class, `training`, its attributes that are numbers, text or flags (or tuples, lists and dicts of them:
    PEFT's active adapter, `disable_adapters`), and a forward set on the instance (by a weak reference: a new
    forward at a freed one's address is another forward)."""
    items = []
    for name, value in module.__dict__.items():
        if type(value) in _PLAIN or isinstance(value, _PLAIN_TYPES):  # the exact types first: this runs over every
            items.append((name, value))                                 # module once a run
        elif isinstance(value, dict):
            if not name.startswith("_") and all(isinstance(v, _PLAIN_TYPES) for v in value.values()):
                items.append((name, tuple(sorted((str(k), v) for k, v in value.items()))))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN_TYPES) for v in value):
            items.append((name, tuple(value)))
    forward = module.__dict__.get("forward")
    if forward is not None:
        try:
            forward = weakref.ref(forward)
        except TypeError:  # no weak references to it: the object itself, kept alive by the key
            pass
    return type(module), tuple(items), forward


_PLAIN_TYPES = (bool, int, float, str, type(None))
_PLAIN = frozenset(_PLAIN_TYPES)  # the same, for the exact-type test


def _tensor_key(t: torch.Tensor) -> tuple:
    """A weight or buffer as a captured step reads it: address, layout, dtype and device; a wrapper tensor (a
    quantized weight, whose own address is 0) by the tensors inside it."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return (type(t), tuple(_tensor_key(getattr(t, name)) for name in names))
    return (t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride(), t.storage_offset())


def _own_hook(hook) -> bool:
    """Whether a forward hook is decoderlab's own for a run (the lens' residuals, the compile notice), installed
    anew by each run, or transformers' output-capturing hook (off during capture, `_without_output_capturing_hooks`)."""
    fn = getattr(hook, "func", hook)  # a functools.partial's function
    return (getattr(fn, "__module__", None) or "").startswith("decoderlab.") or _is_output_capturing_hook(fn)


def _is_output_capturing_hook(hook) -> bool:
    """Whether a forward hook is transformers' output-capturing hook (installed for good by the first run that
    asks for hidden states or attentions)."""
    return getattr(hook, "__name__", "") == "output_capturing_hook"


_KEPT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> the decoder its last run gave back


def decoder_for(model, max_length: int, rows: int, observers: Sequence = (),
                notice: Callable[[str | None], None] | None = None) -> CapturedDecoder:
    """The decoder of a fast-path run over `rows` rows and a cache of `max_length`: the one the model's last run
    gave back (`keep`) if it has that length and rows and the model's dtype and device, restarted (its cache
    emptied; a step it captured for what this run records is replayed from the first decode step: no warm-up, no
    capture), else a new one, made after the kept one is let go (at most one cache of the model's is held at a
    time outside a run).

    Why: a capture waits for the device and runs the step's Python once more (tens of milliseconds a run), and
    a new static cache and pool of graph memory are allocated; transformers' static `generate` keeps its cache
    and compiled graphs from call to call too."""
    decoder = _KEPT.pop(model, None)
    if decoder is not None and decoder.fits(max_length, rows):
        decoder.restart(observers, notice)
        return decoder
    del decoder  # freed before the new cache is allocated
    return CapturedDecoder(model, max_length, observers, notice=notice)


def keep(decoder: CapturedDecoder) -> None:
    """Give a decoder back at the end of its run, for the model's next run (`decoder_for`). Its cache and graphs
    stay in the device's memory until the model is freed, a run of another shape replaces it, or `forget`."""
    decoder.observers, decoder.notice = [], None  # the run's recording is not kept alive
    _KEPT[decoder.model] = decoder


def forget(model) -> None:
    """Free the decoder `model` keeps for its next fast-path run (its static cache and captured graphs)."""
    _KEPT.pop(model, None)
