"""The logit lens: final norm + unembedding of each layer's residual; the last layer is the model's output."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import decoderlab as dl
from decoderlab.engine.lens import Lens, decoder_layers, final_norm


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "gpt2", "phi3"])
def test_last_layer_lens_is_the_models_distribution(tiny_lms, arch):
    lm = tiny_lms[arch]
    trace = lm.generate("The lens looks at every layer", max_new_tokens=6, eos_token_id=[], progress=False,
                        record=dl.Record(lens=True, lens_top_k=5, top_k=5))
    lens = trace.lens
    last = lens[lens.layer == lens.layer.max()]
    cands = trace.candidates
    for s in range(trace.num_steps):
        ours = last[last.step == s].sort_values("rank")
        model = cands[cands.step == s].sort_values("rank")
        assert ours.token_id.tolist() == model.token_id.tolist()
        np.testing.assert_allclose(ours.prob.values, model.prob.values, rtol=1e-4, atol=1e-6)
    stats = trace.lens_stats
    final = stats[stats.layer == stats.layer.max()].reset_index(drop=True)
    np.testing.assert_allclose(final.entropy.values, trace.steps.entropy.values, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(final.chosen_rank.values, trace.steps["rank"].values)


def test_each_layer_is_norm_then_unembedding_of_hidden_states(tiny_lms):
    lm = tiny_lms["llama"]
    trace = lm.generate("Hidden states", max_new_tokens=3, eos_token_id=[], progress=False,
                        record=dl.Record(lens=True, lens_top_k=3))
    ids = torch.tensor([list(trace.prompt_ids) + trace.token_ids])
    with torch.no_grad():
        out = lm.model(input_ids=ids, output_hidden_states=True)
    P = len(trace.prompt_ids)
    model = lm.model.model
    layers = len(decoder_layers(lm.model))
    assert trace.lens.layer.nunique() == layers
    for s in range(trace.num_steps):
        for layer in range(layers - 1):  # hidden_states[l + 1] is block l's output (the last one is post-norm)
            h = out.hidden_states[layer + 1][0, P - 1 + s]
            with torch.no_grad():
                p = torch.softmax(lm.model.lm_head(model.norm(h)), -1)
            top = torch.topk(p, 3)
            got = trace.lens[(trace.lens.step == s) & (trace.lens.layer == layer)].sort_values("rank")
            assert got.token_id.tolist() == top.indices.tolist()
            np.testing.assert_allclose(got.prob.values, top.values.numpy(), rtol=1e-4)


def test_lens_parts_found_for_gpt2_and_gemma2(tiny_lms):
    gpt2 = tiny_lms["gpt2"].model
    assert final_norm(gpt2) is gpt2.transformer.ln_f
    assert decoder_layers(gpt2) is gpt2.transformer.h
    assert Lens(tiny_lms["gemma2"].model).softcap == 30.0


def test_lens_survives_save_and_load(tiny_lms, tmp_path):
    lm = tiny_lms["qwen2"]
    trace = lm.generate("Save the lens", max_new_tokens=4, progress=False, record=dl.Record(lens=True))
    path = trace.save(tmp_path / "lens.parquet")
    back = dl.Trace.load(path)
    assert back.lens_object is None
    assert back.lens.equals(trace.lens)
    assert back.lens_stats.equals(trace.lens_stats)


def test_no_lens_recorded_says_so(tiny_lms):
    trace = tiny_lms["llama"].generate("No lens", max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match="Record\\(lens=True\\)"):
        trace.lens


@pytest.mark.integration
def test_smollm2_lens_last_layer(smol):
    trace = smol.generate("What is the capital of France?", chat=True, max_new_tokens=8, progress=False,
                          record=dl.Record(lens=True))
    last = trace.lens_stats[trace.lens_stats.layer == 29].reset_index(drop=True)
    np.testing.assert_allclose(last.chosen_prob.values, trace.steps.prob.values, rtol=1e-4)
    assert (last.chosen_rank.values == trace.steps["rank"].values).all()


def test_lens_for_one_step_computes_only_that_step(tiny_lms):
    lm = tiny_lms["llama"]
    trace = lm.generate("Lazy lens", max_new_tokens=5, eos_token_id=[], progress=False, record=dl.Record(lens=True))
    one = trace.lens_for([3])
    assert set(one.step) == {3}
    assert trace.lens_done.all(axis=1).tolist() == [False, False, False, True, False]
    full = trace.lens
    assert trace.lens_done.all()
    np.testing.assert_array_equal(one.token_id.values, full[full.step == 3].token_id.values)
    np.testing.assert_allclose(one.prob.values, full[full.step == 3].prob.values)


# ---- commitment: where the model made up its mind -----------------------------------------------------------
def _hand_commit(ranks: list[int]):
    """The first layer from which rank is 0 at every later layer, by a plain loop; None if the last is not 0."""
    if ranks[-1] != 0:
        return None
    layer = len(ranks) - 1
    while layer > 0 and ranks[layer - 1] == 0:
        layer -= 1
    return layer


@pytest.mark.parametrize("ranks", [[0, 0, 0], [3, 0, 0], [0, 2, 0], [0, 0, 1], [5, 4, 3], [0], [1], [2, 0, 1, 0]])
def test_commit_layers_by_hand(ranks):
    from decoderlab.trace.lens import commit_layers

    got = int(commit_layers(np.array([ranks]))[0])
    want = _hand_commit(ranks)
    assert got == (-1 if want is None else want)


def test_commit_layer_column_against_a_hand_lens_of_the_default_model(smol):
    """`steps.commit_layer` of a greedy run of SmolLM2 equals the commit layer computed here from the model's own
    hidden states (hooks on each block's output, final norm, lm_head): an independent lens and rank."""
    trace = smol.generate("The capital of France is", max_new_tokens=8, eos_token_id=[], progress=False,
                          record=dl.Record(lens=True))
    assert trace.lens_computed is False  # the column is computed when read, not while decoding
    steps = trace.steps
    assert trace.lens_computed
    ids = torch.tensor([list(trace.prompt_ids) + trace.token_ids])
    outputs = {}
    blocks = decoder_layers(smol.model)
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            smol.model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    P = len(trace.prompt_ids)
    norm, head = final_norm(smol.model), smol.model.get_output_embeddings()
    seen = set()
    for s, chosen in enumerate(trace.token_ids):
        ranks = []
        for layer in range(len(blocks)):
            with torch.no_grad():
                logits = head(norm(outputs[layer][0, P - 1 + s])).float()
            ranks.append(int((logits > logits[chosen]).sum()))
        want = _hand_commit(ranks)
        got = steps.commit_layer.iloc[s]
        assert want is not None  # greedy with no processors: the last layer's top-1 is the chosen token
        assert got == want, (s, ranks)
        seen.add(want)
    assert len(seen) > 1  # the run is not one where every token settles at the same layer


def test_commit_layer_is_missing_where_the_token_is_not_the_last_layers_top1(tiny_lms):
    lm = tiny_lms["llama"]
    trace = lm.generate("Sampling from a random model", max_new_tokens=12, do_sample=True, seed=3, temperature=3.0,
                        top_k=0, eos_token_id=[], progress=False, record=dl.Record(lens=True))
    st = trace.steps
    stats = trace.lens_stats
    last = stats[stats.layer == stats.layer.max()].set_index("step").chosen_rank
    below_top = st["rank"].to_numpy() > 0
    assert below_top.any()  # at temperature 3 some draws are not the argmax
    assert st.commit_layer[below_top].isna().all()
    assert (last[below_top] > 0).all()
    for s in np.flatnonzero(~below_top):
        ranks = stats[stats.step == s].sort_values("layer").chosen_rank.tolist()
        assert st.commit_layer.iloc[s] == _hand_commit(ranks)
    assert "commit_layer" not in trace.choices.columns  # the frame views read never computes the lens


def test_commit_layer_survives_save_and_load_and_rows(tiny_lms, tmp_path):
    lm = tiny_lms["llama"]
    trace = lm.generate("Saved commitment", max_new_tokens=5, do_sample=True, seeds=[0, 1], eos_token_id=[],
                        progress=False, record=dl.Record(lens=True))
    want = trace.steps[["step", "row", "commit_layer"]]
    loaded = dl.Trace.load(trace.save(tmp_path / "t.parquet"))
    assert loaded.lens_computed
    assert loaded.steps[["step", "row", "commit_layer"]].equals(want)
    one = trace.row(1).steps
    assert one.commit_layer.tolist() == want[want.row == 1].commit_layer.tolist()


def test_no_lens_no_commit_column(tiny_lms):
    trace = tiny_lms["llama"].generate("No lens", max_new_tokens=3, progress=False)
    assert "commit_layer" not in trace.steps.columns


# ---- a tuned lens -----------------------------------------------------------------------------------------------
def _tuned_folder(path, model, scale=0.05, seed=0, **config):
    """A tuned lens folder in the format the tuned-lens package saves: config.json and params.pt, the state dict of
    its layer_translators (one Linear(d, d) per layer), written here by hand."""
    import json

    cfg = model.config
    d, n = cfg.hidden_size, cfg.num_hidden_layers
    g = torch.Generator().manual_seed(seed)
    translators = torch.nn.ModuleList([torch.nn.Linear(d, d) for _ in range(n)])
    with torch.no_grad():
        for t in translators:
            t.weight.copy_(torch.randn(d, d, generator=g) * scale)
            t.bias.copy_(torch.randn(d, generator=g) * scale)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(translators.state_dict(), path / "params.pt")
    (path / "config.json").write_text(json.dumps({"base_model_name_or_path": "tiny", "d_model": d,
                                                  "num_hidden_layers": n, "bias": True, **config}))
    return translators


def test_tuned_lens_against_a_hand_computation(tiny_lms, tmp_path):
    """Through a tuned lens, layer l's residual h becomes h + A h + b with the translator of block l + 1 (translator
    i reads what enters block i), then the final norm and unembedding; the last layer is the model's own output."""
    lm = tiny_lms["llama"]
    translators = _tuned_folder(tmp_path / "lens", lm.model)
    trace = lm.generate("Tuned lens", max_new_tokens=3, eos_token_id=[], progress=False,
                        record=dl.Record(lens=True, lens_top_k=4))
    tuned = trace.with_lens(dl.tuned_lens(lm, tmp_path / "lens"))
    assert tuned.lens_object.name == "tuned lens" and trace.lens_object.name == "logit lens"
    ids = torch.tensor([list(trace.prompt_ids) + trace.token_ids])
    with torch.no_grad():
        out = lm.model(input_ids=ids, output_hidden_states=True)
    P, layers = len(trace.prompt_ids), len(decoder_layers(lm.model))
    lens = tuned.lens
    for s in range(trace.num_steps):
        for layer in range(layers):
            if layer < layers - 1:
                h = out.hidden_states[layer + 1][0, P - 1 + s]
                with torch.no_grad():
                    h = h + translators[layer + 1](h)
                    p = torch.softmax(lm.model.lm_head(lm.model.model.norm(h)), -1)
            else:
                p = torch.softmax(out.logits[0, P - 1 + s], -1)
            top = torch.topk(p, 4)
            got = lens[(lens.step == s) & (lens.layer == layer)].sort_values("rank")
            assert got.token_id.tolist() == top.indices.tolist()
            np.testing.assert_allclose(got.prob.values, top.values.numpy(), rtol=1e-4, atol=1e-6)
    assert "commit_layer" in tuned.steps and not trace.lens_computed  # the original's lens untouched


def test_tuned_lens_of_zero_translators_is_the_logit_lens(tiny_lms, tmp_path):
    lm = tiny_lms["llama"]
    _tuned_folder(tmp_path / "zero", lm.model, scale=0.0)
    trace = lm.generate("Zero translators", max_new_tokens=3, eos_token_id=[], progress=False,
                        record=dl.Record(lens=True))
    tuned = trace.with_lens(dl.tuned_lens(lm, tmp_path / "zero"))
    assert tuned.lens.token_id.tolist() == trace.lens.token_id.tolist()
    np.testing.assert_allclose(tuned.lens.prob.values, trace.lens.prob.values, rtol=1e-5, atol=1e-7)


def test_tuned_lens_errors(tiny_lms, tmp_path):
    lm = tiny_lms["llama"]
    with pytest.raises(dl.LensError, match="not a tuned lens folder"):
        dl.tuned_lens(lm, tmp_path / "nowhere")
    _tuned_folder(tmp_path / "other", lm.model)
    import json

    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 99}))
    with pytest.raises(dl.LensError, match="num_hidden_layers=99"):
        dl.tuned_lens(lm, tmp_path / "other")
    trace = lm.generate("Saved", max_new_tokens=2, progress=False, record=dl.Record(lens=True))
    loaded = dl.Trace.load(trace.save(tmp_path / "t.parquet"))
    with pytest.raises(ValueError, match="keeps no residuals"):
        loaded.with_lens(trace.lens_object)


def test_show_lenses_side_by_side(tiny_lms, tmp_path):
    from decoderlab.views import panels

    lm = tiny_lms["llama"]
    _tuned_folder(tmp_path / "lens", lm.model)
    trace = lm.generate("Side by side", max_new_tokens=4, eos_token_id=[], progress=False,
                        record=dl.Record(lens=True))
    tuned = trace.with_lens(dl.tuned_lens(lm, tmp_path / "lens"))
    view = dl.show_lenses(trace, tuned, step=1)
    assert view.pending
    view.wait()
    assert not view.pending
    assert [t.value for t in view.tables] == [panels.lens_panel(t, 1) for t in (trace, tuned)]
    view.slider.value = 3
    assert [t.value for t in view.tables] == [panels.lens_panel(t, 3) for t in (trace, tuned)]
    assert "dlp-commit dlp-at' data-step='3'" in view.strips[1].strip.value
    with pytest.raises(ValueError, match="with a lens"):
        dl.show_lenses(lm.generate("no lens", max_new_tokens=2, progress=False))


def test_train_tuned_lens_lowers_the_kl_and_writes_a_folder_it_reads(tiny_lms, tmp_path):
    from decoderlab.engine.tuned_lens import train_tuned_lens

    lm = tiny_lms["llama"]
    texts = [torch.randint(0, lm.model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(i))
             for i in range(3)]
    losses = []
    before = [p.requires_grad for p in lm.model.parameters()]
    folder = train_tuned_lens(lm.model, texts, tmp_path / "trained", steps=40, lr=1e-2,
                              log=lambda step, loss: losses.append(loss))
    assert len(losses) == 40 and losses[-1] < losses[0]
    assert [p.requires_grad for p in lm.model.parameters()] == before  # the model is left as it was
    trace = lm.generate("Trained", max_new_tokens=2, eos_token_id=[], progress=False, record=dl.Record(lens=True))
    assert len(trace.with_lens(dl.tuned_lens(lm, folder)).lens) == len(trace.lens)
    with pytest.raises(dl.LensError, match="steps >= 1"):
        train_tuned_lens(lm.model, texts, tmp_path / "x", steps=0)
