"""Rows end to end: several seeds of one strategy as rows of one batch, each row exactly the run made alone."""
from __future__ import annotations

import pytest
import torch

import decoderlab as dl
from decoderlab.engine import loop

PROMPT = "Once upon a time, in a land far away,"
SEEDS = [3, 11, 42, 7]
WORDS = dict(do_sample=True, top_k=40, temperature=1.2)
N = 14


def alone_hf(lm, ids, seed, **words):
    """What `torch.manual_seed(s)` + `model.generate` draws, as generated ids (EOS included)."""
    torch.manual_seed(seed)
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), **words)
    return out[0, ids.shape[1]:].tolist()


def eos_that_ends_rows(lm, prompt, seeds, words, n):
    """EOS ids drawn from the seeds' own runs (a token seen early in one run, another later in a second run),
    so that rows end at different steps and some run to the limit: found, not hard-coded."""
    runs = [lm.generate(prompt, seed=s, max_new_tokens=n, eos_token_id=[], progress=False, **words).token_ids
            for s in seeds]
    return sorted({runs[0][2], runs[1][n // 2]})


def report_near_tie(lm, prompt, seed, row_trace, alone_trace):
    """Where a row and its run alone part ways: the step and the raw-logit margin there (for the message)."""
    for s, (a, b) in enumerate(zip(row_trace.token_ids, alone_trace.token_ids)):
        if a != b:
            st = alone_trace.steps.iloc[s]
            return f"seed {seed} parts at step {s}: {a} vs {b}, alone p={st.prob:.4g}"
    return f"seed {seed}: lengths {len(row_trace.token_ids)} vs {len(alone_trace.token_ids)}"


def check_rows_match_alone(lm, prompt, seeds, words, n):
    eos = eos_that_ends_rows(lm, prompt, seeds, words, n)
    ids, _ = lm.encode(prompt)
    trace = lm.generate(prompt, seeds=seeds, max_new_tokens=n, eos_token_id=eos, progress=False, **words)
    assert trace.rows == len(seeds)
    runs = trace.runs
    assert runs.seed.tolist() == seeds
    for i, seed in enumerate(seeds):
        alone = lm.generate(prompt, seed=seed, max_new_tokens=n, eos_token_id=eos, progress=False, **words)
        row = trace.row(i)
        assert row.token_ids == alone.token_ids, report_near_tie(lm, prompt, seed, row, alone)
        assert row.token_ids == alone_hf(lm, ids, seed, max_new_tokens=n, eos_token_id=eos,
                                         pad_token_id=eos[0], **words)
        assert row.text == alone.text
        assert row.stop_reason == alone.stop_reason == runs.stop_reason[i]
        assert runs.length[i] == len(alone.token_ids)
        # the row's recorded numbers are the run's alone, to float rounding of a batched forward
        assert row.steps.logprob.to_numpy() == pytest.approx(alone.steps.logprob.to_numpy(), abs=2e-4)
        assert row.steps.final_logprob.to_numpy() == pytest.approx(alone.steps.final_logprob.to_numpy(), abs=2e-4)
    assert "eos" in runs.stop_reason.tolist(), "the EOS picked from the runs should end at least one row"
    return trace


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_each_row_draws_what_its_seed_draws_alone(tiny_lms, arch):
    check_rows_match_alone(tiny_lms[arch], PROMPT, SEEDS, WORDS, N)


@pytest.mark.integration
def test_rows_match_alone_on_smollm2(smol):
    check_rows_match_alone(smol, "Write one sentence about the sea.", [1, 2, 3], dict(do_sample=True, top_p=0.95), 24)


def test_finished_rows_leave_the_batch(tiny_lms):
    """A row that reached EOS is not forwarded again while other rows run on."""
    lm = tiny_lms["llama"]
    eos = eos_that_ends_rows(lm, PROMPT, SEEDS, WORDS, N)
    ids, _ = lm.encode(PROMPT)
    strat = lm.strategy(ids.shape[1], max_new_tokens=N, eos_token_id=eos, **WORDS)

    class BatchSizes:
        keep_stages = False

        def __init__(self):
            self.sizes = []

        def before_forward(self, state, step):
            self.sizes.append(state.rows)

        def on_step(self, ctx):
            pass

    seen = BatchSizes()
    state = loop.prefill(lm.model, ids.expand(len(SEEDS), -1), strat, [seen], seeds=SEEDS)
    loop.run(lm.model, state, strat, [seen])
    ended = {r for r, seq in state.retired.items()}
    assert ended, "some rows should have ended at EOS"
    assert seen.sizes[0] == len(SEEDS)
    assert min(seen.sizes) <= len(SEEDS) - len(ended)
    assert seen.sizes == sorted(seen.sizes, reverse=True)  # rows only ever leave
    seqs = state.sequences()
    assert len(seqs) == len(SEEDS)
    for r in ended:
        assert int(seqs[r][-1]) in eos


def test_rows_frames_hold_only_running_steps(tiny_lms, tmp_path):
    lm = tiny_lms["qwen2"]
    eos = eos_that_ends_rows(lm, PROMPT, SEEDS, WORDS, N)
    trace = lm.generate(PROMPT, seeds=SEEDS, max_new_tokens=N, eos_token_id=eos, progress=False,
                        record=dl.Record(attention=True, lens=True), **WORDS)
    lengths = trace.runs.length.tolist()
    assert trace.steps.groupby("row").size().tolist() == lengths
    assert (trace.candidates.groupby("row").step.nunique().tolist()) == lengths
    assert trace.lens_stats.groupby("row").step.nunique().tolist() == lengths
    assert trace.attention_frame(mean_over=("head", "layer")).groupby("row").step.nunique().tolist() == lengths
    for i in range(trace.rows):
        row = trace.row(i)
        assert row.num_steps == lengths[i] and row.rows == 1
        # a row's attention and lens are the batch's, for that row
        assert row.attention_weights(0).shape == trace.attention_weights(0, row=i).shape
        assert (row.lens_stats.chosen_rank.to_numpy()
                == trace.lens_stats[trace.lens_stats.row == i].chosen_rank.to_numpy()).all()
    back = dl.Trace.load(trace.save(tmp_path / "rows.parquet"))
    assert back.runs.equals(trace.runs)
    assert back.steps.drop(columns="why").equals(trace.steps.drop(columns="why"))


def test_streaming_takes_a_row(tiny_lms):
    lm = tiny_lms["llama"]
    got = []
    trace = lm.generate(PROMPT, seeds=SEEDS[:3], max_new_tokens=6, progress=False, stream_row=2,
                        on_token=lambda step, text: got.append((step, text)), **WORDS)
    assert [t for _, t in got] == trace.row(2).tokens
    assert [s for s, _ in got] == list(range(len(got)))


def test_bad_rows_requests_are_clear(tiny_lms):
    lm = tiny_lms["llama"]
    with pytest.raises(dl.StrategyError, match="seed= .* or seeds="):
        lm.generate(PROMPT, seed=1, seeds=[1, 2], **WORDS)
    with pytest.raises(dl.StrategyError, match="seeds="):
        lm.generate(PROMPT, seeds=[], **WORDS)
    with pytest.raises(dl.StrategyError, match="seeds="):
        lm.generate(PROMPT, seeds=["a"], **WORDS)
    with pytest.raises(dl.PromptError, match="stream_row"):
        lm.generate(PROMPT, seeds=[1, 2], stream_row=2, **WORDS)
    with pytest.raises(dl.SessionError, match="one sequence"):
        lm.session(PROMPT, seeds=[1, 2], **WORDS)
    trace = lm.generate(PROMPT, seeds=[1, 2], max_new_tokens=3, progress=False, **WORDS)
    with pytest.raises(IndexError, match="row 2"):
        trace.row(2)
