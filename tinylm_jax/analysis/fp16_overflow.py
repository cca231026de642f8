"""Would the reference's fp16 GradScaler have skipped steps where this project's clip replay
does not?

The reference trained under CUDA fp16 autocast with a `GradScaler`, and clipped the gradients while
they were still scaled (README, "Fidelity to the reference"). The replay clips at
`grad_clip_norm / scale` with the scale doubling every 2,000 steps and never halving. The real
scaler halves its scale, and skips the step, whenever the scaled gradients hold an inf or a nan.
If that had happened in the reference's run, its clip, and so its effective learning rate,
would have drifted from the replay's. This probe asks whether it could: the reference's own
PyTorch model, with a run's weights, takes the reference's backward under fp16 autocast (on the
CPU) at the scales the replay uses, and each batch and scale reports whether the scaler would
find an inf, and the largest scaled gradient element against float16's largest finite value.

What it cannot replay: CPU autocast is not CUDA's. On the CPU, softmax and pow stay in float16
where CUDA computes them in float32, so the probe's attention softmax is less precise than the
reference's (an overflow there would show as an inf, which makes the probe, if anything, quicker to
report one). The headroom column bounds only the gradients computed in float16 (the Linear
layers'); the embedding's and the norms' are float32, and the float16 activation gradients in
between are covered by the inf check alone. A run keeps only its best and latest weights, so the
probe answers for those, not for the steps at which the reference's scale doubled.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
import torch

from tinylm_jax.analysis.corpus import RunCorpus
from tinylm_jax.core.data import gather_windows
from tinylm_jax.reference.interop import torch_state_dict_from_params
from tinylm_jax.reference.torch_reference import TinyTransformerLM
from tinylm_jax.run.checkpoint import LoadedRun

FP16_MAX = 65504.0


@dataclass(frozen=True)
class ScaledBackward:
    """One batch's backward with the loss multiplied by 2**exponent."""

    batch: int
    exponent: int
    loss: float
    finite: bool  # what GradScaler checks: False means the step is skipped and the scale halved
    max_abs_grad: float  # the largest finite |element| of the scaled parameter gradients


def reference_model(run: LoadedRun) -> TinyTransformerLM:
    """The reference's PyTorch model holding the run's parameters."""
    cfg = run.config
    model = TinyTransformerLM(cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.seq_len,
                              cfg.n_layers)
    state = torch_state_dict_from_params(run.params, cfg)
    model.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in state.items()})
    return model


def _scaled_backward(model: TinyTransformerLM, inputs: torch.Tensor, targets: torch.Tensor,
                     scale: float) -> tuple[float, bool, float]:
    """The reference's step up to the scaler's inf check: (loss, all grads finite, max |grad|)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(inputs)  # (B, L, V) in float16
    # CUDA autocast runs cross-entropy in float32 whatever its input; the cast says so here.
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    (loss * scale).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    largest = max(float(torch.where(torch.isfinite(g), g, 0.0).abs().max()) for g in grads)
    return loss.item(), finite, largest


def scaled_backwards(run: LoadedRun, corpus: RunCorpus, exponents: tuple[int, ...],
                     num_batches: int, seed: int = 0) -> list[ScaledBackward]:
    """Each of `num_batches` batches of random training windows (the run's batch size), at each
    scale 2**exponent."""
    model = reference_model(run)
    tokens = jnp.asarray(corpus.ids)
    rng = np.random.default_rng(seed)
    rows = []
    for batch in range(num_batches):
        starts = rng.integers(0, corpus.splits.num_train, run.config.batch_size)
        inputs, targets = (torch.from_numpy(np.asarray(ids, np.int64))  # (B, L) each
                           for ids in gather_windows(tokens, jnp.asarray(starts, jnp.int32),
                                                     run.config.seq_len))
        for exponent in exponents:
            loss, finite, largest = _scaled_backward(model, inputs, targets, 2.0 ** exponent)
            rows.append(ScaledBackward(batch, exponent, loss, finite, largest))
    return rows


def overflow_markdown(rows: list[ScaledBackward]) -> str:
    """A row per batch and scale: would the scaler skip, and the headroom below float16's max."""
    lines = ["| Batch | Scale | Loss | Scaler finds inf/nan | Largest scaled gradient | "
             "Headroom to fp16 max |", "|---:|---:|---:|---|---:|---:|"]
    for row in rows:
        headroom = f"{FP16_MAX / row.max_abs_grad:.1f}x" if row.max_abs_grad else "-"
        lines.append(f"| {row.batch} | 2^{row.exponent} | {row.loss:.4f} | "
                     f"{'yes: step skipped' if not row.finite else 'no'} | "
                     f"{row.max_abs_grad:.3g} | {headroom} |")
    return "\n".join(lines) + "\n"
