"""Writers of the analysis files of a run folder; each returns the paths it wrote.

Files in a run folder after `analyze all` (reference section in brackets):
  tokenizer_report.md, token_frequencies.png          tokenizer study [2]
  loss_curves.png, val_ppl.png                         training curves [4.1]
  attention.npz, attention/*.png                       one window's attention and its maps [4.2]
  attention_stats.md, attention_stats.csv              per-head statistics over many windows [5.1]
  head_similarity.md, .csv, .png                       distances between heads [5.1]
  attention_by_epoch.png                               those statistics during training [5.3]
  samples.md                                           top-k, predicted vs actual, a sample [4.3]
A comparison of several runs (comparison.md, val_ppl_comparison.png [3.4-3.5]; budget.md,
budget.png [5.2]) goes to their common parent folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tinylm_jax.analysis import plots
from tinylm_jax.analysis.ablation import ablation_markdown
from tinylm_jax.analysis.attention import (
    export_attention,
    head_similarity,
    load_attention,
    similarity_markdown,
    similarity_rows,
    stats_markdown,
)
from tinylm_jax.analysis.attention_stats import (
    STAT_NAMES,
    STAT_WINDOWS,
    StatWindows,
    head_statistics,
    read_attention_record,
    stats_rows,
)
from tinylm_jax.analysis.budget import budget_markdown, reference_curve, run_curve
from tinylm_jax.analysis.corpus import RunCorpus, open_corpus
from tinylm_jax.analysis.evaluation import validation_characters
from tinylm_jax.analysis.inference import corpus_prompts, predicted_vs_actual, top_k_table
from tinylm_jax.analysis.runs import (
    comparison_table,
    epoch_table,
    read_finished_runs,
    reference_partners,
)
from tinylm_jax.analysis.sampling import generate
from tinylm_jax.analysis.spread import read_sets, spread_markdown, sweep_markdown
from tinylm_jax.analysis.tokenizer_study import tokenizer_report, tokenizer_study
from tinylm_jax.core.config import UserError
from tinylm_jax.core.files import write_csv_atomic, write_text_atomic
from tinylm_jax.reference.table1 import REFERENCE_VAL_PPL
from tinylm_jax.run.checkpoint import LoadedRun, load_run
from tinylm_jax.run.folder import RunFolder


def output_folder(path: Path) -> Path:
    """`path`, refused up front if something other than a folder is in the way."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a folder")
    return path


def maps_folder(export_path: Path) -> Path:
    """Where an export's heatmaps go by default: beside it, named after it."""
    if export_path.suffix != ".npz":
        raise UserError(f"{export_path}: an attention export must be a .npz file")
    return output_folder(export_path.with_suffix(""))


def write_tokenizer_study(run_dir: Path, corpus: RunCorpus) -> list[Path]:
    study = tokenizer_study(corpus)
    figure = plots.token_frequencies(study.top_tokens, run_dir / "token_frequencies.png")
    report = run_dir / "tokenizer_report.md"
    write_text_atomic(report, tokenizer_report(study, figure.name))
    return [report, figure]


def write_curves(run_dir: Path) -> list[Path]:
    """Loss and validation perplexity per epoch, from history.csv alone."""
    folder = RunFolder(run_dir)
    name, history = folder.read_config().name, folder.read_history()
    return [plots.loss_curves(history, name, run_dir / "loss_curves.png"),
            plots.val_perplexity(history, name, run_dir / "val_ppl.png")]


def write_comparison(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Table 1 and figure 2 for finished runs, keyed by run folder name, the reference's curves
    dashed beside the first run of each; that run's epochs beside the reference's printed log."""
    runs = read_finished_runs(run_dirs)
    histories = {run.label: run.folder.read_history() for run in runs}
    references = {label: REFERENCE_VAL_PPL[name]
                  for label, name in reference_partners(runs).items()}
    output_folder(out_dir).mkdir(parents=True, exist_ok=True)
    table = out_dir / "comparison.md"
    sections = [comparison_table({run.name: run.summary for run in runs})]
    sections += [f"## {label}, epoch by epoch\n\n{epoch_table(histories[label], curve)}"
                 for label, curve in references.items()]
    write_text_atomic(table, "\n".join(sections))
    return [table, plots.perplexity_comparison(histories, out_dir / "val_ppl_comparison.png",
                                               references)]


def write_budget(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Reference 5.2: perplexity against training time, tokens and FLOPs for finished runs
    (budget.md, budget.png), the reference's curves beside the runs of its experiments."""
    runs = read_finished_runs(run_dirs)
    curves = [run_curve(run) for run in runs]
    references = {label: reference_curve(name) for label, name in reference_partners(runs).items()}
    output_folder(out_dir).mkdir(parents=True, exist_ok=True)
    figure = plots.budget_curves(curves, references, out_dir / "budget.png")
    table = out_dir / "budget.md"
    write_text_atomic(table, budget_markdown(curves, list(references.values()), figure.name))
    return [table, figure]


def write_spread(paths: list[Path], out_dir: Path, command: str, nats: bool = False,
                 data: str | None = None) -> list[Path]:
    """The run-to-run spread of the sets of runs (or runs) under `paths`: spread.md, spread.png;
    with `nats`, its figures in nats per token and per character too, the characters of the
    windows each set's validation read, counted with its first run's tokenizer in its corpus
    (`data`, else $TINYLM_DATA or the cache, checked against the set's sha256)."""
    if data is not None and not nats:
        raise UserError("spread: --data is read only with --nats")
    sets = read_sets(paths)
    chars_per_token = None
    if nats:
        counts = {group.label: validation_characters(open_corpus(group.runs[0].folder, data),
                                                     group.config.eval_windows)
                  for group in sets}
        chars_per_token = {label: chars / tokens for label, (tokens, chars) in counts.items()}
    output_folder(out_dir).mkdir(parents=True, exist_ok=True)
    figure = plots.spread_bands(sets, out_dir / "spread.png")
    report = out_dir / "spread.md"
    write_text_atomic(report, spread_markdown(sets, figure.name, command, chars_per_token))
    return [report, figure]


def write_ablation(paths: list[Path], out_dir: Path, command: str) -> list[Path]:
    """An ablation's table (ablation.md): the first of `paths` is the full recipe's set of
    seeds, the others the ablated settings' sets (a sweep's `--ablate` folders) or runs."""
    if len(paths) < 2:
        raise UserError("ablation: give the full recipe's set of seeds, then the ablated sets")
    full = read_sets(paths[:1])
    if len(full) > 1:
        raise UserError(f"ablation: {paths[0]} holds runs of more than one protocol")
    output_folder(out_dir).mkdir(parents=True, exist_ok=True)
    report = out_dir / "ablation.md"
    write_text_atomic(report, ablation_markdown(full[0], read_sets(paths[1:]), command))
    return [report]


def write_sweep(sweep_dir: Path, command: str) -> list[Path]:
    """A sweep's table and figure (sweep.md, sweep.png) in its folder: each setting's folder a
    set of seeds, in name order; members not finished are left out."""
    settings = sorted(path for path in Path(sweep_dir).iterdir() if path.is_dir())
    sets = read_sets(settings)
    figure = plots.spread_bands(sets, Path(sweep_dir) / "sweep.png")
    report = Path(sweep_dir) / "sweep.md"
    write_text_atomic(report, sweep_markdown(sets, figure.name, command))
    return [report, figure]


def attention_metadata(run_dir: Path, run: LoadedRun, which: str, source: str) -> dict[str, Any]:
    """What an export needs to say where it came from."""
    return {"run_dir": str(run_dir), "experiment": run.config.name, "checkpoint": which,
            "epoch": run.epoch, "position": run.position, "source": source,
            "config": run.config.to_dict()}


def write_attention(run_dir: Path, run: LoadedRun, corpus: RunCorpus, which: str,
                    window: int = 0, text: str | None = None, out: Path | None = None
                    ) -> list[Path]:
    """Export one sequence's attention (a validation window, or `text`) and draw its maps."""
    path = out or run_dir / "attention.npz"
    maps_folder(path)
    if text is None:
        start, ids = corpus.validation_window(window)
        source = f"validation window {window} (corpus tokens {start}-{start + len(ids) - 1})"
    else:
        ids = np.asarray(corpus.encode_prompt(text), np.int32)
        if len(ids) > corpus.config.seq_len:
            raise UserError(f"--text is {len(ids)} tokens; the model reads at most "
                            f"{corpus.config.seq_len}")
        source = f"text: {text!r}"
    tokens = [corpus.tokenizer.id_to_token(int(i)) for i in ids]
    export = export_attention(run.model, run.params, ids, tokens,
                              attention_metadata(run_dir, run, which, source))
    export.save(path)
    return [path, *write_attention_maps(path)]


def write_attention_maps(export_path: Path, out_dir: Path | None = None) -> list[Path]:
    """One heatmap per (layer, head) and a grid of all, beside the export by default."""
    out_dir = output_folder(out_dir) if out_dir else maps_folder(export_path)
    export = load_attention(export_path)
    subtitle = plots.describe_source(export.metadata)
    tokens = [str(t) for t in export.tokens]
    layers, heads = export.attention.shape[:2]
    paths = [plots.attention_head(export.attention[layer, head], tokens,
                                  f"Layer {layer}, head {head} attention\n{subtitle}",
                                  out_dir / f"layer{layer}_head{head}.png")
             for layer in range(layers) for head in range(heads)]
    paths.append(plots.attention_grid(export.attention, f"All heads\n{subtitle}",
                                      out_dir / "grid.png"))
    return paths


def stat_windows(corpus: RunCorpus, num_windows: int = STAT_WINDOWS) -> StatWindows:
    """The validation windows attention-stats and head-similarity average over."""
    return StatWindows.spread(corpus.ids, corpus.splits, corpus.tokenizer, num_windows)


def write_attention_stats(run_dir: Path, run: LoadedRun, corpus: RunCorpus,
                          windows: StatWindows) -> list[Path]:
    num_windows = len(windows.ids)
    heads, uniform = head_statistics(run.model, run.params, windows.ids, windows.punct_keys)
    rows = stats_rows(heads, uniform)
    table = run_dir / "attention_stats.csv"
    write_csv_atomic(table, ["layer", "head", *STAT_NAMES], rows)
    report = run_dir / "attention_stats.md"
    source = f"{run.config.name}, {corpus.config.seq_len} tokens each, {run.position}"
    write_text_atomic(report, stats_markdown(rows, num_windows, source))
    return [report, table]


def write_head_similarity(run_dir: Path, run: LoadedRun, corpus: RunCorpus,
                          windows: StatWindows) -> list[Path]:
    """Reference 5.1's "redundancy with variation": distances between heads, on the windows of
    attention-stats."""
    num_windows = len(windows.ids)
    distances, to_uniform = head_similarity(run.model, run.params, windows.ids)
    heads = distances.shape[1]
    table = run_dir / "head_similarity.csv"
    write_csv_atomic(table, ["layer", "head", *map(str, range(heads)), "uniform"],
                     similarity_rows(distances, to_uniform))
    source = f"{run.config.name}, {corpus.config.seq_len} tokens each, {run.position}"
    figure = plots.head_similarity(distances, f"Distance between heads\n{source}",
                                   run_dir / "head_similarity.png")
    report = run_dir / "head_similarity.md"
    write_text_atomic(report, similarity_markdown(distances, to_uniform, num_windows, source,
                                                  figure.name))
    return [report, table, figure]


def write_attention_epochs(run_dir: Path) -> list[Path]:
    """The attention statistics training recorded per epoch, drawn from attention_by_epoch.csv."""
    folder = RunFolder(run_dir)
    name, rows = folder.read_config().name, read_attention_record(folder)
    return [plots.attention_by_epoch(rows, name, run_dir / "attention_by_epoch.png")]


def samples_markdown(run: LoadedRun, corpus: RunCorpus, which: str, seed: int = 0,
                     max_new_tokens: int = 100, temperature: float = 0.9) -> str:
    continuation = predicted_vs_actual(run, corpus, window=0, temperature=temperature, seed=seed)
    prompt = corpus_prompts(corpus)[0]  # the top-k table's first
    prompt_ids = corpus.encode_prompt(prompt)
    sample = corpus.decode(generate(run.model, run.params, prompt_ids, max_new_tokens,
                                    temperature=temperature, seed=seed))
    fence = "```"
    return "\n".join([
        f"# Samples: {run.config.name} ({which} checkpoint, {run.position})", "",
        "## Top-5 next tokens", "", fence, top_k_table(run, corpus).rstrip(), fence, "",
        "## Predicted vs actual (validation window 0)", "",
        f"Prompt: the window's first {continuation.prompt_len} tokens; the model continues to "
        f"{corpus.config.seq_len} tokens (temperature {temperature}, seed {seed}).", "",
        "Actual:", "", fence, continuation.actual, fence, "",
        "Predicted:", "", fence, continuation.predicted, fence, "",
        f"## Sample: {max_new_tokens} tokens after {prompt!r}", "",
        f"Temperature {temperature}, all tokens, seed {seed}.", "",
        fence, sample, fence, ""])


def write_samples(run_dir: Path, run: LoadedRun, corpus: RunCorpus, which: str,
                  seed: int = 0) -> list[Path]:
    path = run_dir / "samples.md"
    write_text_atomic(path, samples_markdown(run, corpus, which, seed))
    return [path]


def analyze_run(run_dir: Path, data: str | None = None, which: str = "best",
                num_windows: int = STAT_WINDOWS, seed: int = 0) -> list[Path]:
    """Every per-run analysis above, from the run's `which` checkpoint. Whatever can refuse the
    input (history, window count, prompts the tokenizer cannot encode) is checked first."""
    corpus = open_corpus(run_dir, data)
    folder = RunFolder(run_dir)
    folder.read_history()
    read_attention_record(folder)
    windows = stat_windows(corpus, num_windows)
    for prompt in corpus_prompts(corpus):  # the top-k table's, and the sample's first
        corpus.encode_prompt(prompt)
    run = load_run(run_dir, which)
    return (write_tokenizer_study(run_dir, corpus) + write_curves(run_dir)
            + write_attention(run_dir, run, corpus, which)
            + write_attention_stats(run_dir, run, corpus, windows)
            + write_head_similarity(run_dir, run, corpus, windows)
            + write_samples(run_dir, run, corpus, which, seed)
            + write_attention_epochs(run_dir))
