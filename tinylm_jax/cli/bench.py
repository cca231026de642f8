"""Command lines of `scripts/benchmark.py` (training speed against the reference's PyTorch loop),
`scripts/profile_step.py` (where a step's time goes) and `scripts/attention_scaling.py` (cost
against context length, reference 5.5)."""

from __future__ import annotations

import argparse
import importlib.util
import platform
from pathlib import Path

from tinylm_jax.analysis.reports import output_folder
from tinylm_jax.bench.benchmark import machine_description, run_benchmark
from tinylm_jax.bench.gemm_rates import gemm_rates_markdown
from tinylm_jax.bench.scaling import (
    DEFAULT_LENGTHS,
    Plan,
    measure,
    plan,
    write_scaling,
)
from tinylm_jax.bench.step_profile import profile_markdown, profile_step
from tinylm_jax.cli.console import (
    OneLineParser,
    entry_point,
    print_paths,
)
from tinylm_jax.core.bf16 import keep_host_buffers
from tinylm_jax.core.config import (
    EXPERIMENT_NAMES,
    ExperimentConfig,
    UserError,
    load_config,
    require_positive,
)
from tinylm_jax.core.data import resolve_corpus
from tinylm_jax.core.files import write_text_atomic
from tinylm_jax.core.train import PRECISIONS, default_steps_per_chunk
from tinylm_jax.core.versions import package_versions
from tinylm_jax.run.products import PRODUCTS, products_for


def _print_report(report: str, out: Path | None) -> int:
    """Print a Markdown report, and write it to `out` too when given."""
    print(report, end="")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, report)
        print_paths([out])
    return 0


def benchmark_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="benchmark.py", description="Training speed of this project "
                           "against the reference notebook's PyTorch loop, as a Markdown table.")
    parser.add_argument("experiments", nargs="*", default=list(EXPERIMENT_NAMES),
                        help="experiment names or TOML paths (default: all three)")
    parser.add_argument("--data", help="corpus (default: $TINYLM_DATA, else the cache)")
    parser.add_argument("--steps", type=int, help="steps per measurement (default: the "
                        "training chunk, 10 on CPU and 100 on GPU/TPU)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per figure")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--devices", type=int, help="split batches over the first N devices")
    parser.add_argument("--no-torch", action="store_true", help="measure this project only")
    parser.add_argument("--out", type=Path, help="also write the table to this .md file")
    return parser


def benchmark(args: argparse.Namespace) -> int:
    keep_host_buffers()  # as training does
    steps = args.steps if args.steps is not None else default_steps_per_chunk()
    require_positive("--steps", steps)
    require_positive("--repeats", args.repeats)
    for name in args.experiments:
        load_config(name)
    if not args.no_torch and importlib.util.find_spec("torch") is None:
        raise UserError("torch is not installed: pip install torch, or pass --no-torch")
    corpus = resolve_corpus(args.data)
    report = run_benchmark(args.experiments, corpus, steps, args.repeats, args.precision,
                           args.devices, not args.no_torch, log=print)
    return _print_report(report, args.out)


benchmark_main = entry_point(benchmark_parser, benchmark)


def profile_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="profile_step.py", description="Where one training step's time "
                           "goes: every instruction of the compiled step, by kind and by model "
                           "part, and every matrix product's shapes, layouts and GFLOP/s, as "
                           "Markdown. Random tokens; no corpus.")
    parser.add_argument("experiments", nargs="*", default=list(EXPERIMENT_NAMES),
                        help="experiment names or TOML paths (default: all three)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="compute precision (bf16 on a CPU: the fast path)")
    parser.add_argument("--products", default="auto", choices=PRODUCTS,
                        help="where the bf16 products run (as for training)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps, after a warm-up "
                        "(default 3)")
    parser.add_argument("--out", type=Path, help="also write the report to this .md file")
    return parser


def profile(args: argparse.Namespace) -> int:
    keep_host_buffers()  # as training does
    require_positive("--steps", args.steps)
    configs = [load_config(name) for name in args.experiments]
    report = profile_markdown([
        profile_step(cfg, args.precision, args.steps,
                     products_for(args.precision, args.products, cfg)[0])
        for cfg in configs])
    return _print_report(report, args.out)


profile_main = entry_point(profile_parser, profile)


def scaling_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="attention_scaling.py", description="How the seconds and memory "
                           "of a training step and of its attention sub-layer grow with the "
                           "context length (reference 5.5); no training, no corpus.")
    parser.add_argument("--experiment", default="baseline", help="the model: an experiment "
                        "name or TOML path (default baseline); seq_len and batch_size are set "
                        "per measurement")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                        help="context lengths L (default: 32 64 128 256 512)")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch in the "
                        "fixed-tokens setting, B = tokens / L (default 32768)")
    parser.add_argument("--windows", type=int, default=64, help="windows per batch in the "
                        "fixed-windows setting (default 64)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="compute precision (default fp32; bf16 takes the CPU fast path)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement, "
                        "after a warm-up; the median is kept (default 3)")
    parser.add_argument("--out", type=Path, default=Path("runs/attention_scaling"),
                        help="output folder (default runs/attention_scaling)")
    return parser


def _check(args: argparse.Namespace) -> tuple[ExperimentConfig, Plan]:
    """The experiment and every config to measure; bad input refused before anything runs."""
    require_positive("--lengths", min(args.lengths))
    for flag, value in (("--tokens", args.tokens), ("--windows", args.windows),
                        ("--repeats", args.repeats)):
        require_positive(flag, value)
    if len(set(args.lengths)) != len(args.lengths) or len(args.lengths) < 2:
        raise UserError("--lengths needs two or more distinct lengths to fit an exponent")
    base = load_config(args.experiment)
    configs = plan(base, sorted(args.lengths), args.tokens, args.windows)
    output_folder(args.out)
    return base, configs


def scaling(args: argparse.Namespace) -> int:
    keep_host_buffers()  # as training does
    base, configs = _check(args)
    rows = measure(configs, args.precision, args.repeats)
    print_paths(write_scaling(rows, base, args.precision, args.repeats, args.command_line,
                              args.out))
    return 0


scaling_main = entry_point(scaling_parser, scaling)


def gemm_rates_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gemm_rates.py", description="GFLOP/s of the CPU fast path's "
                           "dense bf16 products at the experiments' shapes, forward and both "
                           "gradients, on XLA and on the vendor GEMM (the cpu extra), as "
                           "Markdown. Random operands; no corpus.")
    parser.add_argument("experiments", nargs="*", default=list(EXPERIMENT_NAMES),
                        help="experiment names or TOML paths (default: all three)")
    parser.add_argument("--rows", type=int, default=32768, help="rows of each product: tokens "
                        "per batch (default 32768, the reference's 512 x 64)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per figure "
                        "(median; default 10)")
    parser.add_argument("--out", type=Path, help="also write the table to this .md file")
    return parser


def gemm_rates(args: argparse.Namespace) -> int:
    keep_host_buffers()  # as training does
    require_positive("--rows", args.rows)
    require_positive("--repeats", args.repeats)
    configs = [load_config(name) for name in args.experiments]
    versions = ", ".join(f"{pkg} {version}" for pkg, version in package_versions().items()
                         if pkg in ("jax", "jaxlib"))
    report = (f"# Dense bf16 products: XLA and the vendor GEMM\n\n- Machine: "
              f"{machine_description()}.\n- Versions: {versions}; Python "
              f"{platform.python_version()}.\n- Reproduce: `{args.command_line}`.\n\n"
              + gemm_rates_markdown(configs, args.rows, args.repeats))
    return _print_report(report, args.out)


gemm_rates_main = entry_point(gemm_rates_parser, gemm_rates)
