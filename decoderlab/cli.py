"""Command line: stream a generation, then print how each token was chosen.

    python -m decoderlab "What is the capital of France?" --chat
    python -m decoderlab --base-url http://127.0.0.1:8000/v1 --model smollm2 "What is the capital of France?" --chat
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .formats import format_number, format_prob, format_rank, visible_text
from .trace.trace import Trace


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m decoderlab",
        description="Decode a prompt token by token with a causal LM and show how every token was chosen: "
                    "the tokens stream as they are chosen, then a per-step table follows.",
    )
    p.add_argument("prompt", help="the prompt text (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template (system + user message)")
    p.add_argument("--system", default=None, help="system message for --chat (default: 'You are a helpful assistant.')")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="most tokens to generate (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy (implied by --top-k/--top-p/--temperature)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="keep only the K most likely tokens (sampling)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling: keep the smallest set with mass >= P")
    p.add_argument("--temperature", type=float, default=None, metavar="T", help="divide the logits by T before sampling")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed for sampling (same draws as torch.manual_seed(S) + generate)")
    p.add_argument("--model", default=None, metavar="PATH", help="a local transformers folder or .gguf file (default: bundled SmolLM2-135M-Instruct); with --base-url: the server's model name")
    p.add_argument("--base-url", default=None, metavar="URL",
                   help="decode on an OpenAI-compatible server instead (e.g. http://127.0.0.1:8000/v1); the API key "
                        "comes from OPENAI_API_KEY")
    p.add_argument("--logprobs", choices=["raw", "processed"], default=None,
                   help="with --base-url: declare what the server's logprobs are (vLLM's --logprobs-mode)")
    p.add_argument("--save", default=None, metavar="FILE", help="save the trace to this parquet file")
    p.add_argument("--alternatives", type=int, default=3, metavar="N", help="alternatives shown per step (default 3)")
    p.add_argument("--num-beams", type=int, default=None, metavar="B",
                   help="beam search with B beams: prints the best sequence's table and every returned beam's score")
    p.add_argument("--num-return-sequences", type=int, default=None, metavar="R",
                   help="with --num-beams: how many beams come back (default: all B)")
    return p


def table(trace: Trace, alternatives: int = 3) -> str:
    """The per-step table: token, probability, rank, entropy and the top alternatives."""
    cands = trace.candidates
    rows = []
    for r in trace.steps.itertuples():
        alts = cands[(cands.step == r.step) & (cands.token_id != r.token_id)].head(alternatives)
        alt = "  ".join(f"{t!r} {p:.2f}" for t, p in zip(alts.token, alts.prob))
        mark = "*" if r.forced else " "
        rows.append(f"{r.step:>4} {mark}{r.token!r:<18} {format_prob(r.prob):>6} {format_rank(r.rank):>5} "
                    f"{format_number(r.entropy, 3):>7}   {alt}")
    head = f"{'step':>4}  {'token':<18} {'prob':>6} {'rank':>5} {'entropy':>7}   top alternatives"
    return "\n".join([head, "-" * len(head), *rows])


SAMPLING_WORDS = ("top_k", "top_p", "temperature", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def strategy_words(spec: str) -> dict:
    """'greedy' -> {}; 'top_p=0.9,temperature=0.7' -> generate's words (sampling words imply do_sample=True)."""
    import ast

    if spec.strip() in ("greedy", ""):
        return {}
    words: dict = {}
    for part in spec.split(","):
        if "=" not in part:
            raise ValueError(f"strategy {spec!r}: write words as name=value, separated by commas (or 'greedy')")
        name, value = (x.strip() for x in part.split("=", 1))
        try:
            words[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            words[name] = value
    if any(w in words for w in SAMPLING_WORDS):
        words.setdefault("do_sample", True)
    return words


def compare_main(argv: Sequence[str]) -> int:
    """`python -m decoderlab compare PROMPT --strategy greedy --strategy top_p=0.9 --seeds 5`: the summary."""
    p = argparse.ArgumentParser(prog="python -m decoderlab compare",
                                description="Run several decoding strategies on a prompt as one batch and print "
                                            "one line per strategy: length, perplexity, entropy, distinct-2, "
                                            "% repetitive, Self-BLEU-4.")
    p.add_argument("prompt")
    p.add_argument("--strategy", action="append", required=True, metavar="WORDS",
                   help="'greedy', or generate's words such as 'top_p=0.9' or 'top_k=50,temperature=0.7' or "
                        "'num_beams=4' (repeat the flag for each strategy)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds 0..N-1 for strategies that sample")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--chat", action="store_true")
    p.add_argument("--model", default=None, metavar="PATH")
    args = p.parse_args(argv)
    import decoderlab as dl

    try:
        strategies = {spec: strategy_words(spec) for spec in args.strategy}
        lm = dl.load(args.model)
        cmp = dl.compare(lm, args.prompt, strategies, seeds=range(args.seeds), max_new_tokens=args.max_new_tokens,
                         chat=args.chat, progress=False)
    except (dl.PromptError, dl.StrategyError, dl.ModelNotFoundError, ValueError) as err:
        print(f"decoderlab: error: {err}", file=sys.stderr)
        return 2
    cols = ["strategy", "runs", "length", "perplexity", "mean_entropy", "distinct_2", "repetition_pct", "self_bleu_4"]
    print(cmp.summary[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    args = parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import decoderlab as dl

    words = {"max_new_tokens": args.max_new_tokens}
    for name in ("top_k", "top_p", "temperature"):
        if getattr(args, name) is not None:
            words[name] = getattr(args, name)
    words["do_sample"] = args.sample or any(k in words for k in ("top_k", "top_p", "temperature"))
    if args.num_beams is not None:
        words.update(num_beams=args.num_beams, num_return_sequences=args.num_return_sequences or args.num_beams)
    elif args.num_return_sequences is not None:
        words["num_return_sequences"] = args.num_return_sequences  # refused, with the reason, without beams
    try:
        if args.base_url is not None:
            if args.model is None:
                raise ValueError("--base-url needs --model NAME: the model's name on that server")
            engine = dl.connect(base_url=args.base_url, model=args.model, logprobs=args.logprobs)
        else:
            engine = dl.load(args.model)
        extra = {"system": args.system} if args.system is not None else {}
        trace = engine.generate(args.prompt, chat=args.chat, seed=args.seed, progress=False,
                                on_token=lambda step, text: print(visible_text(text), end="", flush=True), **extra,
                                **words)
    except (dl.PromptError, dl.StrategyError, dl.ModelNotFoundError, dl.APIError, ValueError) as err:
        print(f"decoderlab: error: {err}", file=sys.stderr)
        return 2
    if trace.has_beams:
        print(visible_text(trace.text), end="")
    best = trace.row(0)
    print(f"\n\n[{best.num_steps} tokens, stopped: {best.stop_reason}]\n")
    if "logprobs" in best.strategy:  # a server's numbers: say what they are
        print(f"logprobs: {best.strategy['logprobs']}; entropy: {best.strategy['entropy']}\n")
    print(table(best, args.alternatives))
    if trace.has_beams:
        print("\nbeams returned, best first (score = summed logprob / length ** length_penalty):")
        for r in trace.runs.itertuples():
            print(f"{r.row:>4}  {r.score:9.4f}  {r.length:>4} tokens  {r.stop_reason:<15} {r.text!r}")
    if args.save:
        try:
            print(f"\nsaved to {trace.save(args.save)}")
        except OSError as err:
            print(f"decoderlab: error: cannot save the trace to {args.save}: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
