"""Speed, side by side: this project's compiled chunks against the reference notebook's
PyTorch loop.

Both train the same model on the same real batches of 512 windows. Each figure is measured over
`steps` steps, `repeats` times after a warm-up, and reported as the median with its range;
compilation is timed on its own (ahead of time, `jit(...).lower(...).compile()`). The PyTorch
loop is the reference's: windows materialised with `torch.stack`, a shuffling `DataLoader`, AdamW,
clipping, `loss.item()` every step, and autocast + GradScaler on CUDA.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from tinylm_jax.core.config import ExperimentConfig, UserError, load_config
from tinylm_jax.core.data import (
    Dataset,
    batch_rows,
    build_dataset,
    num_batches,
    read_corpus,
    train_order,
)
from tinylm_jax.core.model import model_flops_per_step
from tinylm_jax.core.parallel import check_batch_fits, data_mesh, replicate, shard_batch_rows
from tinylm_jax.core.train import (
    compute_dtype_name,
    create_train_state,
    eval_chunk,
    train_chunk,
)
from tinylm_jax.core.versions import cpu_name, package_versions
from tinylm_jax.run.products import products_for
from tinylm_jax.run.timing import timed

# Dense bf16 peak FLOP/s by device kind (vendor datasheets), for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class PathResult:
    """One training path on one experiment."""

    path: str  # which implementation
    step_s: list[float]  # seconds per training step, one value per repeat
    eval_batch_s: list[float]  # seconds per validation batch, one value per repeat
    compile_s: float | None  # ahead-of-time compilation of the train and eval chunks
    peak_device_bytes: int | None  # where the backend reports it

    def train_tokens_per_s(self, cfg: ExperimentConfig) -> float:
        return cfg.batch_size * cfg.seq_len / statistics.median(self.step_s)

    def eval_tokens_per_s(self, cfg: ExperimentConfig) -> float:
        return cfg.batch_size * cfg.seq_len / statistics.median(self.eval_batch_s)

    def epoch_s(self, cfg: ExperimentConfig, data: Dataset) -> float:
        """One epoch's training plus a full validation pass, from the median rates."""
        return (statistics.median(self.step_s) * num_batches(data.splits.num_train,
                                                             cfg.batch_size)
                + statistics.median(self.eval_batch_s) * num_batches(data.splits.num_val,
                                                                     cfg.batch_size))


OURS = "tinylm-jax"


def measure_ours(cfg: ExperimentConfig, data: Dataset, steps: int, repeats: int,
                 precision: str, mesh: jax.sharding.Mesh, products: str = "xla") -> PathResult:
    state = replicate(create_train_state(cfg, precision, products=products), mesh)
    tokens = replicate(data.tokens, mesh)
    train_rows = batch_rows(train_order(cfg.seed, 1, data.splits.num_train), cfg.batch_size)
    val_rows = batch_rows(data.splits.validation_starts(), cfg.batch_size)
    # `steps` batches of each split, wrapping round where a split has fewer.
    train_in = shard_batch_rows({k: np.resize(v, (steps, *v.shape[1:]))
                                 for k, v in train_rows.items()}, mesh)
    val_in = shard_batch_rows({k: np.resize(v, (steps, *v.shape[1:]))
                               for k, v in val_rows.items()}, mesh)
    began = time.perf_counter()
    train = train_chunk.lower(state, tokens, train_in["starts"], train_in["weights"],
                              seq_len=cfg.seq_len).compile()
    evaluate = eval_chunk.lower(state, tokens, val_in["starts"], val_in["weights"],
                                seq_len=cfg.seq_len).compile()
    compile_s = time.perf_counter() - began

    def train_steps():
        nonlocal state
        state, metrics = train(state, tokens, train_in["starts"], train_in["weights"])
        jax.block_until_ready(metrics)

    step_s = timed(train_steps, steps, repeats)
    eval_s = timed(lambda: jax.block_until_ready(evaluate(state, tokens, val_in["starts"],
                                                           val_in["weights"])), steps, repeats)
    stats = jax.devices()[0].memory_stats() or {}
    path = OURS if products == "xla" else f"{OURS} ({products})"
    return PathResult(path, step_s, eval_s, compile_s, stats.get("peak_bytes_in_use"))


def _endless(loader: Iterable) -> Iterator:
    """A DataLoader's batches, epoch after epoch (reshuffled each time, as the reference's)."""
    while True:
        yield from loader


def measure_reference_torch(cfg: ExperimentConfig, data: Dataset, steps: int, repeats: int,
                       cpu_bf16: bool = False) -> PathResult:
    """The reference notebook's loop, step for step (its model from `torch_reference`).

    `cpu_bf16`: on a CPU, the same loop under `torch.autocast("cpu", torch.bfloat16)`, the
    strongest CPU peer (oneDNN's AMX/AVX512-BF16 kernels); there is no scaler to replay on CPU.
    """
    import torch

    from tinylm_jax.reference.torch_reference import TinyTransformerLM, reference_windows

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    autocast = {"device_type": device.type, "enabled": cuda or cpu_bf16,
                "dtype": torch.float16 if cuda else torch.bfloat16}
    inputs, targets = reference_windows(np.asarray(data.tokens), cfg.seq_len)
    split = data.splits.num_train
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs[:split], targets[:split]),
        batch_size=cfg.batch_size, shuffle=True)
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs[split:], targets[split:]), batch_size=cfg.batch_size)
    torch.manual_seed(cfg.seed)
    model = TinyTransformerLM(cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.seq_len,
                              cfg.n_layers).to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(enabled=cuda)
    batches, val_batches = _endless(loader), _endless(val_loader)

    def train_steps():
        model.train()
        for _ in range(steps):
            x, y = (t.to(device) for t in next(batches))
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(**autocast):
                loss = criterion(model(x).view(-1, cfg.vocab_size), y.view(-1))
            scaler.scale(loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            scaler.step(optimizer)
            scaler.update()
            loss.item()

    def eval_steps():
        model.eval()
        with torch.no_grad():
            for _ in range(steps):
                x, y = (t.to(device) for t in next(val_batches))
                with torch.autocast(**autocast):
                    criterion(model(x).view(-1, cfg.vocab_size), y.view(-1)).item()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s = timed(train_steps, steps, repeats)
    eval_s = timed(eval_steps, steps, repeats)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    path = "PyTorch, reference's loop" + (", CPU bf16 autocast" if cpu_bf16 else "")
    return PathResult(path, step_s, eval_s, None, peak)


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
RSS_PROBE = """
import sys
code, sys.argv = sys.argv[1], sys.argv[1:]
try:
    exec(code)
except SystemExit as done:
    if done.code:
        raise
status = open("/proc/self/status").read().splitlines()
print([line.split()[1] for line in status if line.startswith("VmHWM")][0], file=sys.stderr)
"""

DRY_RUN = """
from tinylm_jax.cli.run_experiment import main
sys.exit(main(sys.argv[1:]))
"""

REFERENCE_DATA_PATH = """
from pathlib import Path
from tinylm_jax.core.data import encode, read_corpus, train_tokenizer
from tinylm_jax.reference.torch_reference import reference_windows
text = read_corpus(Path(sys.argv[1]))
windows = reference_windows(encode(train_tokenizer(text, int(sys.argv[3])), text),
                            int(sys.argv[2]))
"""


def peak_rss_mb(code: str, args: list[str]) -> float:
    """Peak resident memory of Python `code` run with `args` (its sys.argv[1:]) in a fresh
    process that imports this same package, in MiB."""
    package_root = str(Path(__file__).resolve().parents[2])  # the folder that holds tinylm_jax
    env = {**os.environ, "JAX_PLATFORMS": "cpu",  # host memory only; leave the GPU alone
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                        os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", RSS_PROBE, code, *args], capture_output=True,
                            text=True, env=env)
    lines = result.stderr.strip().splitlines()
    if result.returncode != 0 or not lines or not lines[-1].isdigit():
        raise UserError(f"memory probe failed: {(lines or ['no output'])[-1]}")
    return int(lines[-1]) / 1024  # VmHWM is in KiB


def host_memory(corpus: Path, experiment: str, cfg: ExperimentConfig) -> dict[str, float]:
    """Peak RSS of this project's dry run against the reference's data path (corpus to windows)."""
    return {"tinylm-jax dry run": peak_rss_mb(DRY_RUN, [experiment, "--dry-run", "--data",
                                                         str(corpus)]),
            "reference data path (torch)": peak_rss_mb(REFERENCE_DATA_PATH, [
                str(corpus), str(cfg.seq_len), str(cfg.vocab_size)])}


def random_batch(cfg: ExperimentConfig) -> dict[str, jax.Array]:
    """A full batch of random tokens of `cfg`'s shapes: speed does not depend on the text."""
    ids = jax.random.randint(jax.random.key(0), (cfg.batch_size, cfg.seq_len), 0, cfg.vocab_size)
    return {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1),
            "weights": jnp.ones((cfg.batch_size,), jnp.float32)}


def machine_description() -> str:
    device = jax.devices()[0]
    return (f"{cpu_name()}; JAX on {jax.default_backend()}: "
            f"{jax.device_count()} x {device.device_kind}")


def peak_flops(device_kind: str) -> float | None:
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device_kind), None)


def mfu(cfg: ExperimentConfig, result: PathResult, precision: str, devices: int) -> str:
    """Model FLOPs utilisation against the bf16 peak of all devices; '-' where it means nothing
    (no known peak, or float32 compute)."""
    peak = peak_flops(jax.devices()[0].device_kind)
    if peak is None or compute_dtype_name(precision) != "bfloat16":
        return "-"
    return f"{model_flops_per_step(cfg) / statistics.median(result.step_s) / (peak * devices):.1%}"


def _spread(values: list[float], scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    low, mid, high = (fmt.format(v * scale) for v in (min(values), statistics.median(values),
                                                      max(values)))
    return f"{mid} ({low}–{high})"


def results_table(rows: list[tuple[ExperimentConfig, Dataset, PathResult]], precision: str,
                  devices: int) -> list[str]:
    """Markdown rows, each experiment's paths followed by the ratios of each of our paths (ours
    measured first) against each of its PyTorch paths."""
    lines = ["| Experiment | Path | Compile s | s/step, median (range) | Train tok/s | "
             "Eval tok/s | Epoch s (est.) | Peak device MiB | MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_experiment: dict[str, list[PathResult]] = {}
    for cfg, data, result in rows:
        by_experiment.setdefault(cfg.name, []).append(result)
        ours = result.path.startswith(OURS)
        utilisation = mfu(cfg, result, precision, devices if ours else 1)
        memory = (f"{result.peak_device_bytes / 2**20:,.0f}"
                  if result.peak_device_bytes is not None else "-")
        compile_s = f"{result.compile_s:.1f}" if result.compile_s is not None else "-"
        lines.append(f"| {cfg.name} | {result.path} | {compile_s} | {_spread(result.step_s)} | "
                     f"{result.train_tokens_per_s(cfg):,.0f} | {result.eval_tokens_per_s(cfg):,.0f}"
                     f" | {result.epoch_s(cfg, data):,.0f} | {memory} | {utilisation} |")
    for cfg, data, result in rows:
        if result.path.startswith(OURS):
            continue
        for ours in (path for path in by_experiment[cfg.name] if path.path.startswith(OURS)):
            name = "ours" if ours.path == OURS else ours.path
            lines.append(
                f"| {cfg.name} | **{name} / {result.path}** | | | "
                f"**{ours.train_tokens_per_s(cfg) / result.train_tokens_per_s(cfg):.2f}x** | "
                f"{ours.eval_tokens_per_s(cfg) / result.eval_tokens_per_s(cfg):.2f}x | "
                f"{result.epoch_s(cfg, data) / ours.epoch_s(cfg, data):.2f}x | | |")
    return lines


def _vendor_gemm_loads(precision: str, cfg: ExperimentConfig) -> bool:
    """Whether the vendor GEMM can serve this precision here: measured even where `auto` would
    not take it, so that the table shows both paths."""
    try:
        return products_for(precision, "mkl", cfg)[0] == "mkl"
    except UserError:
        return False


def run_benchmark(names: list[str], corpus: Path, steps: int, repeats: int, precision: str,
                  devices: int | None, with_torch: bool, log: Callable[[str], None] = print
                  ) -> str:
    """Measure every experiment both ways (ours on XLA's products, and on the vendor GEMM where
    it loads); the whole Markdown report."""
    text = read_corpus(corpus)
    mesh = data_mesh(devices)
    tokenizers: dict[int, Tokenizer] = {}  # trained once per vocabulary size
    rows = []
    for name in names:
        cfg = load_config(name)
        data = build_dataset(text, cfg, tokenizers.get(cfg.vocab_size))
        tokenizers[cfg.vocab_size] = data.tokenizer
        check_batch_fits(cfg.batch_size, mesh)
        for products in ["xla"] + (["mkl"] if _vendor_gemm_loads(precision, cfg) else []):
            log(f"{cfg.name}: tinylm-jax ({products} products), {steps} steps x {repeats}")
            rows.append((cfg, data, measure_ours(cfg, data, steps, repeats, precision, mesh,
                                                 products)))
        if with_torch:
            log(f"{cfg.name}: PyTorch reference loop, {steps} steps x {repeats}")
            rows.append((cfg, data, measure_reference_torch(cfg, data, steps, repeats)))
            if jax.default_backend() == "cpu":
                log(f"{cfg.name}: PyTorch reference loop under CPU bf16 autocast")
                rows.append((cfg, data, measure_reference_torch(cfg, data, steps, repeats,
                                                           cpu_bf16=True)))
    versions = ", ".join(f"{pkg} {version}" for pkg, version in
                         package_versions(*(("torch",) if with_torch else ())).items())
    lines = ["# Training speed: tinylm-jax and the reference's PyTorch loop", "",
             f"- Machine: {machine_description()}.",
             f"- Versions: {versions}; Python {platform.python_version()}.",
             f"- Precision: {precision} (jax: {compute_dtype_name(precision)} compute on "
             f"{mesh.devices.size} device(s); PyTorch: the reference's fp16 autocast on CUDA; on "
             "CPU float32 as the reference, and again under bf16 autocast); batch 512; "
             f"each figure over {steps} steps, {repeats} repeats after a warm-up (median and "
             "range). Epoch s (est.): one epoch of training plus a full "
             "validation pass, from the median rates. Compile s: the train and eval chunks, "
             "ahead of time. Peak device memory: JAX's is the process's peak so far (the "
             "experiments run in the order listed), PyTorch's is reset per experiment.",
             "- Reproduce: `python scripts/benchmark.py " + " ".join(names)
             + f" --precision {precision} --steps {steps} --repeats {repeats}"
             + ("" if with_torch else " --no-torch") + "`.", ""]
    lines += results_table(rows, precision, mesh.devices.size)
    if with_torch:
        memory = host_memory(corpus, names[0], load_config(names[0]))
        lines += ["", f"Host memory, peak RSS ({names[0]}): "
                  + "; ".join(f"{k} {v:,.0f} MiB" for k, v in memory.items()) + "."]
    return "\n".join(lines) + "\n"
