"""DoLa equals a computation written out by hand: per step, a full forward without a cache, every layer's
hidden state unembedded, transformers 4.x's JS divergence, relative-top filter and contrast, the
processors (built here), and the argmax or a seeded draw. Every intermediate is compared with the trace."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper

import decoderlab as dl
from conftest import make_tiny
from decoderlab.engine.rules import dola
from decoderlab.engine import loop
from decoderlab.engine.rules.dola import premature_layers
from decoderlab.record import Recording

PROMPT = "The quick brown fox"
STEPS = 4


@dl.recorder("test_dola_scores")
def _scores(ctx, opts):
    """The step's processed scores, whole (the built-in recorders keep only the chosen token's)."""
    return {"test_dola_scores": ctx.scores.clone()}


@pytest.fixture(scope="module")
def models(tiny_lms, tokenizer):
    """Untied and tied embeddings, shallow (2 layers: the reference's special cases) and 12 layers."""
    gpt2 = {}
    for n in (2, 12):
        m = make_tiny("gpt2", tokenizer, n_layer=n)
        # make_tiny scales the tied unembedding by 4, which leaves one token past the relative-top filter;
        # 0.8 of that keeps tens to hundreds, so the filter and the processors have something to act on
        with torch.no_grad():
            m.get_input_embeddings().weight.mul_(0.8)
        gpt2[n] = dl.LM(m, tokenizer, name=f"tiny-gpt2-{n}")
    llama12 = dl.LM(make_tiny("llama", tokenizer, num_hidden_layers=12), tokenizer, name="tiny-llama-12")
    return {"llama2": tiny_lms["llama"], "llama12": llama12, "gpt2_2": gpt2[2], "gpt2_12": gpt2[12]}


def tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def hand_candidates(model, spec) -> list[int]:
    """transformers 4.x's rule, from the config: every second layer of the lower / upper half, from layer 2
    (1 for 2 layers) when the embeddings are tied; a list as given."""
    n = model.config.num_hidden_layers
    start = 0 if not tied(model) else 2 if n > 2 else 1 if n == 2 else 0
    if spec == "low":
        return [start] if start == n // 2 else list(range(start, n // 2 if n <= 40 else 20, 2))
    if spec == "high":
        return list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
    return list(spec)


EXPECTED = {  # hand_candidates, spelled out
    ("llama2", "low"): [0], ("llama2", "high"): [1],
    ("llama12", "low"): [0, 2, 4], ("llama12", "high"): [6, 8, 10],
    ("gpt2_2", "low"): [1], ("gpt2_2", "high"): [1],
    ("gpt2_12", "low"): [2, 4], ("gpt2_12", "high"): [6, 8, 10],
}


@torch.no_grad()
def hand_dola(model, ids, layers, steps, processors=(), seed=None):
    """DoLa by hand, one full forward per step over the growing sequence (no cache)."""
    head = model.get_output_embeddings()
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    out_steps = []
    for _ in range(steps):
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        final = out.logits[0, -1].float()
        lp = torch.log_softmax(final, -1)
        p = lp.exp()
        js, prem_lp = [], {}
        for layer in layers:
            # the premature distribution: the output layer on the layer's last position, no final norm
            lq = torch.log_softmax(head(out.hidden_states[layer][0, -1]), -1)
            prem_lp[layer] = lq
            m = 0.5 * (p + lq.exp())
            # transformers' "JS": F.kl_div(input, target) is target * (log target - input), averaged over V
            kl1 = (torch.xlogy(m, m) - m * lp).mean()
            kl2 = (torch.xlogy(m, m) - m * lq).mean()
            js.append(0.5 * (kl1 + kl2))
        js = torch.stack(js)
        layer = layers[int(js.argmax())]
        keep = lp >= lp.max() + math.log(0.1)  # relative top 0.1
        dola = torch.where(keep, lp - prem_lp[layer], torch.tensor(-math.inf))
        scores = dola[None].clone()
        for proc in processors:
            scores = proc(ids, scores)
        if gen is None:
            token = int(scores[0].argmax())
        else:
            token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=gen))
        out_steps.append(dict(final=final, js=js, layer=layer, keep=keep, dola=dola, scores=scores[0], token=token))
        ids = torch.cat([ids, torch.tensor([[token]])], dim=-1)
    return out_steps


def check_trace(trace, hand, candidates):
    a = trace.arrays
    assert trace.strategy["dola_candidate_layers"] == candidates
    assert trace.token_ids == [h["token"] for h in hand]
    assert a["dola_layer"].dtype == np.int64 and a["dola_layer"].shape == (len(hand), 1)
    assert a["dola_layer"][:, 0].tolist() == [h["layer"] for h in hand]
    assert a["dola_divergence"].dtype == np.float32 and a["dola_divergence"].shape == (len(hand), 1, len(candidates))
    for s, h in enumerate(hand):
        np.testing.assert_allclose(a["dola_divergence"][s, 0], h["js"].numpy(), rtol=1e-4, atol=1e-12)
        recorded = torch.from_numpy(a["test_dola_scores"][s, 0])
        # the relative-top filter kept the same tokens, and the processed DoLa scores agree on them
        assert torch.equal(torch.isfinite(recorded), torch.isfinite(h["scores"]))
        assert torch.equal(torch.isfinite(recorded), h["keep"])
        fin = h["keep"]
        torch.testing.assert_close(recorded[fin], h["scores"][fin], atol=1e-4, rtol=1e-5)
        t = h["token"]
        # raw = the model's final logits; final = the processed DoLa scores
        assert trace.steps.logprob[s] == pytest.approx(torch.log_softmax(h["final"], -1)[t].item(), abs=1e-4)
        assert trace.steps.final_logprob[s] == pytest.approx(torch.log_softmax(h["scores"], -1)[t].item(), abs=1e-4)


@pytest.mark.parametrize("penalty", [None, 1.2])
@pytest.mark.parametrize("spec", ["low", "high", "list"])
@pytest.mark.parametrize("name", ["llama2", "llama12", "gpt2_2", "gpt2_12"])
def test_dola_equals_the_hand_computation(models, name, spec, penalty):
    lm = models[name]
    assert tied(lm.model) == name.startswith("gpt2") == bool(lm.model.config.tie_word_embeddings)
    n = lm.model.config.num_hidden_layers
    layers = ([1, 0] if n == 2 else [11, 0, 6, 1]) if spec == "list" else spec
    candidates = hand_candidates(lm.model, layers)
    if spec != "list":
        assert candidates == EXPECTED[(name, spec)]
    words = {} if penalty is None else dict(repetition_penalty=penalty)
    trace = lm.generate(PROMPT, dola_layers=layers, max_new_tokens=STEPS, progress=False,
                        record=dl.Record(extra=["test_dola_scores"]), **words)
    processors = [] if penalty is None else [RepetitionPenaltyLogitsProcessor(penalty)]
    assert trace.processor_names == [type(p).__name__ for p in processors]
    assert trace.chooser == "greedy"
    ids, _ = lm.encode(PROMPT)
    hand = hand_dola(lm.model, ids, candidates, STEPS, processors)
    check_trace(trace, hand, candidates)
    if spec == "list":  # the chosen layer is not always the first candidate
        assert any(h["layer"] != layers[0] for h in hand)
    if penalty is not None:  # the penalty acted on the DoLa scores
        assert any(not torch.equal(h["scores"], h["dola"]) for h in hand)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["llama12", "gpt2_12"])
def test_dola_sampling_draws_from_the_processed_dola_scores(models, name, seed):
    lm = models[name]
    trace = lm.generate(PROMPT, dola_layers="high", do_sample=True, temperature=0.7, top_k=10, seed=seed,
                        max_new_tokens=STEPS, progress=False, record=dl.Record(extra=["test_dola_scores"]))
    processors = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(10)]
    assert trace.processor_names == [type(p).__name__ for p in processors]
    assert trace.chooser == "sample"
    candidates = hand_candidates(lm.model, "high")
    ids, _ = lm.encode(PROMPT)
    hand = hand_dola(lm.model, ids, candidates, STEPS, processors, seed=seed)
    a = trace.arrays
    assert trace.token_ids == [h["token"] for h in hand]
    assert a["dola_layer"][:, 0].tolist() == [h["layer"] for h in hand]
    for s, h in enumerate(hand):
        recorded = torch.from_numpy(a["test_dola_scores"][s, 0])
        assert torch.equal(torch.isfinite(recorded), torch.isfinite(h["scores"]))
        assert trace.steps.final_logprob[s] == pytest.approx(torch.log_softmax(h["scores"], -1)[h["token"]].item(),
                                                             abs=1e-4)


def test_dola_chooses_the_layer_per_row(models):
    """Two rows in one batch each get the layers and tokens they get alone. These two prompts choose
    different layers at every step, so the reference's one layer per batch (from divergences averaged over
    the rows) would change one row's choice."""
    lm = models["llama12"]
    prompts = [torch.tensor([[504, 2365, 6354, 16438]]), torch.tensor([[9049, 2645, 253, 1003]])]
    words = dict(dola_layers=[11, 0, 6, 1], max_new_tokens=STEPS, eos_token_id=[])
    alone = [lm.generate_ids(p, progress=False, **words) for p in prompts]
    assert (alone[0].arrays["dola_layer"] != alone[1].arrays["dola_layer"]).any()
    strat = lm.strategy(4, **words)
    recording = Recording(dl.Record())
    state = loop.prefill(lm.model, torch.cat(prompts), strat, [recording], keep_hidden=True)
    loop.run(lm.model, state, strat, [recording], step_fn=dola.step)
    layers = torch.stack(recording.columns["dola_layer"]).T  # [row, step]
    divergence = torch.stack(recording.columns["dola_divergence"], 1)  # [row, step, candidate]
    for row, t in enumerate(alone):
        assert state.ids[row, 4:].tolist() == t.token_ids
        assert layers[row].tolist() == t.arrays["dola_layer"][:, 0].tolist()
        np.testing.assert_allclose(divergence[row].numpy(), t.arrays["dola_divergence"][:, 0], rtol=1e-4)


def test_dola_step_takes_a_forced_token(models):
    lm = models["llama12"]
    strat = lm.strategy(4, dola_layers="low", max_new_tokens=STEPS)
    state = loop.prefill(lm.model, torch.tensor([[504, 2365, 6354, 16438]]), strat, keep_hidden=True)
    token = dola.step(lm.model, state, strat, force=torch.tensor([7]))
    assert token.tolist() == [7] and state.ids[0, -1].item() == 7 and state.pending.tolist() == [7]


@pytest.mark.parametrize("n, is_tied, spec, expected", [
    (48, False, "low", list(range(0, 20, 2))),
    (48, True, "low", list(range(2, 20, 2))),
    (48, True, "high", list(range(28, 48, 2))),
    (40, False, "high", list(range(20, 40, 2))),
    (4, True, "low", [2]),
    (1, False, "low", [0]),
    (1, True, "high", [0]),
    (12, False, (7, 3), [7, 3]),
])
def test_candidate_layers_follow_the_reference(n, is_tied, spec, expected):
    assert premature_layers(n, is_tied, spec) == expected


def test_bad_dola_requests_are_clear(tiny_lms):
    lm = tiny_lms["llama"]
    with pytest.raises(dl.StrategyError, match="dola_layers='middle'"):
        lm.generate(PROMPT, dola_layers="middle", max_new_tokens=2, progress=False)
    with pytest.raises(dl.StrategyError, match=r"dola_layers=\[999\]: \[999\] are not premature layers of this "
                                               r"2-layer model"):
        lm.generate(PROMPT, dola_layers=[999], max_new_tokens=2, progress=False)
    with pytest.raises(dl.StrategyError, match=r"dola_layers=\[0, 2\].*mature layer"):
        lm.generate(PROMPT, dola_layers=[0, 2], max_new_tokens=2, progress=False)
    with pytest.raises(dl.StrategyError, match="seeds= with dola"):
        lm.generate(PROMPT, dola_layers="low", do_sample=True, seeds=[1, 2], max_new_tokens=2, progress=False)
    with pytest.raises(dl.StrategyError, match="dola_layers='low' leaves no premature layer in this 3-layer"):
        premature_layers(3, True, "low")


def test_processors_effects_are_measured_against_the_dola_scores(tiny_lms):
    """The repetition penalty never sets a token to -inf: it removes no mass from the DoLa scores it is given
    (the relative-top filter's -inf tokens are DoLa's, not the processor's), and its rank before is the DoLa rank."""
    lm = tiny_lms["llama"]
    trace = lm.generate("Once upon a time", dola_layers="high", repetition_penalty=1.2, max_new_tokens=4,
                        eos_token_id=[], progress=False)
    proc = trace.processors
    assert proc.processor.unique().tolist() == ["RepetitionPenaltyLogitsProcessor"]
    assert (proc.mass_removed == 0).all()
