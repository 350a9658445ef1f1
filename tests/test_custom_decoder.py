"""The seed's CustomDecoder call runs unchanged against decoderlab.CustomDecoder."""
from __future__ import annotations

import torch

from decoderlab import CustomDecoder


def seed_cell(model, tokenizer, CustomDecoder):
    """The blog post's cell, verbatim but for the max_length (kept small for the test)."""
    prompt = """Your prompt"""

    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": prompt},
    ]

    input_ids = tokenizer.apply_chat_template(messages, return_tensors="pt")

    custom_decoder = CustomDecoder(model, tokenizer)
    output_ids = custom_decoder.generate(input_ids, max_length=60, do_sample=True, top_k=50)

    generated_text = tokenizer.decode(output_ids[0], skip_special_tokens=True)
    return input_ids, output_ids, generated_text, custom_decoder


def test_seed_cell_runs_unchanged(tiny_lms, tokenizer):
    model = tiny_lms["llama"].model
    input_ids, output_ids, text, decoder = seed_cell(model, tokenizer, CustomDecoder)
    ids = input_ids["input_ids"] if hasattr(input_ids, "keys") else input_ids
    assert isinstance(output_ids, torch.Tensor) and output_ids.dim() == 2
    assert torch.equal(output_ids[:, : ids.shape[1]], ids)
    assert output_ids.shape[1] <= 60
    assert decoder.trace.token_ids == output_ids[0, ids.shape[1]:].tolist()
    assert decoder.trace.processors.processor.unique().tolist() == ["TopKLogitsWarper"]
    assert isinstance(text, str)


def test_greedy_equals_generate_and_seeded_sampling(tiny_lms, tokenizer):
    model = tiny_lms["qwen2"].model
    ids = tokenizer("The seed post decodes", return_tensors="pt").input_ids
    out = CustomDecoder(model, tokenizer).generate(ids, max_length=ids.shape[1] + 8, do_sample=False)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id)
    assert torch.equal(out, ref)
    a = CustomDecoder(model, tokenizer).generate(ids, max_length=ids.shape[1] + 8, top_k=50, seed=4)
    torch.manual_seed(4)
    b = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=True, top_k=50,
                       eos_token_id=tokenizer.eos_token_id)
    assert torch.equal(a, b)


def test_verbose_prints_tokens(tiny_lms, tokenizer, capsys):
    model = tiny_lms["llama"].model
    ids = tokenizer("Print as you go", return_tensors="pt").input_ids
    decoder = CustomDecoder(model, tokenizer)
    decoder.generate(ids, max_length=ids.shape[1] + 5, do_sample=False, verbose=True)
    printed = capsys.readouterr().out
    assert printed.strip() and printed.rstrip("\n") == "".join(decoder.trace.tokens)


def test_trace_names_the_model_not_its_cache_path(smol_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smol_dir)
    decoder = CustomDecoder(model, tokenizer)
    ids = tokenizer("Hi", return_tensors="pt").input_ids
    decoder.generate(ids, max_length=ids.shape[1] + 2, do_sample=False)
    assert decoder.trace.model_name == "SmolLM2-135M-Instruct"
