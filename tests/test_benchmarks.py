"""The comparison benchmarks' own logic, on a tiny model: the seed's loop as copied (and its EOS switch), the long
prompt, the eager baseline that switches the model back. Their timings are measured in benchmarks/, never here."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_outputs  # noqa: E402
import bench_seed_loop  # noqa: E402
from _timing import EVERYTHING, first_difference, run_recorded  # noqa: E402


def greedy(model, ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def test_seed_loop_equals_generate_and_runs_past_eos(tiny_lms):
    lm = tiny_lms["llama"]
    ids = lm.tokenizer("The seed post decodes", return_tensors="pt").input_ids
    ref = greedy(lm.model, ids, 12)
    _, tokens = bench_seed_loop.seed_loop(lm, ids, 12)
    assert tokens == ref
    assert run_recorded(lm, ids, 12, EVERYTHING, read_lens=True)[1].token_ids == ref
    # the copy does stop at its tokenizer's EOS: NoEos is what makes it run N tokens
    stops = bench_seed_loop.NoEos(lm.tokenizer)
    stops.eos_token_id = ref[2]
    out = bench_seed_loop.CustomDecoder(lm.model, stops).generate(ids, max_length=ids.shape[1] + 12, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == ref[: ref.index(ref[2]) + 1]
    assert bench_seed_loop.NoEos(lm.tokenizer).decode(ref) == lm.tokenizer.decode(ref)


def test_long_prompt_has_exactly_the_tokens_asked(tokenizer):
    for length in (1, 57, 2048):
        ids = bench_outputs.long_prompt(tokenizer, length)
        assert ids.shape == (1, length)
        whole = tokenizer(bench_outputs.TEXT * 80, return_tensors="pt").input_ids
        assert torch.equal(ids[0], whole[0, :length])


def test_eager_baseline_returns_everything_and_switches_back(tiny_lms):
    lm = tiny_lms["llama"]
    cfg = lm.model.config
    assert cfg._attn_implementation == "sdpa"
    ids = lm.tokenizer("Attention weights need eager", return_tensors="pt").input_ids
    P, n = ids.shape[1], 5
    _, tokens, returned = bench_outputs.with_outputs(lm, ids, n)
    assert cfg._attn_implementation == "sdpa"
    assert tokens == greedy(lm.model, ids, n) == run_recorded(lm, ids, n, EVERYTHING, read_lens=True)[1].token_ids
    L, H, d, V = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size, cfg.vocab_size
    scores = n * V
    attentions = L * H * (P * P + sum(P + i for i in range(1, n)))  # the prompt's matrices, then one row a step
    hidden = (L + 1) * d * (P + n - 1)
    assert returned == 4 * (scores + attentions + hidden)  # float32


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
