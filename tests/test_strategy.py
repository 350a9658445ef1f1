"""Strategy words resolve as generate resolves them; bad values get clear errors."""
from __future__ import annotations

import pytest

import decoderlab as dl
from decoderlab.errors import StrategyError


def names(lm, **words):
    ids, _ = lm.encode("order")
    return lm.strategy(ids.shape[1], **words).processor_names


def test_processor_order_is_generates(tiny_lms):
    lm = tiny_lms["llama"]
    got = names(lm, do_sample=True, temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, typical_p=0.9,
                repetition_penalty=1.2, no_repeat_ngram_size=3)
    assert got == ["RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor", "TemperatureLogitsWarper",
                   "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper"]
    # greedy ignores the sampling warpers, as generate does
    assert names(lm, do_sample=False, temperature=0.7, top_k=10) == []
    # generate's global default top_k=50 applies when sampling
    assert names(lm, do_sample=True) == ["TopKLogitsWarper"]


@pytest.mark.parametrize("words,match", [
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_p=0), "top_p"),
    (dict(temperature=0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(typical_p=0.0), "typical_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(num_beams=0), "num_beams=0"),
    (dict(num_beams=2.5), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "more than num_beams"),
    (dict(num_return_sequences=2), "seeds="),
    (dict(num_beams=2, early_stopping="soon"), "early_stopping"),
    (dict(num_beams=2, length_penalty="long"), "length_penalty"),
    (dict(num_beams=2, chooser=lambda s, g: s.argmax(-1)), "chooser= with num_beams"),
    (dict(num_beams=4, num_beam_groups=3, diversity_penalty=1.0), "multiple"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=-1.0), "diversity_penalty"),
    (dict(penalty_alpha=1.5, top_k=4), "penalty_alpha"),
    (dict(dola_layers="middle"), "dola_layers"),
    (dict(topp=0.9), "unknown strategy word"),
    (dict(seed="x"), "seed"),
])
def test_bad_words_are_named(tiny_lms, words, match):
    with pytest.raises(StrategyError, match=match):
        tiny_lms["llama"].generate("bad", progress=False, **words)


def test_default_max_new_tokens_is_generates(tiny_lms):
    lm = tiny_lms["llama"]
    ids, _ = lm.encode("default length")
    assert lm.strategy(ids.shape[1]).max_new_tokens == 20
    assert lm.strategy(ids.shape[1], max_length=ids.shape[1] + 7).max_new_tokens == 7


def test_prompt_errors(tiny_lms, tokenizer):
    lm = tiny_lms["llama"]
    with pytest.raises(dl.PromptError, match="empty"):
        lm.generate("", progress=False)
    with pytest.raises(dl.PromptError, match="empty"):
        lm.generate("   ", progress=False)
    with pytest.raises(dl.PromptError, match="context window"):
        lm.generate("word " * 400, progress=False)
    with pytest.raises(dl.PromptError, match="messages"):
        lm.generate([{"content": "no role"}], progress=False)
    with pytest.raises(dl.PromptError, match="string or a list"):
        lm.generate(42, progress=False)


def test_missing_chat_template_is_named(tiny_lms, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    lm = dl.LM(tiny_lms["llama"].model, tok, name="no-template")
    with pytest.raises(dl.PromptError, match="no chat template"):
        lm.generate("hi", chat=True, progress=False)
    assert lm.generate("hi", max_new_tokens=2, progress=False).num_steps == 2


def test_messages_list_and_system(tiny_lms):
    lm = tiny_lms["llama"]
    msgs = [{"role": "user", "content": "Hi!"}]
    trace = lm.generate(msgs, max_new_tokens=2, progress=False)
    assert "<|im_start|>user\nHi!" in trace.prompt and "You are a helpful assistant." not in trace.prompt
    chat = lm.generate("Hi!", chat=True, max_new_tokens=2, progress=False)
    assert "You are a helpful assistant." in chat.prompt and chat.prompt.endswith("<|im_start|>assistant\n")
    own = lm.generate("Hi!", chat=True, system="Be brief.", max_new_tokens=2, progress=False)
    assert "Be brief." in own.prompt


def test_bad_record_options():
    with pytest.raises(ValueError, match="top_k"):
        dl.Record(top_k=0)


def test_template_without_system_role(tiny_lms, tokenizer):
    """A Gemma-style template that raises on a system message: the default system is dropped, an explicit one is an error."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "<start>{{ m['role'] }}\n{{ m['content'] }}<end>\n{% endfor %}"
                         "{% if add_generation_prompt %}<start>model\n{% endif %}")
    lm = dl.LM(tiny_lms["llama"].model, tok, name="gemma-like")
    with pytest.warns(UserWarning, match="system"):
        trace = lm.generate("Hi", chat=True, max_new_tokens=2, progress=False)
    assert trace.prompt == "<start>user\nHi<end>\n<start>model\n"
    with pytest.raises(dl.PromptError, match="System role not supported"):
        lm.generate("Hi", chat=True, system="Be brief.", max_new_tokens=2, progress=False)


@pytest.mark.parametrize("words,match", [
    (dict(guidance_scale=1.5), "guidance_scale"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(max_length=1), "max_length=1"),
    (dict(epsilon_cutoff=2.0), "epsilon_cutoff"),
    (dict(eta_cutoff=-1.0), "eta_cutoff"),
    (dict(logits_processor=lambda ids, s: s), "list of LogitsProcessor"),
    (dict(chooser="argmax"), "chooser"),
])
def test_more_refused_words(tiny_lms, words, match):
    with pytest.raises(StrategyError, match=match):
        tiny_lms["llama"].generate("Hello world", progress=False, **words)


def test_score_rejects_ids_outside_the_vocabulary(tiny_lms):
    with pytest.raises(dl.PromptError, match="outside the vocabulary"):
        tiny_lms["llama"].score("x", [10**7])


# ---- the one rule table -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("words, rule", [
    (dict(), "TOKEN"), (dict(do_sample=True, top_p=0.9), "TOKEN"),
    (dict(num_beams=3), "BEAM"), (dict(num_beams=3, do_sample=True), "BEAM"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0), "GROUP_BEAM"),
    (dict(penalty_alpha=0.6, top_k=4), "CONTRASTIVE"),
    (dict(penalty_alpha=0.6, top_k=1), "TOKEN"),  # top_k <= 1: contrastive search is greedy, generate's rule too
    (dict(penalty_alpha=0.6, top_k=4, do_sample=True), "TOKEN"),
    (dict(dola_layers="high"), "DOLA"), (dict(dola_layers="high", num_beams=2), "BEAM"),
])
def test_the_table_picks_the_rule_generate_picks(tiny_lms, words, rule):
    from decoderlab.engine import rules

    strat = tiny_lms["llama"].strategy(4, **words)
    assert strat.rule is getattr(rules, rule)
    assert strat.rule is rules.rule_for(strat.config)


def test_a_session_takes_what_the_table_says_is_stepped_by_processors(tiny_lms):
    """penalty_alpha with top_k=1 is the token rule (greedy): a session steps it, as generate runs it; the words
    that pick another rule are refused with that rule's reason."""
    lm = tiny_lms["llama"]
    s = lm.session("The sea", penalty_alpha=0.6, top_k=1)
    s.step(3)
    assert s.trace.token_ids == lm.generate("The sea", penalty_alpha=0.6, top_k=1, max_new_tokens=3,
                                            progress=False).token_ids
    with pytest.raises(dl.SessionError, match="DoLa"):
        lm.session("The sea", dola_layers="high")


def test_both_sessions_share_one_base():
    from decoderlab.backends.api_session import APISession
    from decoderlab.backends.branching import BranchingSession

    assert issubclass(dl.Session, BranchingSession) and issubclass(APISession, BranchingSession)
    shared = ("step", "run", "choose", "rewind", "fork", "branch_of", "tree", "trace")
    assert all(name not in vars(dl.Session) and name not in vars(APISession) for name in shared)
