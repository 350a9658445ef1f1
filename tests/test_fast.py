"""The fast path (`compile=True`, decoderlab/fast.py) on a CPU: the same static-cache steps a GPU captures, run
uncaptured, in the order a GPU runs them (each token forwarded before the step is recorded). The captured graph
and the compiled layers are tested on a GPU (tests/test_cuda.py)."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import pytest

import decoderlab as dl
from decoderlab.engine import fast
from decoderlab.errors import StrategyError

PROMPT = "A prompt longer than the sliding window of eight tokens"
EVERYTHING = dl.Record(attention=True, lens=True, logits=True)
SLIDING = ("tiny-mistral", "tiny-gemma2")


def same_trace(a: dl.Trace, b: dl.Trace, attention_atol: float = 1e-3) -> None:
    """Every recorded array of two runs: tokens and integer columns exactly, numbers within float16 storage
    (logits are stored as float16: a difference of one unit in their last place is allowed)."""
    assert a.arrays.keys() == b.arrays.keys()
    for key, x in a.arrays.items():
        y = b.arrays[key]
        assert x.shape == y.shape, key
        if x.dtype.kind in "biu":
            np.testing.assert_array_equal(x, y, err_msg=key)
        elif key == "logits":
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=2e-3, atol=2e-3, err_msg=key)
        else:
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=attention_atol, rtol=1e-4,
                                       err_msg=key)
    assert a.stop_reason == b.stop_reason


@pytest.mark.parametrize("words", [dict(), dict(do_sample=True, top_k=20, temperature=0.8, seed=3),
                                   dict(do_sample=True, top_p=0.9, repetition_penalty=1.3, seeds=[1, 2, 3])],
                         ids=["greedy", "top_k", "rows"])
def test_fast_path_records_what_the_eager_path_records(tiny_lm, words):
    """Tokens and every recorded array (attention rows of every layer, residuals, logits, candidates, processors)
    equal the eager run's, on four architectures (GPT-2's own attention among them); the two with sliding-window
    layers are refused with a clear error."""
    if tiny_lm.name in SLIDING:
        with pytest.raises(StrategyError, match="sliding-window layers"):
            tiny_lm.generate(PROMPT, max_new_tokens=4, progress=False, compile=True, **words)
        return
    a = tiny_lm.generate(PROMPT, max_new_tokens=14, record=EVERYTHING, progress=False, **words)
    b = tiny_lm.generate(PROMPT, max_new_tokens=14, record=EVERYTHING, progress=False, compile=True, **words)
    same_trace(a, b)


def test_rows_ending_at_eos_keep_their_tokens(tiny_lms):
    """Rows that reach EOS stay in the captured batch (emitting padding) while the others run on; the trace equals
    the eager run's, whose finished rows leave the batch, and a run that ends at EOS discards the forward made
    ahead of it."""
    lm = tiny_lms["llama"]
    words = dict(do_sample=True, temperature=1.5, max_new_tokens=20, seeds=[0, 1, 2, 3])
    free = lm.generate(PROMPT, eos_token_id=[], progress=False, **words)
    counts = np.unique(free.arrays["token_id"][:8], return_counts=True)
    eos = int(counts[0][np.argmax(counts[1])])  # a token some row draws early: rows end at different steps
    a = lm.generate(PROMPT, eos_token_id=eos, pad_token_id=0, record=EVERYTHING, progress=False, **words)
    b = lm.generate(PROMPT, eos_token_id=eos, pad_token_id=0, record=EVERYTHING, progress=False, compile=True, **words)
    assert a.stop_reason == "eos" or a.num_steps == 20
    same_trace(a, b)
    one = lm.generate(PROMPT, eos_token_id=eos, record=EVERYTHING, progress=False, compile=True, seed=1,
                      do_sample=True, temperature=1.5, max_new_tokens=20)
    same_trace(lm.generate(PROMPT, eos_token_id=eos, record=EVERYTHING, progress=False, seed=1, do_sample=True,
                           temperature=1.5, max_new_tokens=20), one)


def test_prompt_attention_and_the_context_window(tiny_lms, tokenizer):
    """The prompt's full matrices (an uncaptured forward) as the eager path records them; a run that reaches the
    context window stops there as the eager run does (the static cache is sized within the window)."""
    lm = tiny_lms["qwen2"]
    rec = dl.Record(attention=True, prefill_attention=True)
    same_trace(lm.generate(PROMPT, max_new_tokens=6, record=rec, progress=False),
               lm.generate(PROMPT, max_new_tokens=6, record=rec, progress=False, compile=True))
    window = lm.context_window
    ids = tokenizer(" word" * (window - 5), return_tensors="pt").input_ids[:, : window - 5]
    a = lm.generate_ids(ids, max_new_tokens=50, eos_token_id=[], progress=False)
    b = lm.generate_ids(ids, max_new_tokens=50, eos_token_id=[], progress=False, compile=True)
    assert a.stop_reason == b.stop_reason == "context_window"
    same_trace(a, b)


def test_cache_length_is_rounded_within_the_window():
    assert fast.cache_length(1, None) == fast.LENGTH_STEP
    assert fast.cache_length(fast.LENGTH_STEP, None) == fast.LENGTH_STEP
    assert fast.cache_length(fast.LENGTH_STEP + 1, None) == 2 * fast.LENGTH_STEP
    assert fast.cache_length(300, 280) == 280


@pytest.mark.parametrize("words, what", [(dict(num_beams=3), "beam"), (dict(penalty_alpha=0.6, top_k=4), "contrastive"),
                                         (dict(dola_layers="high"), "dola")])
def test_strategies_without_one_forward_a_step_are_refused(tiny_lms, words, what):
    with pytest.raises(StrategyError, match=f"compile=True with {what}"):
        tiny_lms["llama"].generate(PROMPT, max_new_tokens=3, compile=True, progress=False, **words)


def test_compile_must_be_a_bool(tiny_lms):
    with pytest.raises(StrategyError, match="compile='yes'"):
        tiny_lms["llama"].generate(PROMPT, max_new_tokens=3, compile="yes", progress=False)


@pytest.mark.parametrize("words", [dict(), dict(do_sample=True, seed=1)], ids=["greedy", "sampling"])
def test_numbers_that_go_wrong_stop_the_fast_path_with_the_steps_before(tiny_lms, words):
    """A processor that turns the scores to NaN at step 4: the same NumericError as the eager path, naming the step
    and the processor, and `err.trace` holds the same four steps (the forward made ahead is not a step). The fast
    path checks after queueing that forward; meanwhile the sampler is kept from the NaN rows (torch.multinomial
    would raise its own error first)."""
    from tests.test_errors import NaNAfter

    lm = tiny_lms["llama"]
    length = lm.encode(PROMPT)[0].shape[1] + 4
    traces = []
    for compile in (False, True):
        with pytest.raises(dl.NumericError, match="step 4: after NaNAfter") as caught:
            lm.generate(PROMPT, max_new_tokens=10, record=EVERYTHING, progress=False, compile=compile,
                        logits_processor=[NaNAfter(length)], **words)
        assert caught.value.step == 4 and caught.value.trace.num_steps == 4
        traces.append(caught.value.trace)
    same_trace(*traces)


def test_compiled_layers_record_what_eager_layers_record(tiny_lms):
    """`fast.compiled_layers` (on a GPU, the warm-up and the capture run in it) on the CPU, around a whole run:
    torch.compile's layers, with the attention sink outside compiled code and the lens hooks around the layers,
    record what the eager layers record; afterwards the model's own forwards are back."""
    lm = tiny_lms["llama"]
    a = lm.generate(PROMPT, max_new_tokens=5, record=EVERYTHING, progress=False)
    with fast.compiled_layers(lm.model):
        b = lm.generate(PROMPT, max_new_tokens=5, record=EVERYTHING, progress=False, compile=True)
    same_trace(a, b)
    assert all("forward" not in vars(layer) for layer in lm.model.model.layers)


class _Everything(set):
    def __contains__(self, item) -> bool:
        return True


@pytest.mark.parametrize("after, warmed, shown", [(1e9, False, True), (-1.0, True, True), (1e9, True, False)],
                         ids=["new shape", "slow", "fast"])
def test_a_slow_warm_up_says_which_layer_it_is_compiling(tiny_lms, monkeypatch, after, warmed, shown):
    """The warm-up step compiles each layer on its first call: the notice names each layer it reaches, then the
    capture, from the first layer when the process has not warmed up this layer class over this cache shape, else
    once it has taken COMPILE_NOTICE_AFTER seconds; a warm-up of known shape faster than that (layers compiled
    already) shows nothing. The hooks are gone afterwards."""

    from decoderlab.engine import loop

    lm = tiny_lms["llama"]
    monkeypatch.setattr(fast, "COMPILE_NOTICE_AFTER", after)
    monkeypatch.setattr(fast, "_WARMED", _Everything() if warmed else set())
    notices: list = []
    decoder = fast.CapturedDecoder(lm.model, 64, compile_layers=True, notice=notices.append)
    ids = lm.encode(PROMPT)[0]
    with decoder._compile_progress(rows=1):
        loop.forward(lm.model, ids, decoder.cache)
    layers = len(lm.model.model.layers)
    expected = [f"compile=True: compiling layer {i}/{layers} (once per process)" for i in range(1, layers + 1)]
    assert notices == (expected + ["compile=True: capturing the step"] if shown else [])
    assert all(not layer._forward_pre_hooks for layer in lm.model.model.layers)


def test_a_replayed_step_is_recorded_as_its_forward_gathered_it(tiny_lms):
    """On a GPU the recording's gathering of a step's attention rows and residuals runs inside the captured graph
    (`Recording.forward_capture`), and each replay hands the gathered tensors back (`replay_capture`): recorded
    through that route, a step's rows equal those of the same forward flushed layer by layer, and are copies (the
    next replay rewrites the graph's tensors)."""
    from decoderlab.engine import loop
    from decoderlab.record import Recording

    lm = tiny_lms["llama"]
    ids = lm.encode(PROMPT)[0]
    strat = lm.strategy(ids.shape[1], max_new_tokens=4)
    recorded = []
    for route in ("flush", "capture"):
        rec, decoder = Recording(EVERYTHING), fast.CapturedDecoder(lm.model, 64)
        with rec.attached(lm.model):
            state = loop.prefill(lm.model, ids, strat, [rec], cache=decoder.cache)
            state.ids = torch.cat([state.ids, state.next_logits.argmax(-1)[:, None]], 1)
            rec.before_forward(state, 1)
            loop.forward(lm.model, state.ids[:, -1:], decoder.cache)
            if route == "capture":
                gathered = rec.forward_capture()
                rec.replay_capture(gathered)
            rec._flush_forward()
        if route == "capture":
            assert rec.attention[1].data_ptr() != gathered[0].data_ptr()
            assert rec.residuals[1].data_ptr() != gathered[1].data_ptr()
        recorded.append(rec)
    flushed, captured = recorded
    assert captured.attention[1].shape == flushed.attention[1].shape
    assert torch.equal(captured.attention[1], flushed.attention[1])
    assert torch.equal(captured.residuals[1], flushed.residuals[1])


def test_compiled_layers_write_attention_rows_into_buffers_without_a_graph_break(tiny_lms):
    """On a GPU the warm-up and the capture run the attention function inside compiled layers with the rows going
    into one buffer per layer (`attention.rows_into_buffers`), not to the Python sink, which compiled code must
    leave (a graph break at `_hand_to_sink` in every layer): with the buffers no break is the sink's, and the rows
    the recording gathers from the buffers equal the sink's (here on the CPU, inductor's CPU code); afterwards no
    module points at a buffer."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from decoderlab.engine import attention, loop
    from decoderlab.record import Recording

    lm = tiny_lms["llama"]
    ids = lm.encode(PROMPT)[0]
    lm.model(input_ids=ids, output_hidden_states=True)  # transformers' output-capturing hooks, installed for good
    hooked = _output_capturing_hooks(lm.model)
    assert hooked
    strat = lm.strategy(ids.shape[1], max_new_tokens=4)
    recorded, breaks = [], []
    for route in ("sink", "buffers"):
        rec, decoder = Recording(dl.Record(attention=True, attention_layers=[0, 1], lens=True)), \
            fast.CapturedDecoder(lm.model, 64)
        with rec.attached(lm.model):
            state = loop.prefill(lm.model, ids, strat, [rec], cache=decoder.cache)
            state.ids = torch.cat([state.ids, state.next_logits.argmax(-1)[:, None]], 1)
            rec.before_forward(state, 1)
            torch._dynamo.reset()
            counters.clear()
            with fast.compiled_layers(lm.model):
                if route == "sink":
                    loop.forward(lm.model, state.ids[:, -1:], decoder.cache)
                else:
                    rows = attention.row_buffers(lm.model, 1, 64)
                    with attention.rows_into_buffers(lm.model, rows):
                        loop.forward(lm.model, state.ids[:, -1:], decoder.cache)
                        assert sorted(rows) == list(range(len(lm.model.model.layers)))
                        rec.replay_capture(rec.forward_capture(rows))
                    assert not counters["graph_break"], list(counters["graph_break"])  # none at all
            breaks.append(sum(n for reason, n in counters["graph_break"].items() if "_hand_to_sink" in reason))
            rec._flush_forward()
        recorded.append(rec)
    assert breaks[0] >= len(lm.model.model.layers) and breaks[1] == 0, breaks
    assert all(attention.ROWS_INTO not in vars(m) for m in lm.model.modules())
    assert _output_capturing_hooks(lm.model) == hooked  # back, in their order
    sink, buffers = recorded
    assert buffers.attention[1].shape == sink.attention[1].shape == (1, 2, sink.attention[1].shape[2],
                                                                     sink.attention[1].shape[3])
    torch.testing.assert_close(buffers.attention[1], sink.attention[1], atol=1e-3, rtol=0)
    torch.testing.assert_close(buffers.residuals[1], sink.residuals[1], atol=1e-4, rtol=1e-4)


def _output_capturing_hooks(model) -> list:
    """Every module's forward hooks, in order, where transformers' output-capturing hooks are among them."""
    return [(name, list(m._forward_hooks.items())) for name, m in model.named_modules()
            if any(getattr(h, "__name__", "") == "output_capturing_hook" for h in m._forward_hooks.values())]


def test_a_step_takes_each_layers_row_from_the_sink_or_else_its_buffer():
    """`Recording.forward_capture` with row buffers: a layer whose row reached the sink keeps it, the others take
    their buffer, and a layer the prompt's forward recorded no row for (not asked for, or not attention that
    decoderlab records) is left out, whatever its buffer holds."""
    from decoderlab.record import Recording

    rec = Recording(dl.Record(attention=True))
    rec._row_layers = frozenset({0, 1})
    sink_row = torch.full((1, 2, 5), 0.25)
    rec._att_layers = {0: sink_row.half()}
    buffers = {i: torch.full((1, 2, 5), float(i + 1)) for i in range(3)}
    att, res = rec.forward_capture(buffers)
    assert res is None and att.shape == (1, 2, 2, 5) and att.dtype == torch.float16
    assert torch.equal(att[:, 0], sink_row.half()) and torch.equal(att[:, 1], buffers[1].half())


def test_compiled_layers_reuse_their_code_for_new_row_buffers(tiny_lms):
    """Each run of the fast path makes its own row buffers (`attention.row_buffers`, freed with its decoder):
    compiled layers match new buffers of the same shape without compiling again."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from decoderlab.engine import attention, loop
    from decoderlab.record import Recording

    lm = tiny_lms["llama"]
    ids = lm.encode(PROMPT)[0]
    rec, decoder = Recording(dl.Record(attention=True)), fast.CapturedDecoder(lm.model, 64)
    graphs = []
    with rec.attached(lm.model):
        state = loop.prefill(lm.model, ids, lm.strategy(ids.shape[1], max_new_tokens=4), [rec], cache=decoder.cache)
        token = state.next_logits.argmax(-1)[:, None]
        torch._dynamo.reset()
        counters.clear()
        with fast.compiled_layers(lm.model):
            for _ in range(2):
                with attention.rows_into_buffers(lm.model, attention.row_buffers(lm.model, 1, 64)):
                    loop.forward(lm.model, token, decoder.cache)
                graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= len(lm.model.model.layers) > 0 and graphs[1] == graphs[0], graphs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compiled_layers_serve_every_cache_length_without_compiling_again(tiny_lms, arch):
    """The key length (the static cache's, the attention mask's, the row buffers') is a symbol in compiled layers:
    steps over caches of three lengths, with attention rows going into buffers, compile each layer once, and
    their logits and rows equal the eager layers' (GPT-2 hands its layers the mask by position)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    from decoderlab.engine import attention, loop
    from decoderlab.record import Recording

    lm = tiny_lms[arch]
    ids = lm.encode(PROMPT)[0]
    rec = Recording(dl.Record(attention=True))
    graphs = []
    torch._dynamo.reset()
    counters.clear()
    with rec.attached(lm.model):
        for length in (64, 128, 96):
            logits, rows = [], []
            for compiled in (False, True):
                cache = StaticCache(config=lm.model.config, max_cache_len=length)
                token = loop.forward(lm.model, ids, cache).argmax(-1)[:, None]
                buffers = attention.row_buffers(lm.model, 1, length)
                with contextlib.ExitStack() as stack:
                    if compiled:
                        stack.enter_context(fast.compiled_layers(lm.model))
                    stack.enter_context(attention.rows_into_buffers(lm.model, buffers))
                    logits.append(loop.forward(lm.model, token, cache))
                rows.append(torch.stack([buffers[i][..., : ids.shape[1] + 1] for i in sorted(buffers)]))
            graphs.append(counters["stats"]["unique_graphs"])
            torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(rows[1], rows[0], atol=1e-5, rtol=1e-4)
    layers = len(list(fast.decoder_layers(lm.model)))
    assert graphs[0] >= layers > 0 and graphs[1] == graphs[2] == graphs[0], graphs
    assert not counters["graph_break"], list(counters["graph_break"])


def test_a_run_takes_the_decoder_an_earlier_run_left(tiny_lms, monkeypatch):
    """A model keeps the fast path's decoder of its last run (`fast.keep`): a run with the same cache length and
    rows takes it, its cache emptied (the run records what the eager path records, with another prompt); a run of
    another length, or after the model moved to another dtype, gets a new one (and records what the eager path
    does in that dtype); `forget` frees it."""
    lm = tiny_lms["llama"]
    fast.forget(lm.model)
    made = []
    init = fast.CapturedDecoder.__init__
    monkeypatch.setattr(fast.CapturedDecoder, "__init__",
                        lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    monkeypatch.setattr(fast, "LENGTH_STEP", 32)
    words = dict(max_new_tokens=6, record=EVERYTHING, progress=False, eos_token_id=[])
    lm.generate(PROMPT, compile=True, **words)
    same_trace(lm.generate("Another prompt", **words), lm.generate("Another prompt", compile=True, **words))
    assert len(made) == 1
    lm.generate(PROMPT, compile=True, **dict(words, max_new_tokens=40))  # a cache of 64
    assert len(made) == 2 and fast._KEPT[lm.model].max_length == 64
    lm.model.to(torch.float64)
    try:
        same_trace(lm.generate(PROMPT, **dict(words, max_new_tokens=40)),
                   lm.generate(PROMPT, compile=True, **dict(words, max_new_tokens=40)))
        assert len(made) == 3 and fast._KEPT[lm.model].cache.layers[0].keys.dtype == torch.float64
    finally:
        lm.model.to(torch.float32)
    fast.forget(lm.model)
    assert lm.model not in fast._KEPT


def test_a_kept_step_is_replayed_only_for_what_it_was_captured_for(tiny_lms):
    """The key of a captured step (`CapturedDecoder._graph_key`) is the same for two runs recording the same things,
    and differs where a replay would not compute or gather what the run's forward would: another recording, a
    forward hook added (a user's, not decoderlab's own; each hook its own key, even one at a freed one's
    address; a global one), a module's plain setting changed (training, a flag as PEFT's `disable_adapters`, a
    forward set on the instance, another in its place), a weight replaced, or read another way (transposed), but
    not one changed in place."""
    from decoderlab.engine import loop
    from decoderlab.record import Recording

    lm = tiny_lms["llama"]
    ids = lm.encode(PROMPT)[0]
    strat = lm.strategy(ids.shape[1], max_new_tokens=4)

    def key(record: dl.Record) -> tuple:
        rec = Recording(record)
        decoder = fast.CapturedDecoder(lm.model, 64, [rec])
        with rec.attached(lm.model):  # its lens hooks are on the layers meanwhile
            loop.prefill(lm.model, ids, strat, [rec], cache=decoder.cache)
            rec._flush_forward()
            return decoder._graph_key()

    first = key(EVERYTHING)
    assert key(EVERYTHING) == first
    assert key(dl.Record(attention=True, attention_layers=[1], lens=True, logits=True)) != first
    assert key(dl.Record()) != first
    layer = fast.decoder_layers(lm.model)[0]
    hooked = []
    for scale in (1.0, 2.0):  # one hook, then another in its place (Python may give the new one the same id)
        handle = layer.register_forward_hook(lambda module, args, out, scale=scale: out)
        try:
            hooked.append(key(EVERYTHING))
        finally:
            handle.remove()
    assert first not in hooked and hooked[0] != hooked[1]
    assert key(EVERYTHING) == first
    lm.model.train()
    try:
        assert key(EVERYTHING) != first  # a module's plain settings (training; an adapter's switch) are in the key
    finally:
        lm.model.eval()
    layer.mlp.disable_adapters = True
    try:
        assert key(EVERYTHING) != first
    finally:
        del layer.mlp.disable_adapters
    assert key(EVERYTHING) == first
    with torch.no_grad():
        layer.mlp.down_proj.weight.mul_(1.0)  # in place: the same memory
    assert key(EVERYTHING) == first
    weight = layer.mlp.down_proj.weight
    try:
        layer.mlp.down_proj.weight = torch.nn.Parameter(weight.detach().clone())
        assert key(EVERYTHING) != first
    finally:
        layer.mlp.down_proj.weight = weight
    square = layer.self_attn.q_proj.weight
    try:  # the same memory read the other way round
        layer.self_attn.q_proj.weight = torch.nn.Parameter(square.detach().t())
        assert key(EVERYTHING) != first
    finally:
        layer.self_attn.q_proj.weight = square
    import functools

    forwards = []
    for scale in (1.0, 5.0):  # a forward set on the instance, then another in its place
        mlp = layer.mlp
        mlp.forward = functools.partial(type(mlp).forward, mlp)
        try:
            forwards.append(key(EVERYTHING))
        finally:
            del mlp.forward
    assert first not in forwards and forwards[0] != forwards[1]
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: out)
    try:
        assert key(EVERYTHING) != first  # a global hook
    finally:
        handle.remove()
    assert key(EVERYTHING) == first


def test_compiled_layers_leave_a_layer_with_its_own_forward_as_it_is(tiny_lms):
    """A decoder layer whose instance has a forward of its own (a wrapper's, as accelerate's device hooks) is left
    uncompiled and keeps that forward after the block; the other layers are compiled and given back."""
    lm = tiny_lms["llama"]
    first, second = fast.decoder_layers(lm.model)
    own = first.forward  # a bound method, set on the instance as a wrapper would
    first.forward = own
    try:
        with fast.compiled_layers(lm.model):
            assert first.__dict__["forward"] is own and "forward" in second.__dict__
        assert first.__dict__["forward"] is own and "forward" not in second.__dict__
    finally:
        del first.forward


def test_a_hook_without_a_module_name_is_a_users():
    """A hook whose function has no module name (made with exec) counts as a user's, without an error."""
    namespace: dict = {}
    exec("def hook(module, args, out):\n    return out", {"__name__": None}, namespace)
    namespace["hook"].__module__ = None
    assert not fast._own_hook(namespace["hook"])
