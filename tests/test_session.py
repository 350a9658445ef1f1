"""Session: step, choose, rewind, fork; score; all checked against the model itself."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import decoderlab as dl
from decoderlab.backends.session import SessionError


@pytest.fixture
def lm(tiny_lms):
    return tiny_lms["llama"]


def test_step_and_run_match_generate(lm):
    full = lm.generate("Once upon a time", max_new_tokens=10, eos_token_id=[], progress=False)
    s = lm.session("Once upon a time", max_new_tokens=10, eos_token_id=[])
    first = s.step()
    assert len(first) == 1 and first.token_id[0] == full.token_ids[0]
    s.step(4)
    rest = s.run()
    assert len(rest) == 5
    assert s.trace.token_ids == full.token_ids
    np.testing.assert_allclose(s.trace.steps.logprob, full.steps.logprob, atol=1e-5)


def test_rewind_then_step_reproduces_tokens_and_logits(lm):
    s = lm.session("The weather today", do_sample=True, top_k=40, seed=5, max_new_tokens=12,
                   record=dl.Record(logits=True))
    s.step(8)
    before = s.trace
    s.rewind(to=3)
    assert s.steps == 3 and s.trace.token_ids == before.token_ids[:3]
    s.step(5)
    after = s.trace
    assert after.token_ids == before.token_ids
    np.testing.assert_allclose(after.arrays["logits"].astype(np.float32), before.arrays["logits"].astype(np.float32),
                               atol=2e-3)
    np.testing.assert_allclose(after.steps.logprob, before.steps.logprob, atol=1e-5)
    # the cache was cropped, not rebuilt: its length is prompt + steps - 1 (the last token is pending)
    assert s.state.cache.get_seq_length() == len(after.prompt_ids) + 8 - 1


def test_rewind_to_zero_and_cache_state(lm):
    s = lm.session("Rewind to the start", max_new_tokens=6, eos_token_id=[])
    s.step(6)
    want = s.trace.token_ids
    s.rewind(to=0)
    assert s.steps == 0 and s.trace.num_steps == 0
    s.run()
    assert s.trace.token_ids == want


def test_choose_rank_and_token_records_models_probability(lm):
    s = lm.session("Pick a colour:", max_new_tokens=5)
    cands = s.candidates(k=5)
    row = s.choose(rank=2)
    assert bool(row.forced[0]) and row.token_id[0] == cands.token_id[2]
    assert row.prob[0] == pytest.approx(cands.prob[2], rel=1e-5)
    assert row["rank"][0] == 2
    # any vocabulary token, by text: its probability is the model's for that token
    logits = s._next_logits()[0]
    target = lm.tokenizer(" blue", add_special_tokens=False).input_ids
    assert len(target) == 1
    row = s.choose(token=" blue")
    assert row.token_id[0] == target[0]
    assert row.prob[0] == pytest.approx(torch.softmax(logits, -1)[target[0]].item(), rel=1e-5)
    assert s.trace.steps.choice.tolist() == ["forced", "forced"]


def test_choose_rejects_bad_requests(lm):
    s = lm.session("Bad choices", max_new_tokens=5)
    with pytest.raises(SessionError, match="exactly one"):
        s.choose()
    with pytest.raises(SessionError, match="rank"):
        s.choose(rank=-1)
    with pytest.raises(SessionError, match="tokens"):
        s.choose(token="antidisestablishmentarianism and more")
    with pytest.raises(SessionError, match="vocabulary"):
        s.choose(token=10**9)
    s.step(2)
    with pytest.raises(SessionError, match="rewind"):
        s.rewind(to=5)
    assert s.steps == 2  # nothing recorded was lost


def test_fork_is_independent_and_tree_lists_branches(lm):
    s = lm.session("A fork in the road", max_new_tokens=10, eos_token_id=[])
    s.step(3)
    b = s.fork()
    b.choose(rank=1)
    b.step(2)
    s.step(3)
    assert s.trace.token_ids[:3] == b.trace.token_ids[:3]
    assert s.trace.token_ids[3] != b.trace.token_ids[3]
    tree = s.tree
    assert tree.branch.tolist() == [0, 1]
    assert tree.parent.tolist()[1] == 0 and tree.fork_step.tolist()[1] == 3
    assert (b.trace.steps.branch == 1).all() and (s.trace.steps.branch == 0).all()
    # the parent's continuation equals an undisturbed run: the fork shared nothing mutable
    ref = lm.generate("A fork in the road", max_new_tokens=6, eos_token_id=[], progress=False)
    assert s.trace.token_ids == ref.token_ids
    c = s.fork(at=1)
    assert c.steps == 1 and c.fork_step == 1 and len(s.branches) == 3


def test_session_attention_and_lens_survive_rewind(lm):
    s = lm.session("Attention in sessions", max_new_tokens=8, record=dl.Record(attention=True, lens=True))
    s.step(5)
    att = s.trace.attention_weights(4).copy()
    lens = s.trace.lens.copy()
    s.rewind(to=2)
    s.step(3)
    np.testing.assert_allclose(s.trace.attention_weights(4), att, atol=1e-3)
    assert s.trace.lens.token_id.tolist() == lens.token_id.tolist()


def test_score_reproduces_greedy_trace(lm):
    trace = lm.generate("Score this", max_new_tokens=8, eos_token_id=[], progress=False)
    scored = lm.score("Score this", trace.token_ids)
    assert scored.token_ids == trace.token_ids
    np.testing.assert_allclose(scored.steps.prob, trace.steps.prob, rtol=1e-4)
    np.testing.assert_allclose(scored.steps.entropy, trace.steps.entropy, rtol=1e-4, atol=1e-5)
    assert (scored.steps["rank"] == 0).all()
    assert scored.candidates.token_id.tolist() == trace.candidates.token_id.tolist()
    assert (scored.steps.choice == "given").all()


def test_score_with_text_and_errors(lm):
    t = lm.score("The sky is", " blue and wide")
    assert "".join(t.tokens) == " blue and wide"
    with pytest.raises(dl.PromptError):
        lm.score("The sky is", "")


@pytest.mark.integration
def test_smollm2_session_and_score(smol):
    trace = smol.generate("What is the capital of France?", chat=True, max_new_tokens=12, progress=False)
    scored = smol.score("What is the capital of France?", trace.token_ids, chat=True)
    np.testing.assert_allclose(scored.steps.prob, trace.steps.prob, rtol=1e-3)
    s = smol.session("What is the capital of France?", chat=True, max_new_tokens=12)
    s.run()
    assert s.text == trace.text
    s.rewind(to=5)
    row = s.choose(token=" Lyon")
    assert row.token[0] == " Lyon" and bool(row.forced[0])
    s.run()
    assert "Lyon" in s.text
    # A bare word that is not among the likely candidates and is two tokens without its space ('ban', 'ana'):
    # chosen as it would continue the text, ' banana', one token (it used to be refused).
    s.rewind(to=5)
    assert " banana" not in s.candidates(k=50).token.tolist() and len(smol.tokenizer("banana").input_ids) > 1
    row = s.choose(token="banana")
    assert row.token[0] == " banana"


def test_tree_columns_are_integers(lm):
    s = lm.session("Tree dtypes", max_new_tokens=4)
    s.step(2)
    s.fork()
    tree = s.tree
    assert str(tree.parent.dtype) == "Int64" and str(tree.fork_step.dtype) == "Int64"
    assert tree.parent.isna().tolist() == [True, False] and tree.fork_step.tolist()[1] == 2


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_rewind_past_a_sliding_window(tiny_lms, arch):
    """Sliding-window layers (window 8) overflowed before the rewind: cropping must still be exact."""
    lm = tiny_lms[arch]
    ref = lm.generate("one two three four five six", max_new_tokens=14, eos_token_id=[], progress=False,
                      record=dl.Record(attention=True))
    s = lm.session("one two three four five six", max_new_tokens=14, eos_token_id=[],
                   record=dl.Record(attention=True))
    s.step(14)
    assert s.trace.token_ids == ref.token_ids
    s.rewind(to=3)
    s.step(11)
    s.rewind(to=9)
    s.step(5)
    assert s.trace.token_ids == ref.token_ids
    np.testing.assert_allclose(s.trace.steps.logprob, ref.steps.logprob, atol=1e-4)
    for step in (3, 12):
        np.testing.assert_allclose(s.trace.attention_weights(step), ref.attention_weights(step), atol=2e-3)


def test_model_default_sampling_gets_a_seed(tokenizer):
    from transformers import GenerationConfig

    from tests.conftest import make_tiny

    model = make_tiny("llama", tokenizer, seed=4)
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.9, top_p=0.9, bos_token_id=1,
                                               eos_token_id=2, pad_token_id=2)
    s = dl.LM(model, tokenizer).session("Sampling by default", eos_token_id=[])
    assert s.strategy.do_sample and s.strategy.seed is not None
    s.step(4)
    first = s.trace.token_ids
    s.rewind(to=0)
    s.step(4)
    assert s.trace.token_ids == first


def test_failed_step_leaves_the_session_as_it_was(lm):
    from transformers import LogitsProcessor

    class Flaky(LogitsProcessor):
        calls = 0

        def __call__(self, ids, scores):
            Flaky.calls += 1
            if Flaky.calls == 3:
                raise RuntimeError("flaky")
            return scores

    s = lm.session("Flaky processors", do_sample=True, seed=3, eos_token_id=[], logits_processor=[Flaky()],
                   record=dl.Record(attention=True))
    s.step(2)
    with pytest.raises(RuntimeError, match="flaky"):
        s.step()
    assert s.steps == 2 and s.trace.num_steps == 2
    s.step(4)
    a = s.trace.token_ids
    s.rewind(to=4)
    s.step(2)
    assert s.trace.token_ids == a
    ref = lm.session("Flaky processors", do_sample=True, seed=3, eos_token_id=[], record=dl.Record(attention=True))
    ref.step(6)
    assert ref.trace.token_ids == a  # the failed step drew nothing
    np.testing.assert_allclose(s.trace.attention_weights(2), ref.trace.attention_weights(2), atol=1e-3)


def test_context_window_in_step_and_choose(tokenizer):
    from tests.conftest import make_tiny

    lm = dl.LM(make_tiny("llama", tokenizer, max_position_embeddings=12), tokenizer)
    s = lm.session("one two three four five", eos_token_id=[])
    room = 12 - s.state.prompt_length
    rows = s.step(50)
    assert len(rows) == room and s.state.stop_reason == "context_window"
    with pytest.raises(SessionError, match="context window"):
        s.choose(rank=0)
    s.rewind(to=room - 1)
    assert len(s.choose(rank=0)) == 1


def test_choose_token_text_matching(lm):
    s = lm.session("The list:", max_new_tokens=5)
    cands = s.candidates(k=50)
    spaced = cands[cands.token.str.startswith(" ") & (cands.token.str.len() > 2)].iloc[0]
    bare = spaced.token[1:]
    if not (cands.token == bare).any():  # the bare word continues the text with its leading space
        assert s.choose(token=bare).token_id[0] == spaced.token_id
        s.rewind(to=0)
    space_id = lm.tokenizer(" ", add_special_tokens=False).input_ids
    assert len(space_id) == 1
    assert s.choose(token=" ").token_id[0] == space_id[0]  # exactly " ", never a longer run of spaces


def test_failed_fork_adds_no_branch(lm):
    s = lm.session("No phantom branches", max_new_tokens=5)
    s.step(2)
    for at in (99, -1):
        with pytest.raises(SessionError, match="fork"):
            s.fork(at=at)
    assert len(s.branches) == 1 and len(s.tree) == 1


def test_a_kept_trace_never_changes_and_incremental_arrays_equal_a_rebuild(tiny_lms):
    """Sessions convert each step to the host once and reuse the buffers; a trace taken earlier must stay
    exactly as it was through later steps, rewinds and forks, and every trace must equal one built afresh."""
    import numpy as np

    lm = tiny_lms["mistral"]  # a sliding window too
    s = lm.session("Once upon a time", record=dl.Record(attention=True, lens=True), do_sample=True, seed=5)
    s.step(6)
    kept = s.trace
    snapshot = {k: np.array(v, copy=True) for k, v in kept.arrays.items()}
    s.rewind(2)
    s.choose(rank=3)
    s.step(5)
    child = s.fork(at=4)
    child.step(3)
    s.step(2)
    for name, before in snapshot.items():
        np.testing.assert_array_equal(kept.arrays[name], before, err_msg=name)
    for branch in (s, child):
        incremental = branch.trace.arrays
        branch.recording._host = None  # rebuild every array from the recorded tensors
        branch._trace = None
        fresh = branch.trace.arrays
        assert incremental.keys() == fresh.keys()
        for name in fresh:
            np.testing.assert_array_equal(incremental[name], fresh[name], err_msg=name)


def test_a_slice_kept_without_its_trace_never_changes(tiny_lms):
    import numpy as np

    lm = tiny_lms["llama"]
    s = lm.session("Once upon a time", record=dl.Record(attention=True), do_sample=True, seed=2)
    s.step(6)
    piece = s.trace.arrays["token_id"][:, 0]  # the trace itself is dropped at the next rewind
    attention = s.trace.arrays["attention"][:, 0, 0, 0]
    before, att_before = piece.copy(), attention.copy()
    s.rewind(1)
    s.choose(rank=4)
    s.step(4)
    assert s.trace.token_ids[1] != before[1]  # the rows were written again ...
    np.testing.assert_array_equal(piece, before)  # ... but not under the slice
    np.testing.assert_array_equal(attention, att_before)


def test_one_seed_one_trace_across_generate_session_and_compare(tiny_lms):
    """Determinism: the same seed and inputs give the same steps, whichever way the run is made and how often."""
    lm = tiny_lms["gpt2"]
    words = dict(do_sample=True, top_k=30, temperature=0.9, eos_token_id=[])
    first = lm.generate("Same seed, same trace", seed=11, max_new_tokens=10, progress=False, **words)
    again = lm.generate("Same seed, same trace", seed=11, max_new_tokens=10, progress=False, **words)
    session = lm.session("Same seed, same trace", seed=11, max_new_tokens=10, **words)
    session.run()
    cmp = dl.compare(lm, "Same seed, same trace", {"s": words}, seeds=[7, 11], max_new_tokens=10, progress=False)
    cols = ["step", "token_id", "token", "logprob", "final_logprob", "entropy", "chosen_rank"]
    cols = [c for c in cols if c in first.steps]
    for other in (again, session.trace, cmp.trace("s", seed=11)):
        pd.testing.assert_frame_equal(other.steps[cols].reset_index(drop=True),
                                      first.steps[cols].reset_index(drop=True), atol=1e-5, rtol=0)


def test_a_rewind_that_changes_nothing_keeps_the_trace(lm):
    """rewind(to=steps) is a no-op: the branch's trace is not rebuilt (a widget calls it freely)."""
    s = lm.session("Once upon a time", max_new_tokens=6)
    s.step(3)
    before = s.trace
    assert s.rewind(3) is s and s.trace is before
    s.rewind(1)
    assert s.trace is not before and s.steps == 1
