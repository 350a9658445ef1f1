"""Record options are checked, and your own recorders run when a Record asks for them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import decoderlab as dl


@dl.recorder("margin")
def margin(ctx, record):
    top2 = ctx.logits.topk(2).values
    return {"margin": top2[:, 0] - top2[:, 1]}


def test_own_recorder_runs_and_survives_save(tiny_lms, tmp_path):
    lm = tiny_lms["llama"]
    trace = lm.generate("Hello", max_new_tokens=4, progress=False, record=dl.Record(extra=["margin"], logits=True))
    logits = torch.from_numpy(trace.arrays["logits"][:, 0].astype(np.float32))
    top2 = logits.topk(2).values
    np.testing.assert_allclose(trace.arrays["margin"][:, 0], (top2[:, 0] - top2[:, 1]).numpy(), atol=1e-2)
    back = dl.Trace.load(trace.save(tmp_path / "m.parquet"))
    np.testing.assert_array_equal(back.arrays["margin"], trace.arrays["margin"])


@pytest.mark.parametrize("options,match", [
    (dict(top_k=0), "top_k"),
    (dict(lens_top_k=-1), "lens_top_k"),
    (dict(logits="yes"), "logits"),
    (dict(attention_layers=5), "attention_layers"),
    (dict(attention_heads=[]), "attention_heads"),
    (dict(attention_heads=[-1]), "attention_heads"),
    (dict(extra=["no-such-recorder"]), "no recorder registered"),
])
def test_bad_record_options(options, match):
    with pytest.raises(ValueError, match=match):
        dl.Record(**options)


def test_layers_and_heads_checked_against_the_model(tiny_lms):
    lm = tiny_lms["llama"]  # 2 layers, 4 heads
    with pytest.raises(ValueError, match="2 layers"):
        lm.generate("x", max_new_tokens=2, progress=False, record=dl.Record(attention=True, attention_layers=[5]))
    with pytest.raises(ValueError, match="4 heads"):
        lm.session("x", record=dl.Record(attention=True, attention_heads=[9]))
    trace = lm.generate("x", max_new_tokens=2, progress=False, record=dl.Record(attention=True, attention_layers=[1]))
    with pytest.raises(ValueError, match="were not recorded"):
        trace.attention_frame(layers=[0])


def test_lens_top_k_larger_than_vocabulary(tiny_lms):
    lm = tiny_lms["qwen2"]
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    trace = lm.generate("x", max_new_tokens=1, progress=False, record=dl.Record(lens=True, lens_top_k=vocab + 10))
    assert trace.lens.groupby(["step", "layer"]).size().max() == vocab


def test_in_place_processor_works_everywhere(tiny_lms):
    from transformers import LogitsProcessor

    class Ban(LogitsProcessor):
        def __call__(self, ids, scores):
            scores[:, [13, 42]] = -float("inf")
            return scores

    lm = tiny_lms["llama"]
    for record in (dl.Record(), dl.Record(processors=False)):
        trace = lm.generate("ban", max_new_tokens=3, progress=False, logits_processor=[Ban()], record=record)
        assert not {13, 42} & set(trace.token_ids)
    s = lm.session("ban", logits_processor=[Ban()])
    assert s.candidates().final_prob[s.candidates().token_id.isin([13, 42])].sum() == 0
    s.choose(token=13)
    assert s.trace.steps.final_prob[0] == 0 and s.trace.steps.prob[0] > 0  # raw logits kept intact


def test_registry_refuses_a_taken_name():
    """A user's recorder cannot silently replace a built-in one (trace.steps reads "choice"'s arrays)."""
    before = dict(dl.STEP_RECORDERS)
    for name in ("choice", "candidates", "processors", "logits", "margin"):
        with pytest.raises(ValueError, match=f"{name!r} is already registered"):
            dl.recorder(name)(lambda ctx, record: {})
    assert dl.STEP_RECORDERS == before
    with pytest.raises(ValueError, match="non-empty string"):
        dl.recorder("")


def test_registry_replaces_when_told(tiny_lms):
    original = dl.STEP_RECORDERS["margin"]
    try:
        @dl.recorder("margin", replace=True)
        def zero_margin(ctx, record):
            return {"margin": torch.zeros(ctx.logits.shape[0])}

        trace = tiny_lms["llama"].generate("Hello", max_new_tokens=3, progress=False,
                                           record=dl.Record(extra=["margin"]))
        assert (trace.arrays["margin"] == 0).all()
    finally:
        dl.recorder("margin", replace=True)(original)
    assert dl.STEP_RECORDERS["margin"] is original


def test_bfloat16_columns_reach_the_host_as_the_same_numbers(tokenizer):
    """A column recorded in bfloat16 (contrastive search's penalty and score are computed in the model's dtype, as
    transformers does) reaches the trace as float32 holding the same numbers (numpy has no bfloat16)."""
    from tests.conftest import make_tiny

    lm = dl.LM(make_tiny("llama", tokenizer).to(torch.bfloat16), tokenizer, name="tiny-bf16")
    kept = {}

    @dl.recorder("bf16_penalty_copy", replace=True)
    def copy_penalty(ctx, record):
        kept[ctx.step] = ctx.decision["contrastive_penalty"].clone()
        return {}

    trace = lm.generate("Once upon a time", penalty_alpha=0.6, top_k=4, max_new_tokens=5, eos_token_id=[],
                        progress=False, record=dl.Record(extra=["bf16_penalty_copy"]))
    penalty = trace.arrays["contrastive_penalty"]
    assert penalty.dtype == np.float32 and trace.num_steps == 5
    for s, want in kept.items():
        assert want.dtype == torch.bfloat16
        assert penalty[s].tolist() == want.float().cpu().numpy().tolist()


def test_long_run_moves_steps_to_host_buffers_with_the_same_numbers(tiny_lms, monkeypatch):
    """Past HOST_CHUNK steps a generate run keeps its steps in host buffers, not as per-step tensors (heap
    fragmentation, issue 19), and records exactly what a run that kept every step as tensors records."""
    import numpy as np

    import decoderlab.backends.local as lm_mod
    import decoderlab.record.recording as record_mod

    lm = tiny_lms["llama"]
    opts = dict(max_new_tokens=150, eos_token_id=[], do_sample=True, seeds=[3, 4], progress=False,
                record=dl.Record(attention=True, lens=True, logits=True))
    made = []

    class Kept(record_mod.Recording):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(lm_mod, "Recording", Kept)
    spilled = lm.generate("Hello there", **opts)
    rec = made[-1]
    held = [i for col in (*rec.columns.values(), rec.attention, rec.residuals) for i, x in enumerate(col)
            if x is not None]
    assert max(held) >= 150 - record_mod.HOST_CHUNK and min(held) >= 128  # only the last chunk as tensors
    monkeypatch.setattr(record_mod, "HOST_CHUNK", 10**9)  # every step kept as tensors until the trace is built
    kept = lm.generate("Hello there", **opts)
    assert set(spilled.arrays) == set(kept.arrays)
    for name in kept.arrays:
        np.testing.assert_array_equal(spilled.arrays[name], kept.arrays[name], err_msg=name)
    assert spilled.num_steps == 150 and spilled.arrays["attention"].any()


# ---- the memory budget: attention rows of the oldest steps dropped, the newest kept exactly ---------------------
BUDGET_RUN = dict(eos_token_id=[], do_sample=True, progress=False)


@pytest.mark.parametrize("value, want", [(None, None), (4096, 4096), ("2GiB", 2 * 2**30), ("1.5 MB", 1_500_000),
                                         ("512mib", 512 * 2**20)])
def test_memory_budget_spellings(value, want):
    assert dl.Record(memory_budget=value).memory_budget == want
    assert dl.Record().memory_budget == 2**30  # the documented default: 1 GiB of attention rows


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "2 parsecs", "GiB", "", "0B"])
def test_bad_memory_budget_names_argument_value_and_what_is_allowed(value):
    with pytest.raises(dl.RecordError, match=r"Record\(memory_budget=.*must be a number of bytes >= 1, text such as "
                                             r"'512MiB' or '2GiB' \(units .*\), or None for no limit"):
        dl.Record(memory_budget=value)


@pytest.fixture
def held_bytes(monkeypatch):
    """The bytes of attention rows each recording made by `LM.generate` holds after every step (its per-step tensors
    and its host buffer), measured on a real Recording (a subclass that reads them after each step)."""
    import decoderlab.backends.local as lm_mod
    import decoderlab.record.recording as record_mod

    held: list[int] = []

    class Measured(record_mod.Recording):
        def on_step(self, ctx):
            super().on_step(ctx)
            held.append(self.attention_nbytes())

    monkeypatch.setattr(lm_mod, "Recording", Measured)
    return held


def _one_row_bytes(trace) -> int:
    """Bytes of the newest step's attention rows (every row, layer and head over the widest context)."""
    _, rows, layers, heads, width = trace.arrays["attention"].shape
    return rows * layers * heads * width * 2


def test_budget_drops_the_oldest_rows_once_with_one_warning_and_keeps_the_newest_exactly(tiny_lms, held_bytes,
                                                                                        recwarn, tmp_path):
    lm = tiny_lms["llama"]
    record = dict(attention=True, lens=True)
    full = lm.generate("Keep the newest", max_new_tokens=200, seeds=[3, 4], record=dl.Record(**record,
                       memory_budget=None), **BUDGET_RUN)
    budget = 40 * _one_row_bytes(full)  # about 40 steps of rows at the end of the run
    held_bytes.clear()
    recwarn.clear()
    part = lm.generate("Keep the newest", max_new_tokens=200, seeds=[3, 4], record=dl.Record(**record,
                       memory_budget=budget), **BUDGET_RUN)
    assert len(held_bytes) == 200 and max(held_bytes) <= budget  # the recording never held more than the budget
    warned = [w for w in recwarn if issubclass(w.category, dl.errors.RecordBudgetWarning)]
    assert len(warned) == 1
    assert "memory_budget=" in str(warned[0].message) and "oldest" in str(warned[0].message)
    assert "Record(memory_budget='4GiB'" in str(warned[0].message)  # how to raise it
    assert warned[0].filename == __file__  # shown at the user's generate line

    dropped = part.attention_dropped
    assert 100 < dropped < 200 - 20 and part.memory_budget == budget and full.attention_dropped == 0
    # the run itself is unchanged, and the rows kept are exactly those of the run without a budget
    assert part.token_ids == full.token_ids and part.texts == full.texts
    for name in full.arrays:
        if name != "attention":
            np.testing.assert_array_equal(part.arrays[name], full.arrays[name], err_msg=name)
    np.testing.assert_array_equal(part.arrays["attention"], full.arrays["attention"][dropped:])
    assert part.arrays["attention"].nbytes <= budget
    # the frames say which steps lack them; asking for one is a clear error
    has = part.steps.groupby("step").has_attention.first()
    assert not has[:dropped].any() and has[dropped:].all() and full.steps.has_attention.all()
    with pytest.raises(dl.errors.AttentionDroppedError, match=f"step 3 has no attention rows: the rows of steps "
                                                             f"0-{dropped - 1} were dropped"):
        part.attention_weights(3)
    np.testing.assert_array_equal(part.attention_weights(dropped + 5, row=1), full.attention_weights(dropped + 5, row=1))
    frame = part.attention_frame(mean_over=("head", "layer"))
    assert frame.step.min() == dropped
    pd_equal(frame, full.attention_frame(steps=range(dropped, 200), mean_over=("head", "layer")))
    row = part.row(1)
    assert row.attention_dropped == dropped and row.steps.has_attention.sum() == 200 - dropped
    np.testing.assert_array_equal(row.attention_weights(199), full.row(1).attention_weights(199))
    # saved and loaded: the rows kept, the steps that lack them, the budget
    back = dl.Trace.load(part.save(tmp_path / "budget.parquet"))
    assert back.attention_dropped == dropped and back.memory_budget == budget
    np.testing.assert_array_equal(back.arrays["attention"], part.arrays["attention"])
    pd_equal(back.steps, part.steps)


def pd_equal(a, b):
    import pandas as pd

    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def test_a_4000_step_run_stays_within_the_budget(tokenizer, held_bytes, recwarn, timing):
    """Attention on every layer and head for 4,000 steps: 128 MB of rows kept whole (each step's row is as wide as
    its context, so the rows grow with the square of the run); under an 8 MiB budget the recording holds at most
    that, the newest steps' rows."""
    import time

    from tests.conftest import make_tiny

    lm = dl.LM(make_tiny("llama", tokenizer, vocab_size=64, max_position_embeddings=4200), tokenizer, name="tiny-64")
    budget = 8 * 2**20
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's steps are too small to share out: threads only wait on each other
    try:
        start = time.perf_counter()
        trace = lm.generate_ids(torch.tensor([[1, 5, 9, 12]]), "four ids", max_new_tokens=4000, seed=0,
                                record=dl.Record(attention=True, memory_budget=budget), **BUDGET_RUN)
        timing("4,000 tiny steps with attention under an 8 MiB budget", time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert trace.num_steps == 4000 and len(held_bytes) == 4000
    assert max(held_bytes) <= budget
    row = 2 * 4 * 2  # bytes of one position of a step's rows: 2 layers, 4 heads, float16
    assert sum(row * (4 + s) for s in range(4000)) > 15 * budget  # what keeping every row would take
    kept = 4000 - trace.attention_dropped
    assert trace.arrays["attention"].nbytes <= budget and kept >= 0.5 * budget / (row * 4003)
    assert trace.steps.has_attention.sum() == kept
    assert len([w for w in recwarn if issubclass(w.category, dl.errors.RecordBudgetWarning)]) == 1
    np.testing.assert_allclose(trace.attention_weights(3999).sum(-1), 1.0, atol=2e-3)  # real attention, kept


def test_session_within_budget_rewinds_and_forks(tiny_lms, recwarn):
    """A session keeps the newest rows too; a rewind before the first kept step brings rows back for the steps
    taken again, and a fork keeps its own."""
    lm = tiny_lms["llama"]
    words = dict(do_sample=True, seed=5, eos_token_id=[])
    ref = lm.generate("A session", max_new_tokens=150, progress=False, record=dl.Record(attention=True,
                      memory_budget=None), **words)
    budget = 30 * _one_row_bytes(ref)
    s = lm.session("A session", record=dl.Record(attention=True, memory_budget=budget), **words)
    held = []
    for _ in range(150):
        s.step()
        held.append(s.recording.attention_nbytes())
        if len(held) % 50 == 0:
            assert s.trace.num_steps == len(held)  # the trace rebuilt along the way, as a widget does
    assert max(held) <= budget
    tr = s.trace
    dropped = tr.attention_dropped
    assert 0 < dropped < 150 and tr.token_ids == ref.token_ids
    np.testing.assert_array_equal(tr.arrays["attention"], ref.arrays["attention"][dropped:])
    assert len([w for w in recwarn if issubclass(w.category, dl.errors.RecordBudgetWarning)]) == 1
    child = s.fork()
    s.rewind(10)
    for _ in range(5):
        s.step()
    again = s.trace
    assert again.num_steps == 15 and again.attention_dropped == 10  # steps 10-14 have rows again
    width = len(ref.prompt_ids) + 14
    np.testing.assert_array_equal(again.arrays["attention"], ref.arrays["attention"][10:15, ..., :width])
    assert child.trace.token_ids == ref.token_ids and child.trace.attention_dropped == dropped
    np.testing.assert_array_equal(child.trace.arrays["attention"], ref.arrays["attention"][dropped:])


def test_beam_search_within_budget(tiny_lms):
    lm = tiny_lms["qwen2"]
    words = dict(num_beams=3, num_return_sequences=2, max_new_tokens=60, eos_token_id=[], progress=False)
    full = lm.generate("Beams", record=dl.Record(attention=True, memory_budget=None), **words)
    budget = 20 * 3 * _one_row_bytes(full) // 2  # per step the recording holds the 3 beams' rows
    with pytest.warns(dl.errors.RecordBudgetWarning):
        part = lm.generate("Beams", record=dl.Record(attention=True, memory_budget=budget), **words)
    dropped = part.attention_dropped
    assert 0 < dropped < 60 and part.token_ids == full.token_ids
    np.testing.assert_array_equal(part.arrays["attention"], full.arrays["attention"][dropped:])
    assert not part.steps.has_attention[part.steps.step < dropped].any()


def test_attention_dropped_error_is_a_decoderlab_lookup_error():
    assert issubclass(dl.errors.AttentionDroppedError, dl.DecoderlabError)
    assert issubclass(dl.errors.AttentionDroppedError, LookupError)
    assert issubclass(dl.errors.RecordBudgetWarning, UserWarning)


def test_a_fork_keeps_its_steps_when_the_parent_rewinds_and_writes_over_them(tiny_lms):
    """A fork shares its parent's host buffers; a parent that rewinds and steps again, with no trace of either alive,
    must copy them before writing, not overwrite the rows the fork already holds (it did: the fork's trace showed
    the parent's new tokens)."""
    import gc

    lm = tiny_lms["llama"]
    s = lm.session("Hello there", do_sample=True, seed=1, eos_token_id=[])
    for _ in range(10):
        s.step()
    mine = s.trace.token_ids
    child = s.fork()
    s._trace = None  # no trace of the parent alive: nothing but the fork holds the shared rows
    gc.collect()
    s.rewind(5)
    forced = next(i for i in range(100) if i not in mine)
    for _ in range(3):
        s.choose(token=forced)
    assert s.trace.token_ids == mine[:5] + [forced] * 3
    assert child.trace.token_ids == mine


def test_host_buffers_are_sized_once_for_a_run_of_known_length(tiny_lms, monkeypatch):
    """A generate run knows the most steps it can take: its host buffers are allocated for all of them once a
    quarter is done, instead of doubling (each move copies everything so far, and the attention buffer's moves
    were most of a long GPU run's recording time), and record the same numbers as buffers that double."""
    import numpy as np

    import decoderlab.record.host as host_mod

    lm = tiny_lms["llama"]
    opts = dict(max_new_tokens=150, eos_token_id=[], progress=False, record=dl.Record(attention=True, logits=True))
    sizes = []
    resize = host_mod.HostArrays._resize

    def spy(self, capacity):
        sizes.append((self.expected, capacity))
        return resize(self, capacity)

    monkeypatch.setattr(host_mod.HostArrays, "_resize", spy)
    sized = lm.generate("Hello there", **opts)
    assert sizes == [(150, 150)]  # the first chunk (64 steps) is past a quarter of 150: room for all at once
    monkeypatch.setattr(host_mod.HostArrays, "_capacity_for", lambda self, steps: max(2 * steps, 64))
    sizes.clear()
    doubled = lm.generate("Hello there", **opts)
    assert [c for _, c in sizes] == [128, 300]  # at 64 steps, at 128, and for the last 22 at the end
    for name in doubled.arrays:
        np.testing.assert_array_equal(sized.arrays[name], doubled.arrays[name], err_msg=name)


def test_capacity_never_passes_the_steps_a_run_can_take():
    from decoderlab.record.host import HostArrays

    host = HostArrays(1, 5, expected=1000)
    assert [host._capacity_for(s) for s in (1, 64, 200, 250, 999, 1000, 1001)] == \
        [64, 128, 400, 1000, 1000, 1000, 2002]
    assert HostArrays(1, 5)._capacity_for(100) == 200


def test_a_rewritten_step_keeps_no_stale_attention_beyond_its_new_row():
    """The host buffer zeroes only what a step wrote before (not the slot's whole width, which touched every page
    of a wide buffer): a step written again with a narrower row (a rewind) shows zeros past it."""
    from types import SimpleNamespace

    import numpy as np

    from decoderlab.record.host import HostArrays

    def rec(widths):
        rows = [torch.full((1, 2, 3, w), float(w), dtype=torch.float16) for w in widths]
        return SimpleNamespace(columns={"token_id": [torch.tensor([i]) for i in range(len(widths))]},
                               row_ids=[None] * len(widths), attention=rows, residuals=[None] * len(widths),
                               _att_first=0)

    host = HostArrays(1, 4)
    host.update(rec([4, 5, 6]), 3)
    assert list(host.att_written[:3]) == [4, 5, 6]
    host.forget(1)
    host.update(rec([4, 2, 3]), 3)
    att = host.views(3)["attention"]
    assert att.shape == (3, 1, 2, 3, 6)
    np.testing.assert_array_equal(att[1, 0, 0, 0], [2, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(att[2, 0, 0, 0], [3, 3, 3, 0, 0, 0])
    np.testing.assert_array_equal(att[0, 0, 0, 0], [4, 4, 4, 4, 0, 0])


def test_an_lm_fixes_the_heaps_mmap_threshold_once_where_glibc_runs(tiny_lms):
    """Large blocks come from mmap from the first LM on (a long CPU run's heap fragmented without it: record/heap.py);
    the answer is the same on every call, and False where there is no glibc to ask."""
    import platform

    from decoderlab.record import heap

    glibc = platform.libc_ver()[0] == "glibc"
    assert heap.keep_large_allocations_apart() is glibc
    assert heap.keep_large_allocations_apart() is glibc and heap._done is glibc
