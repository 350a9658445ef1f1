"""Command line: `decoderlab generate | compare | score | lab`, each with the Python API's words and defaults.

    decoderlab generate "What is the capital of France?" --chat
    decoderlab compare "Once upon a time" --strategy greedy --strategy top_p=0.9 --seeds 3
    decoderlab score "The capital of France is" " Paris."
    decoderlab lab

Why subcommands: each task has its own inputs (one prompt and a strategy; several strategies; a given
continuation; a folder of notebooks) and `decoderlab --help` lists them all. A prompt without a command is
`generate`, as in earlier versions. Every flag maps to the keyword of the same name in `lm.generate`,
`lm.score` or `dl.compare`; a flag left out is not passed, so the defaults are the Python API's.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .formats import format_number, format_prob, format_rank, visible_text
from .trace.trace import Trace

COMMANDS = ("generate", "compare", "score", "lab")
SAMPLING_WORDS = ("top_k", "top_p", "temperature", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
NUMBER_WORDS = {  # flag word: (type, metavar, help). Each is generate's word of the same name.
    "top_k": (int, "K", "keep only the K most likely tokens (implies sampling)"),
    "top_p": (float, "P", "nucleus sampling: keep the smallest set of tokens with mass >= P (implies sampling)"),
    "min_p": (float, "P", "keep tokens with probability >= P x the top token's (implies sampling)"),
    "typical_p": (float, "P", "locally typical sampling with mass P (implies sampling)"),
    "epsilon_cutoff": (float, "E", "drop tokens with probability below E (implies sampling)"),
    "eta_cutoff": (float, "E", "eta sampling's entropy-dependent cutoff (implies sampling)"),
    "temperature": (float, "T", "divide the logits by T (implies sampling)"),
    "repetition_penalty": (float, "R", "penalise tokens already in the text: their positive logits divided by R, "
                                       "negative ones multiplied (1.0 = off)"),
    "no_repeat_ngram_size": (int, "N", "never repeat an n-gram of N tokens"),
    "num_beams": (int, "B", "beam search with B beams: prints the best sequence's table and every returned "
                            "beam's score"),
    "num_return_sequences": (int, "R", "with --num-beams: how many beams come back (default: all B)"),
    "length_penalty": (float, "L", "with --num-beams: a beam's score is its summed logprob / length ** L"),
    "penalty_alpha": (float, "A", "contrastive search's degeneration penalty (with --top-k)"),
}


def _words_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("strategy (generate's words; left out = the Python API's default)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="most tokens to generate (default: as lm.generate: the model's generation config, else 20)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy (do_sample=True)")
    for word, (kind, metavar, text) in NUMBER_WORDS.items():
        g.add_argument("--" + word.replace("_", "-"), type=kind, default=None, metavar=metavar, help=text)
    g.add_argument("--dola-layers", default=None, metavar="LAYERS",
                   help="DoLa: 'low', 'high', or layer numbers separated by commas")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed for sampling (the same draws as torch.manual_seed(S) + generate)")


def _model_group(p: argparse.ArgumentParser, server: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="a local transformers folder, a .gguf file, or a hub id where a hub is reachable (default: "
                        "the bundled SmolLM2-135M-Instruct)" + ("; with --base-url: the server's model name"
                                                                  if server else ""))
    g.add_argument("--dtype", default=None, metavar="DTYPE", help="load the weights as e.g. float32, bfloat16")
    g.add_argument("--device", default=None, metavar="DEVICE", help="run on e.g. cpu, cuda, cuda:1")
    if server:
        g.add_argument("--base-url", default=None, metavar="URL",
                       help="decode on an OpenAI-compatible server instead (e.g. http://127.0.0.1:8000/v1); the API "
                            "key comes from OPENAI_API_KEY; needs pip install 'decoderlab[api]'")
        g.add_argument("--logprobs", choices=["raw", "processed"], default=None,
                       help="with --base-url: declare what the server's logprobs are (vLLM's --logprobs-mode)")


def _prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template (system + user message)")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="system message for --chat (default: 'You are a helpful assistant.')")


def parser() -> argparse.ArgumentParser:
    """The whole command line: one subcommand per task, every flag with its help."""
    p = argparse.ArgumentParser(
        prog="decoderlab",
        description="See how a language model decodes: every step's logits, processors, choice, attention and "
                    "logit lens. A prompt without a command runs `generate`.",
        epilog="`decoderlab COMMAND --help` explains each command's flags.",
    )
    p.add_argument("--version", action="version", version=f"decoderlab {__version__}",
                   help="print decoderlab's version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    gen = sub.add_parser("generate", help="decode a prompt, streaming the tokens, then print how each was chosen",
                         description="Decode a prompt token by token; the tokens stream as they are chosen, then a "
                                     "table gives each step's probability, rank, entropy and top alternatives.")
    _prompt_args(gen)
    _words_group(gen)
    _model_group(gen)
    out = gen.add_argument_group("output")
    out.add_argument("--alternatives", type=int, default=3, metavar="N", help="alternatives shown per step (default 3)")
    out.add_argument("--attention", action="store_true", help="record each step's attention rows (saved with --save)")
    out.add_argument("--lens", action="store_true", help="record the logit lens (saved with --save)")
    out.add_argument("--save", default=None, metavar="FILE", help="save the trace to this parquet file")
    out.add_argument("--html", default=None, metavar="FILE", help="write the trace as one offline HTML page")

    cmp = sub.add_parser("compare", help="run several strategies on a prompt as one batch and print their metrics",
                         description="Run several decoding strategies on a prompt (as rows of one batch on a local "
                                     "model) and print one line per strategy: length, perplexity, entropy, "
                                     "distinct-2, % repetitive, Self-BLEU-4.")
    cmp.add_argument("prompt", help="the prompt text (with --chat: the user's message)")
    cmp.add_argument("--strategy", action="append", required=True, metavar="WORDS",
                     help="'greedy', or generate's words such as 'top_p=0.9' or 'top_k=50,temperature=0.7' or "
                          "'num_beams=4' (repeat the flag for each strategy)")
    cmp.add_argument("--seeds", type=int, default=1, metavar="N",
                     help="seeds 0..N-1 for strategies that sample (default 1, as dl.compare)")
    cmp.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                     help="most tokens per run (default 64, as dl.compare)")
    cmp.add_argument("--chat", action="store_true", help="apply the model's chat template")
    _model_group(cmp)

    sc = sub.add_parser("score", help="score a given continuation of a prompt, token by token",
                        description="Teacher forcing: the model reads prompt + continuation in one forward; each "
                                    "continuation token's probability, rank and entropy, then the total.")
    _prompt_args(sc)
    sc.add_argument("continuation", help="the text to score after the prompt (with --chat: the assistant's answer)")
    sc.add_argument("--temperature", type=float, default=None, metavar="T",
                    help="score under these processors: the final probabilities after dividing by T")
    sc.add_argument("--top-k", type=int, default=None, metavar="K", help="score under top-k (final probabilities)")
    sc.add_argument("--top-p", type=float, default=None, metavar="P", help="score under top-p (final probabilities)")
    sc.add_argument("--alternatives", type=int, default=3, metavar="N", help="alternatives shown per step (default 3)")
    sc.add_argument("--save", default=None, metavar="FILE", help="save the trace to this parquet file")
    _model_group(sc, server=False)

    lab = sub.add_parser("lab", help="open JupyterLab on the notebooks, the default model converted first",
                         description="Convert the default model if needed, then start JupyterLab (needs pip "
                                     "install 'decoderlab[lab]').")
    lab.add_argument("folder", nargs="?", default=None,
                     help="the folder to open (default: the repository's notebooks/ where decoderlab runs from a "
                          "clone, else the current folder)")
    lab.add_argument("--port", type=int, default=None, metavar="PORT", help="JupyterLab's port (default: its own)")
    lab.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    lab.add_argument("jupyter_args", nargs=argparse.REMAINDER, metavar="...",
                     help="further options passed to JupyterLab as they are (e.g. --ServerApp.ip=0.0.0.0)")
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


def generate_words(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as `lm.generate`'s words; a flag left out is not passed (the API's default holds)."""
    words: dict[str, Any] = {}
    for name in ("max_new_tokens", "seed", *NUMBER_WORDS):
        if getattr(args, name, None) is not None:
            words[name] = getattr(args, name)
    if args.dola_layers is not None:
        layers = args.dola_layers
        words["dola_layers"] = layers if layers in ("low", "high") else [int(x) for x in layers.split(",")]
    if args.sample or any(w in words for w in SAMPLING_WORDS):
        if "penalty_alpha" not in words:  # contrastive search's top_k is its look-ahead, not a sampling word
            words["do_sample"] = True
    if "num_beams" in words:
        words.setdefault("num_return_sequences", words["num_beams"])
    return words


def _load(args: argparse.Namespace):
    import decoderlab as dl

    if getattr(args, "base_url", None) is not None:
        if args.model is None:
            raise ValueError("--base-url needs --model NAME: the model's name on that server")
        return dl.connect(base_url=args.base_url, model=args.model, logprobs=args.logprobs)
    return dl.load(args.model, dtype=args.dtype, device=args.device)


def _save(trace: Trace, path: str | None, html: str | None = None) -> int:
    for target, write in ((path, trace.save), (html, trace.to_html)):
        if target is None:
            continue
        try:
            print(f"\nsaved to {write(target)}")
        except OSError as err:
            print(f"decoderlab: error: cannot save the trace to {target}: {err}", file=sys.stderr)
            return 2
    return 0


def generate_main(args: argparse.Namespace) -> int:
    """Stream the tokens, then the table (and every beam's score for beam search)."""
    import decoderlab as dl

    extra = {"system": args.system} if args.system is not None else {}
    if args.attention or args.lens:
        extra["record"] = dl.Record(attention=args.attention, lens=args.lens)
    engine = _load(args)
    trace = engine.generate(args.prompt, chat=args.chat, progress=False,
                            on_token=lambda step, text: print(visible_text(text), end="", flush=True), **extra,
                            **generate_words(args))
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
    return _save(trace, args.save, args.html)


def compare_main(args: argparse.Namespace) -> int:
    """One line per strategy: the comparison's summary."""
    import decoderlab as dl

    strategies = {spec: strategy_words(spec) for spec in args.strategy}
    engine = _load(args)
    cmp = dl.compare(engine, args.prompt, strategies, seeds=range(args.seeds), max_new_tokens=args.max_new_tokens,
                     chat=args.chat, progress=False)
    cols = ["strategy", "runs", "length", "perplexity", "mean_entropy", "distinct_2", "repetition_pct", "self_bleu_4"]
    print(cmp.summary[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return 0


def score_main(args: argparse.Namespace) -> int:
    """The continuation's tokens as a table, then their summed log-probability and perplexity."""
    import math

    words = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p") if getattr(args, k) is not None}
    extra = {"system": args.system} if args.system is not None else {}
    trace = _load(args).score(args.prompt, args.continuation, chat=args.chat, **extra, **words)
    print(table(trace, args.alternatives))
    steps = trace.steps
    total = float(steps.final_logprob.sum() if words else steps.logprob.sum())
    which = "final (after the processors)" if words else "model"
    print(f"\n{len(steps)} tokens; {which} log-probability {total:.4f}; "
          f"perplexity {math.exp(-total / max(len(steps), 1)):.4f}")
    return _save(trace, args.save)


def notebooks_folder() -> Path:
    """The clone's notebooks/ when decoderlab runs from a clone, else the current folder."""
    clone = Path(__file__).resolve().parent.parent / "notebooks"
    return clone if clone.is_dir() else Path.cwd()


def lab_main(args: argparse.Namespace) -> int:
    """Convert the default model (once), then hand over to JupyterLab in this process."""
    import importlib.util

    import decoderlab as dl

    if importlib.util.find_spec("jupyterlab") is None:
        raise dl.MissingExtraError("the workbench needs JupyterLab: pip install 'decoderlab[lab]'")
    folder = Path(args.folder) if args.folder else notebooks_folder()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    from .engine.models import default_model_dir

    default_model_dir()  # the first run converts the bundled model here, with a progress bar, not in a notebook
    argv = [sys.executable, "-m", "jupyterlab", str(folder)]
    if args.port is not None:
        argv.append(f"--port={args.port}")
    if args.no_browser:
        argv.append("--no-browser")
    argv += args.jupyter_args
    if hasattr(os, "getuid") and os.getuid() == 0:
        argv.append("--allow-root")  # as root (containers), Jupyter refuses to start without it
    sys.stdout.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached


MAINS = {"generate": generate_main, "compare": compare_main, "score": score_main, "lab": lab_main}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the command, and turn decoderlab's errors into one line on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "generate")  # a prompt without a command: generate, as before commands existed
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help()
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import decoderlab as dl

    try:
        return MAINS[args.command](args)
    except (dl.DecoderlabError, ValueError) as err:
        print(f"decoderlab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
