"""`tinylm`: every command of the kit under one name, e.g. `tinylm train wider`.

Each subcommand is the command line of the script of the same job in scripts/, with its own
`--help`; a subcommand's module is imported only when it runs, so that `tinylm --help` is quick.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

# name: (module in tinylm_jax.cli, its main, the script it mirrors, what it does)
COMMANDS = {
    "train": ("run_experiment", "main", "run_experiment.py",
              "train an experiment (the reference's or your own), all three, or a set of seeds"),
    "sweep": ("sweep", "main", "sweep.py",
              "a grid of overrides (or an ablation) times a set of seeds, with their table"),
    "analyze": ("analyze", "analyze_main", "analyze.py",
                "the reference report's figures and tables, spreads and ablations, from runs"),
    "evaluate": ("analyze", "evaluate_main", "evaluate.py",
                 "a run's validation perplexity, nats per token and per character"),
    "generate": ("analyze", "generate_main", "generate.py", "sample text from a run"),
    "plot-attention": ("analyze", "plot_attention_main", "plot_attention.py",
                       "heatmaps from an attention export"),
    "export-torch": ("analyze", "export_torch_main", "export_torch.py",
                     "a run's weights for the reference's PyTorch model"),
    "publish": ("analyze", "publish_main", "publish.py",
                "a run's weights as one safetensors file, with its config and tokenizer"),
    "bench": ("bench", "benchmark_main", "benchmark.py",
              "training speed beside the reference's PyTorch loop"),
    "profile-step": ("bench", "profile_main", "profile_step.py",
                     "where one training step's time goes"),
    "gemm-rates": ("bench", "gemm_rates_main", "gemm_rates.py",
                   "the dense products' GFLOP/s, XLA against the vendor GEMM"),
    "attention-scaling": ("bench", "scaling_main", "attention_scaling.py",
                          "cost against context length (reference 5.5)"),
    "time-to-quality": ("time_to_quality", "main", "time_to_quality.py",
                        "steps and seconds until validation first reaches a perplexity"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tinylm COMMAND [ARGS...]   (tinylm COMMAND --help for its options)", "",
             "A small-language-model study kit: the reference report's tiny Transformer "
             "replayed", "exactly, and your own experiments (TOML files, --set, sweeps).", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, _, _, what) in COMMANDS.items()]
    scripts = ", ".join(f"{script} ({name})" for name, (_, _, script, _) in COMMANDS.items())
    lines += ["", *textwrap.wrap(f"The same commands as scripts in a checkout's scripts/: "
                                 f"{scripts}.", 79)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        from tinylm_jax.cli.console import EXIT_USER_ERROR  # (imports jax: only when needed)

        told = f"unknown command '{argv[0]}'" if argv else "no command given"
        print(f"error: {told}; choose one of {', '.join(COMMANDS)} (see tinylm --help)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    name, rest = argv[0], argv[1:]
    module, function, _, _ = COMMANDS[name]
    command = getattr(importlib.import_module(f"tinylm_jax.cli.{module}"), function)
    return command(rest, prog=f"tinylm {name}")


if __name__ == "__main__":
    sys.exit(main())
