"""Command lines of `scripts/analyze.py`, `scripts/generate.py`, `scripts/plot_attention.py` and
`scripts/export_torch.py`.

Each parses, checks its flags, and calls `reports` (files), `sampling` (text on stdout) or
`interop` (weights for PyTorch); bad input is one `error:` line and exit code 2, as for
`run_experiment.py`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tinylm_jax.analysis import reports
from tinylm_jax.analysis.attention_stats import STAT_WINDOWS
from tinylm_jax.analysis.corpus import open_corpus
from tinylm_jax.analysis.evaluation import evaluate_run, evaluation_markdown
from tinylm_jax.analysis.inference import (
    REFERENCE_PROMPTS,
    corpus_prompts,
    predicted_vs_actual,
    top_k_table,
)
from tinylm_jax.analysis.sampling import generate
from tinylm_jax.cli.console import OneLineParser, entry_point, print_paths
from tinylm_jax.core.config import UserError, check_seed, require_positive
from tinylm_jax.core.train import PRECISIONS
from tinylm_jax.reference.interop import check_representable, save_torch_weights
from tinylm_jax.run.checkpoint import load_run
from tinylm_jax.run.published import publish

# Analyses of several finished runs, written into --out (default: the first run's parent).
SEVERAL_RUNS = {
    "compare": lambda args, out: reports.write_comparison(args.run_dirs, out),
    "budget": lambda args, out: reports.write_budget(args.run_dirs, out),
    "spread": lambda args, out: reports.write_spread(args.run_dirs, out, args.command_line,
                                                     args.nats, args.data),
    "ablation": lambda args, out: reports.write_ablation(args.run_dirs, out, args.command_line),
}


def _common(parser: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    parser.add_argument("run_dir", type=Path, help="a run folder written by run_experiment.py")
    parser.add_argument("--data", help="the run's corpus (default: $TINYLM_DATA, else the "
                        "verified download cache)")
    if checkpoint:
        _which(parser, "analyse")


def _which(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--which", choices=("best", "latest"), default="best",
                        help=f"checkpoint to {verb} (default: best)")


def _several_runs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", type=Path, nargs="+", help="finished run folders")
    parser.add_argument("--out", type=Path, help="output folder (default: the first run's "
                        "parent)")


def _windows(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--windows", type=int, default=STAT_WINDOWS,
                        help=f"validation windows, evenly spread (default "
                        f"{STAT_WINDOWS})")


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--temperature", type=float, default=0.9,
                        help="softmax temperature; 0 is greedy (default 0.9, the reference's)")


def analyze_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="analyze.py", description="The reference report's figures and "
                           "tables from a finished run, written into its run folder.")
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS",
                                parser_class=OneLineParser)
    everything = sub.add_parser("all", help="every analysis below of one run, fp16-overflow "
                                "excepted (attention-epochs if the run recorded it)")
    _common(everything)
    _windows(everything)
    everything.add_argument("--seed", type=int, default=0, help="sampling seed for samples.md")
    _common(sub.add_parser("tokenizer", help="corpus and BPE statistics: tokenizer_report.md, "
                           "token_frequencies.png"), checkpoint=False)
    curves = sub.add_parser("curves", help="loss_curves.png and val_ppl.png from history.csv")
    curves.add_argument("run_dir", type=Path, help="a run folder")
    _several_runs(sub.add_parser("compare", help="several runs: comparison.md (Table 1 beside "
                                 "the reference's) and val_ppl_comparison.png"))
    _several_runs(sub.add_parser("budget", help="several runs: budget.md and budget.png, "
                                 "validation perplexity against training time, tokens and FLOPs "
                                 "(reference 5.2)"))
    spread = sub.add_parser("spread", help="sets of runs that differ only in the random seed "
                            "(--seeds folders, or run folders): spread.md and spread.png, the "
                            "run-to-run spread per experiment beside the reference")
    _several_runs(spread)
    spread.add_argument("--nats", action="store_true", help="add the figures in nats per token "
                        "and per character (reads each set's corpus)")
    spread.add_argument("--data", help="with --nats: the sets' corpus (default: $TINYLM_DATA, "
                        "else the verified download cache)")
    _several_runs(sub.add_parser("ablation", help="the full recipe's set of seeds, then the "
                                 "ablated settings' sets (sweep --ablate folders): ablation.md, "
                                 "each element's worth against the seeds' spread"))
    attention = sub.add_parser("attention", help="attention.npz for one sequence, and its maps")
    _common(attention)
    source = attention.add_mutually_exclusive_group()
    source.add_argument("--window", type=int, default=0, help="validation window index "
                        "(default 0: the first window of the reference's first validation batch)")
    source.add_argument("--text", help="your own text instead, at most seq_len tokens")
    attention.add_argument("--out", type=Path, help="export file (default RUN_DIR/attention.npz;"
                           " maps go to the folder of the same name)")
    stats = sub.add_parser("attention-stats", help="attention_stats.md/.csv: per-head numbers "
                           "over many validation windows")
    _common(stats)
    _windows(stats)
    similarity = sub.add_parser("head-similarity", help="head_similarity.md/.csv/.png: "
                                "Jensen-Shannon distances between heads (reference 5.1)")
    _common(similarity)
    _windows(similarity)
    epochs = sub.add_parser("attention-epochs", help="attention_by_epoch.png: the per-layer "
                            "attention statistics training recorded, against the epoch")
    epochs.add_argument("run_dir", type=Path, help="a run folder")
    topk = sub.add_parser("topk", help="the k likeliest next tokens per prompt, with bars")
    _common(topk)
    topk.add_argument("--prompt", action="append", help="a prompt (repeatable; default the "
                      f"reference's {', '.join(REFERENCE_PROMPTS)} on its corpus, else the "
                      "first words of three lines of the corpus's own validation text)")
    topk.add_argument("--k", type=int, default=5, help="tokens per prompt (default 5)")
    predict = sub.add_parser("predict", help="a validation window's start continued by the "
                             "model, beside the real text")
    _common(predict)
    predict.add_argument("--window", type=int, default=0, help="validation window index")
    _sampling_flags(predict)
    overflow = sub.add_parser("fp16-overflow", help="would the reference's fp16 GradScaler skip "
                              "steps at these weights? The reference's PyTorch model under fp16 "
                              "autocast, a table on stdout (needs torch)")
    _common(overflow)
    overflow.add_argument("--scales", default="16,17,18,19,20", help="loss scales as powers of "
                          "2, comma-separated (default 16,...,20: the replay's first 10,000 "
                          "steps)")
    overflow.add_argument("--batches", type=int, default=4, help="batches of random training "
                          "windows (default 4)")
    overflow.add_argument("--seed", type=int, default=0, help="window sampling seed (default 0)")
    return parser


def _scale_exponents(text: str) -> tuple[int, ...]:
    try:
        exponents = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--scales must be comma-separated integers, got {text!r}") from None
    if not all(0 <= e <= 120 for e in exponents):
        raise UserError(f"--scales must lie in [0, 120] (powers of 2), got {text!r}")
    return exponents


def fp16_overflow(args: argparse.Namespace) -> int:
    """The reference's scaler probe at a run's weights: a table on stdout, nothing written."""
    exponents = _scale_exponents(args.scales)
    require_positive("--batches", args.batches)
    try:  # torch is optional: only this probe and the interop tests need it
        from tinylm_jax.analysis.fp16_overflow import overflow_markdown, scaled_backwards
    except ImportError:
        raise UserError("fp16-overflow needs torch: pip install -e \".[torch]\"") from None
    corpus = open_corpus(args.run_dir, args.data)
    run = load_run(args.run_dir, args.which)
    try:  # the probe runs the reference's own model
        check_representable(run.config)
    except ValueError as err:
        raise UserError(f"{args.run_dir}: {err}") from None
    print(f"{args.run_dir}: {args.which} checkpoint, after epoch {run.epoch}")
    print(overflow_markdown(scaled_backwards(run, corpus, exponents, args.batches, args.seed)),
          end="")
    return 0


def _check_sampling(args: argparse.Namespace) -> None:
    check_seed(getattr(args, "seed", 0), "--seed")
    temperature = getattr(args, "temperature", 0.0)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0, got {temperature}")


def analyze(args: argparse.Namespace) -> int:
    _check_sampling(args)
    if args.analysis in SEVERAL_RUNS:
        out = args.out or args.run_dirs[0].resolve().parent
        print_paths(SEVERAL_RUNS[args.analysis](args, out))
        return 0
    run_dir = args.run_dir
    if args.analysis == "curves":
        print_paths(reports.write_curves(run_dir))
        return 0
    if args.analysis == "attention-epochs":
        print_paths(reports.write_attention_epochs(run_dir))
        return 0
    if args.analysis == "fp16-overflow":
        return fp16_overflow(args)
    if args.analysis == "all":
        print_paths(reports.analyze_run(run_dir, args.data, args.which, args.windows, args.seed))
        return 0
    if args.analysis == "topk" and not 1 <= args.k <= 50:
        raise UserError(f"--k must lie in [1, 50], got {args.k}")
    corpus = open_corpus(run_dir, args.data)
    if args.analysis == "tokenizer":
        print_paths(reports.write_tokenizer_study(run_dir, corpus))
        return 0
    if args.analysis in ("attention-stats", "head-similarity"):
        windows = reports.stat_windows(corpus, args.windows)  # a bad count refused before loading
    run = load_run(run_dir, args.which)
    if args.analysis == "attention":
        print_paths(reports.write_attention(run_dir, run, corpus, args.which, args.window,
                                             args.text, args.out))
    elif args.analysis == "attention-stats":
        print_paths(reports.write_attention_stats(run_dir, run, corpus, windows))
    elif args.analysis == "head-similarity":
        print_paths(reports.write_head_similarity(run_dir, run, corpus, windows))
    elif args.analysis == "topk":
        print(top_k_table(run, corpus, tuple(args.prompt or ()), args.k), end="")
    else:
        continuation = predicted_vs_actual(run, corpus, args.window, args.temperature,
                                           args.seed)
        print(f"[prompt: the first {continuation.prompt_len} tokens]\n{continuation.prompt}\n\n"
              f"[actual]\n{continuation.actual}\n\n[predicted]\n{continuation.predicted}")
    return 0


analyze_main = entry_point(analyze_parser, analyze)


def generate_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="generate.py", description="Sample text from a run's checkpoint.")
    _common(parser)
    parser.add_argument("--prompt", help=f"text to continue (default {REFERENCE_PROMPTS[0]!r} "
                        "on the reference's corpus, else the first words of a line of the "
                        "corpus's own validation text)")
    parser.add_argument("--max-new-tokens", type=int, default=50,
                        help="tokens to generate (default 50, the reference's)")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample only among the k likeliest tokens (default 0: all)")
    _sampling_flags(parser)
    return parser


def generate_text(args: argparse.Namespace) -> int:
    _check_sampling(args)
    require_positive("--max-new-tokens", args.max_new_tokens)
    corpus = open_corpus(args.run_dir, args.data)
    vocab_size = corpus.tokenizer.get_vocab_size()
    if not 0 <= args.top_k <= vocab_size:
        raise UserError(f"--top-k must lie in [0, {vocab_size}] (0: all tokens), got "
                        f"{args.top_k}")
    prompt = corpus_prompts(corpus)[0] if args.prompt is None else args.prompt
    prompt_ids = corpus.encode_prompt(prompt)
    run = load_run(args.run_dir, args.which)
    ids = generate(run.model, run.params, prompt_ids, args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(corpus.decode(ids))
    return 0


generate_main = entry_point(generate_parser, generate_text)


def plot_attention_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="plot_attention.py", description="Heatmaps from an attention "
                           "export: one per (layer, head) and a grid of all.")
    parser.add_argument("export", type=Path, help="an .npz written by `analyze.py attention`")
    parser.add_argument("--out", type=Path, help="output folder (default: beside the file, "
                        "named after it)")
    return parser


def plot_attention(args: argparse.Namespace) -> int:
    print_paths(reports.write_attention_maps(args.export, args.out))
    return 0


plot_attention_main = entry_point(plot_attention_parser, plot_attention)


def export_torch_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="export_torch.py", description="A run's weights as the reference "
                           "notebook's PyTorch state_dict, in a safetensors file: "
                           "model.load_state_dict(safetensors.torch.load_file(OUT)).")
    parser.add_argument("run_dir", type=Path, help="a run folder written by run_experiment.py")
    parser.add_argument("--out", type=Path, required=True,
                        help="the .safetensors file to write (replaced if it exists)")
    _which(parser, "export")
    return parser


def export_torch(args: argparse.Namespace) -> int:
    out = args.out
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: --out must be a .safetensors file")
    if out.is_dir():
        raise UserError(f"{out}: is a folder")
    reports.output_folder(out.parent)  # refused before the run is loaded
    run = load_run(args.run_dir, args.which)
    metadata = {"run_dir": str(args.run_dir), "checkpoint": args.which, "position": run.position}
    try:
        print_paths([save_torch_weights(run.params, run.config, out, metadata)])
    except ValueError as err:  # a model the reference's cannot hold
        raise UserError(f"{args.run_dir}: {err}") from None
    return 0


export_torch_main = entry_point(export_torch_parser, export_torch)


def publish_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="publish.py", description="A run's weights (the average where it "
                           "keeps one) as one safetensors file, with its config, tokenizer, "
                           "history and summary: a folder that evaluate, generate and analyze "
                           "read as they read the run.")
    parser.add_argument("run_dir", type=Path, help="a run folder")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (replaced "
                        "if it holds an earlier publication)")
    _which(parser, "publish")
    return parser


def publish_run(args: argparse.Namespace) -> int:
    print_paths(publish(args.run_dir, args.out, args.which))
    return 0


publish_main = entry_point(publish_parser, publish_run)


def evaluate_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="evaluate.py", description="A run's validation perplexity, nats "
                           "per token and nats per character, recomputed from its weights over "
                           "every validation window of its corpus.")
    parser.add_argument("run_dir", type=Path, help="a run folder")
    parser.add_argument("--data", help="the run's corpus (default: $TINYLM_DATA, else the cache)")
    _which(parser, "evaluate")
    parser.add_argument("--precision", choices=PRECISIONS, help="compute precision (default: "
                        "the run's own, which reproduces its history's figure)")
    return parser


def evaluate(args: argparse.Namespace) -> int:
    result = evaluate_run(args.run_dir, args.data, args.which, args.precision)
    print(evaluation_markdown(args.run_dir, args.which, result), end="")
    return 0


evaluate_main = entry_point(evaluate_parser, evaluate)
