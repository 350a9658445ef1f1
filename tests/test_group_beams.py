"""Group (diverse) beam search: the returned sequences, their scores and the whole recorded tree equal a hand
computation of transformers 4.x's `_group_beam_search` with its `BeamSearchScorer` (no KV cache, the Hamming
penalty applied by hand, the finished hypotheses in plain lists); with diversity_penalty=0 every group is an
independent beam search of group_size beams."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import decoderlab as dl

PROMPT = "Once upon a time, in a land far away,"


def hand_group_beam_search(model, prompt: list[int], beams: int, groups: int, penalty: float, max_new: int,
                           eos: list[int], num_return: int, pad: int | None, length_penalty: float = 1.0,
                           early_stopping=False) -> dict:
    """transformers 4.x's group beam search for one prompt, written out: each step the model runs over every
    running sequence (no cache); per group, in order: log-softmax, minus `penalty` for each time an earlier group's
    beam chose the token at this step, plus the beam's running score; the top max(2, 1 + #EOS)·S of the group's
    S·V; walking them best first, an EOS among the top S is offered to the group's finished hypotheses (score /
    generated length ** length_penalty; at most S kept, the worst replaced), the other EOS dropped, the rest become
    the group's S running beams. A group with S hypotheses that cannot improve is done and padded. At the length
    limit the running beams are offered too; the best `num_return` of all groups come back."""
    size = beams // groups
    k = max(2, 1 + len(eos)) * size
    plen = len(prompt)
    max_length = plen + max_new
    seqs = [list(prompt) for _ in range(beams)]
    paths: list[list[int]] = [[] for _ in range(beams)]
    running = [0.0 if b % size == 0 else -1e9 for b in range(beams)]  # only each group's first beam starts
    hyps: list[list[tuple]] = [[] for _ in range(groups)]  # per group: (score, ids, path, step), insertion order
    done = [False] * groups
    done_at: dict[int, int] = {}
    steps: list[list[dict]] = []

    def offer(g, summed, ids, path, length, step):
        score = summed / length ** length_penalty
        if len(hyps[g]) < size or score > min(h[0] for h in hyps[g]):
            hyps[g].append((score, ids, path, step))
            if len(hyps[g]) > size:
                worst = min(range(len(hyps[g])), key=lambda i: hyps[g][i][0])
                del hyps[g][worst]

    for t in range(max_new):
        with torch.no_grad():
            logits = model(torch.tensor(seqs)).logits[:, -1].float()
        logp = torch.log_softmax(logits, -1)
        vocab = logp.shape[-1]
        chosen_now: list[int] = []  # this step's tokens of the earlier groups' beams (padding included)
        new_seqs, new_paths, new_running = [None] * beams, [None] * beams, [0.0] * beams
        cands: list[dict] = []
        for g in range(groups):
            rows = list(range(g * size, (g + 1) * size))
            scores = logp[rows].clone()
            for tok in chosen_now:  # the Hamming penalty
                scores[:, tok] -= penalty
            total = scores + torch.tensor([running[r] for r in rows])[:, None]
            top, idx = torch.topk(total.reshape(-1), k)
            group = []
            for rank, (s, i) in enumerate(zip(top.tolist(), idx.tolist())):
                b, tok = i // vocab, i % vocab  # the beam within the group, the token
                group.append(dict(group=g, parent=rows[0] + b, token=tok, logprob=float(scores[b, tok]),
                                  raw=float(logp[rows[0] + b, tok]), final=float(torch.log_softmax(scores[b], -1)[tok]),
                                  score=float(s), fate="pruned", index=g * k + rank))
            if done[g]:
                for r in rows:
                    new_seqs[r], new_paths[r], new_running[r] = seqs[rows[0]] + [pad], paths[rows[0]], 0.0
                chosen_now += [pad] * size
            else:
                kept = []
                for rank, c in enumerate(group):
                    if c["token"] in eos:
                        if rank < size:
                            b = c["parent"]
                            offer(g, c["score"], seqs[b][plen:] + [c["token"]], paths[b] + [c["index"]],
                                  len(seqs[b]) + 1 - plen, t)
                    else:
                        kept.append(c)
                    if len(kept) == size:
                        break
                for r, c in zip(rows, kept):
                    c["fate"] = "continues"
                    b = c["parent"]
                    new_seqs[r], new_paths[r] = seqs[b] + [c["token"]], paths[b] + [c["index"]]
                    new_running[r] = c["score"]
                chosen_now += [c["token"] for c in kept]
                cur_len = len(seqs[0]) + 1
                if len(hyps[g]) >= size:
                    if early_stopping is True:
                        done[g] = True
                    else:
                        length = (max_length if early_stopping == "never" and length_penalty > 0 else cur_len) - plen
                        done[g] = min(h[0] for h in hyps[g]) >= group[0]["score"] / length ** length_penalty
                    if done[g]:
                        done_at[g] = t
            cands += group
        seqs, paths, running = new_seqs, new_paths, new_running
        last = t == max_new - 1
        if last:
            for g in range(groups):
                if not done[g]:
                    for r in range(g * size, (g + 1) * size):
                        cands[paths[r][-1]]["fate"] = "pruned"  # finished below if kept
                        offer(g, running[r], seqs[r][plen:], paths[r], len(seqs[r]) - plen, t)
        for g in range(groups):
            for h in hyps[g]:
                if h[3] == t:
                    cands[h[2][-1]]["fate"] = "finished"
        steps.append(cands)
        if last or all(done):
            break
    ranked = sorted((h for g in range(groups) for h in hyps[g]), key=lambda h: h[0])
    best = list(reversed(ranked))[:num_return]
    return dict(ids=[h[1] for h in best], scores=[h[0] for h in best], paths=[h[2] for h in best], steps=steps,
                done_at=done_at)


def run_both(lm, beams, groups, penalty, max_new, eos, num_return=2, **words):
    ids, _ = lm.encode(PROMPT)
    trace = lm.generate(PROMPT, num_beams=beams, num_beam_groups=groups, diversity_penalty=penalty,
                        max_new_tokens=max_new, eos_token_id=eos, num_return_sequences=num_return, progress=False,
                        **words)
    pad = lm.strategy(ids.shape[1], num_beams=beams, num_beam_groups=groups, diversity_penalty=penalty,
                      eos_token_id=eos).pad_token_id
    hand = hand_group_beam_search(lm.model, ids[0].tolist(), beams, groups, penalty, max_new, eos, num_return, pad,
                                  length_penalty=words.get("length_penalty", 1.0),
                                  early_stopping=words.get("early_stopping", False))
    return trace, hand


def check_against_hand(trace, hand, beams, groups, eos):
    size = beams // groups
    k = max(2, 1 + len(eos)) * size
    # the returned sequences, best first, and their length-penalised scores
    assert [trace.row(i).token_ids for i in range(trace.rows)] == hand["ids"]
    np.testing.assert_allclose(trace.runs.score.to_numpy(), hand["scores"], rtol=1e-5, atol=1e-5)
    assert trace.runs.score.is_monotonic_decreasing
    # the tree, step by step: every group's candidates, best first within the group
    tree = trace.beams
    assert trace.num_steps == len(hand["steps"])
    assert tree.groupby("step").size().tolist() == [groups * k] * trace.num_steps
    for step, got in tree.groupby("step"):
        want = hand["steps"][step]
        assert got.group.tolist() == [c["group"] for c in want] == np.repeat(np.arange(groups), k).tolist()
        assert got.token_id.tolist() == [c["token"] for c in want], f"step {step}"
        assert got.parent.tolist() == [c["parent"] for c in want], f"step {step}"
        np.testing.assert_allclose(got.logprob, [c["logprob"] for c in want], atol=1e-4)  # diversity penalty included
        np.testing.assert_allclose(got.score, [c["score"] for c in want], rtol=1e-5, atol=1e-4)
        assert got.fate.tolist() == [c["fate"] for c in want], f"step {step}"
        if step == 0:  # only the first beam of each group starts
            assert set(got.parent) == {g * size for g in range(groups)}
    # each returned row is the chain of candidates the hand computation followed, and the observers saw each of its
    # steps from that candidate: the raw logprob of its parent beam, the final one after the diversity penalty
    for i, path in enumerate(hand["paths"]):
        on_path = tree[[i in r for r in tree.rows]].sort_values("step")
        assert on_path.candidate.tolist() == path
        steps = trace.row(i).steps
        want = [hand["steps"][t][c] for t, c in enumerate(path)]
        np.testing.assert_allclose(steps.logprob, [c["raw"] for c in want], atol=1e-4)
        np.testing.assert_allclose(steps.final_logprob, [c["final"] for c in want], atol=1e-4)


@pytest.mark.parametrize("groups,penalty,max_new", [(2, 0.5, 5), (2, 2.0, 4), (4, 0.5, 4), (4, 2.0, 6)])
def test_group_beams_match_a_hand_computation(tiny_lms, groups, penalty, max_new):
    lm = tiny_lms["llama"]
    trace, hand = run_both(lm, 4, groups, penalty, max_new, eos=[])
    check_against_hand(trace, hand, 4, groups, [])
    assert trace.chooser == "group beam search"
    assert trace.processor_names == ["HammingDiversityLogitsProcessor"]
    assert (trace.runs.stop_reason == "max_new_tokens").all()
    # no EOS: every group keeps S beams running, its only hypotheses once the length limit finalises them
    tree = trace.beams
    last = tree.step == trace.num_steps - 1
    assert (tree[~last].fate == "continues").sum() == 4 * (trace.num_steps - 1)
    assert (tree[~last].fate == "finished").sum() == 0
    assert (tree[last].fate == "continues").sum() == 0 and (tree[last].fate == "finished").sum() == 4


def ending_eos(lm, groups, n, picks):
    """EOS ids taken from a group run's own tokens (found, not hard-coded), so that beams end at EOS."""
    tr = lm.generate(PROMPT, num_beams=4, num_beam_groups=groups, diversity_penalty=2.0, num_return_sequences=4,
                     max_new_tokens=n, eos_token_id=[], progress=False)
    return sorted({tr.row(r).token_ids[t] for r, t in picks})


@pytest.mark.parametrize("groups,picks,words,padded,stop", [
    (2, [(0, 2)], {}, False, "max_new_tokens"),
    (4, [(1, 1)], dict(early_stopping=True), True, "max_new_tokens"),
    (4, [(0, 3)], dict(early_stopping="never", length_penalty=2.0), False, "max_new_tokens"),
    (4, [(0, 1), (2, 3)], dict(length_penalty=-0.5), True, "max_new_tokens"),  # two EOS ids: K = 3·S per group
    (4, [(0, 2), (1, 2), (2, 2), (3, 2)], {}, False, "no better beam possible"),  # every group done before the limit
])
def test_group_beams_that_end_at_eos_match_a_hand_computation(tiny_lms, groups, picks, words, padded, stop):
    lm = tiny_lms["llama"]
    n = 6
    eos = ending_eos(lm, groups, n, picks)
    trace, hand = run_both(lm, 4, groups, 2.0, n, eos=eos, **words)
    check_against_hand(trace, hand, 4, groups, eos)
    assert trace.stop_reason == stop
    assert (trace.num_steps < n) == (stop != "max_new_tokens") == (len(hand["done_at"]) == groups)
    tree = trace.beams
    ended = tree[(tree.fate == "finished") & tree.token_id.isin(eos)]
    assert len(ended), "no beam ended at EOS: the test would not exercise finished hypotheses"
    for i in range(trace.rows):
        if trace.runs.stop_reason[i] == "eos":
            assert trace.row(i).token_ids[-1] in eos
    if padded:  # a group of one beam whose best candidate is EOS is done at once, then padded
        assert hand["done_at"], "no group finished early: the test would not exercise padding"
        g, t = next(iter(hand["done_at"].items()))
        if t + 1 < trace.num_steps:
            later = tree[(tree.group == g) & (tree.step > t)]
            assert (later.fate == "pruned").all()


def test_without_diversity_each_group_is_an_independent_beam_search(tiny_lms):
    """diversity_penalty=0: group g is a beam search of S beams started from the first beam of the group, the same
    in every group; S = 2 gives generate's beam search with num_beams=2, S = 1 greedy decoding."""
    lm = tiny_lms["llama"]
    n = 5
    trace = lm.generate(PROMPT, num_beams=4, num_beam_groups=2, diversity_penalty=0.0, num_return_sequences=4,
                        max_new_tokens=n, eos_token_id=[], progress=False)
    assert trace.processor_names == []  # no penalty, no processor (as the reference)
    plain = lm.generate(PROMPT, num_beams=2, num_return_sequences=2, max_new_tokens=n, eos_token_id=[], progress=False)
    rows = [trace.row(i).token_ids for i in range(4)]
    # the two groups' equal hypotheses come back in pairs
    assert rows == [plain.row(0).token_ids] * 2 + [plain.row(1).token_ids] * 2
    np.testing.assert_allclose(trace.runs.score, np.repeat(plain.runs.score.to_numpy(), 2), rtol=1e-5)
    tree = trace.beams
    g0, g1 = tree[tree.group == 0].reset_index(), tree[tree.group == 1].reset_index()
    assert g0.token_id.tolist() == g1.token_id.tolist() and (g1.parent - g0.parent == 2).all()
    # (a forward of 4 rows gives each row's logits within ~1e-6 of another row's with the same ids)
    np.testing.assert_allclose(g0.score, g1.score, atol=1e-5)
    np.testing.assert_allclose(g0.logprob, g1.logprob, atol=1e-5)
    assert (tree.origin[tree.group == 1] >= 0).sum() == (tree.origin[tree.group == 0] >= 0).sum()
    # the plain beam search's tree is group 0's (K = 2·S candidates per step)
    ptree = plain.beams
    assert ptree.token_id.tolist() == g0.token_id.tolist() and ptree.parent.tolist() == g0.parent.tolist()
    np.testing.assert_allclose(ptree.score, g0.score, atol=1e-5)

    greedy = lm.generate(PROMPT, max_new_tokens=n, eos_token_id=[], progress=False)
    four = lm.generate(PROMPT, num_beams=4, num_beam_groups=4, diversity_penalty=0.0, num_return_sequences=3,
                       max_new_tokens=n, eos_token_id=[], progress=False)
    assert [four.row(i).token_ids for i in range(3)] == [greedy.token_ids] * 3


def test_a_large_penalty_makes_the_groups_choose_different_tokens(tiny_lms):
    lm = tiny_lms["llama"]
    trace = lm.generate(PROMPT, num_beams=4, num_beam_groups=4, diversity_penalty=1e3, num_return_sequences=4,
                        max_new_tokens=3, eos_token_id=[], progress=False)
    tree = trace.beams
    for _, step in tree[tree.fate != "pruned"].groupby("step"):
        assert step.token_id.nunique() == 4  # each group's beam avoids the earlier groups' tokens
    assert len({tuple(trace.row(i).token_ids) for i in range(4)}) == 4


def test_group_column_and_save(tiny_lms, tmp_path):
    lm = tiny_lms["llama"]
    trace = lm.generate(PROMPT, num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=2,
                        max_new_tokens=3, eos_token_id=[], progress=False, record=dl.Record(attention=True))
    assert list(trace.beams.columns[:3]) == ["step", "candidate", "group"]
    assert trace.arrays["beam_group"].shape == (3, 8)
    back = dl.Trace.load(trace.save(tmp_path / "groups.parquet"))
    assert back.beams.drop(columns="rows").equals(trace.beams.drop(columns="rows"))
    one = trace.row(1)
    assert one.beams.group.tolist() == trace.beams.group.tolist()
    plain = lm.generate(PROMPT, num_beams=2, max_new_tokens=2, eos_token_id=[], progress=False)
    assert "group" not in plain.beams.columns and "beam_group" not in plain.arrays


@pytest.mark.parametrize("words,match", [
    (dict(num_beams=4, num_beam_groups=3, diversity_penalty=1.0), "multiple"),
    (dict(num_beams=6, num_beam_groups=4), "multiple"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=-0.5), "diversity_penalty"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, do_sample=True), "do_sample=True with num_beam_gro"),
])
def test_requests_that_cannot_be_served_are_clear(tiny_lms, words, match):
    with pytest.raises(dl.StrategyError, match=match):
        tiny_lms["llama"].generate(PROMPT, max_new_tokens=2, progress=False, **words)
