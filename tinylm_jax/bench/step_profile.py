"""Where one training step's time goes, instruction by instruction, from the compiled step itself.

XLA runs the optimised module of `train.train_step` instruction by instruction (on a CPU, one
thunk per fusion, product, copy...), and jax's profiler records each run as an event named after
its instruction. This module runs the step on random tokens under the profiler, sums each
instruction's time per step, and joins it with the optimised HLO: the opcode, the output shape
and, for each matrix product, its operands' shapes and layouts, the contracted dimensions, the
FLOPs and so the GFLOP/s it reached. A product inside a fusion whose name says `ynn` ran on
YNNPACK's kernels; a bare `dot` ran on XLA's own (Eigen) fallback.

Independent instructions may run at the same time on different cores, so the instructions'
times can add up to more than the step's wall time; shares are of their sum. Some of XLA's own
products (its Eigen fallback) run asynchronously on Eigen's threads, and then their events time
only the launch (a float32 weight gradient of 4 GFLOP "took" 0.5 ms): a product of XLA's own that
claims a higher rate than the step's best YNNPACK product, whose kernels are the fast ones, gets
no rate ("launch only"), and its work shows as wall time the instructions do not account for.
Control-flow instructions (a loop, a call) are left out: their events enclose their bodies'.
Wall time is measured with the profiler running.

This is a tool for XLA:CPU: on a GPU the products are library calls (custom calls), not dots, and
the kernels' events carry other names.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from tinylm_jax.bench.benchmark import machine_description, random_batch
from tinylm_jax.core.config import ExperimentConfig
from tinylm_jax.core.train import compute_dtype_name, create_train_state, train_step

# `name = shape opcode(operands), attributes` in HLO text; the shape may be a tuple with spaces.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{$")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](\{[\d,]*\})?")
PHASES = ("forward", "backward", "update", "unknown")
# Events that enclose other instructions' events, or only start or end work elsewhere.
_ENCLOSING = ("parameter", "while", "call", "conditional", "async-start", "async-update",
              "async-done")
YNNPACK_PRODUCT, OWN_PRODUCT = "product, YNNPACK", "product, XLA's own"


@dataclass(frozen=True)
class Product:
    """A dot: `lhs` and `rhs` as `dtype[dims]{layout}`, the contracted dims, its FLOPs."""

    lhs: str
    rhs: str
    contracting: str
    flops: float


@dataclass(frozen=True)
class Instruction:
    """One instruction of the optimised module, as far as the profile needs it."""

    name: str
    opcode: str
    shape: str
    part: str  # the model part it computes, from jax's op name ("block/ff_in", "loss", ...)
    phase: str  # "forward", "backward" or "update" (the optimiser)
    product: Product | None  # the matrix product it is or contains


@dataclass(frozen=True)
class Timed:
    """An instruction and its mean seconds per step."""

    instruction: Instruction
    seconds: float

    @property
    def kind(self) -> str:
        return instruction_kind(self.instruction)


def _split_shape(rest: str) -> tuple[str, str]:
    """`shape`, `opcode(...)...` from the right-hand side of an instruction."""
    if rest.startswith("("):
        depth = 0
        for i, char in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].strip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _dims(array: str) -> list[int]:
    match = _ARRAY.match(array)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def _product(name: str, shape: str, call: str, shapes: dict[str, str]) -> Product:
    """The dot `name = shape dot(%lhs, %rhs), lhs_contracting_dims={..}, ...`, its operands'
    shapes from `shapes` (every instruction's output shape by name) or printed beside them."""
    operands = re.match(r"dot\((?:\S+ )?%?([\w.\-]+), (?:\S+ )?%?([\w.\-]+)\)", call)
    lhs_contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", call)
    rhs_contracting = re.search(r"rhs_contracting_dims=\{([\d,]*)\}", call)
    if (operands is None or lhs_contracting is None or rhs_contracting is None
            or not {operands.group(1), operands.group(2)} <= shapes.keys()):
        raise ValueError(f"cannot read the product {name}: {call[:120]}")
    lhs, rhs = shapes[operands.group(1)], shapes[operands.group(2)]
    contracted = [int(d) for d in lhs_contracting.group(1).split(",") if d]
    k = int(np.prod([_dims(lhs)[d] for d in contracted]))
    return Product(lhs, rhs, f"lhs {{{lhs_contracting.group(1)}}}, rhs "
                   f"{{{rhs_contracting.group(1)}}}", 2.0 * k * float(np.prod(_dims(shape))))


def _combined(products: list[Product]) -> Product:
    """The products of one fused computation as one: the first's shapes, all their FLOPs."""
    first = products[0]
    more = f" (+{len(products) - 1} more products)" if len(products) > 1 else ""
    return Product(first.lhs, first.rhs, first.contracting + more,
                   sum(product.flops for product in products))


def model_part(op_name: str) -> tuple[str, str]:
    """The model part of a jax op name, and its phase (forward, backward or update):
    `jit(_train_step)/transpose(jvp(TinyTransformerLM))/layers_1/ff_out/dot_general` is
    ("block/ff_out", "backward"). Blocks are summed over layers; what is outside the model is the
    loss (inside the differentiated function) or the optimiser (clipping, AdamW, the plateau
    scale). XLA leaves some instructions it made itself without a name."""
    if not op_name:
        return "(unnamed by XLA)", "unknown"
    phase = "backward" if "transpose(" in op_name else "forward"
    if "TinyTransformerLM)" not in op_name:
        return ("loss", phase) if "jvp(" in op_name else ("optimiser", "update")
    path = re.split(r"TinyTransformerLM\)+/?", op_name, maxsplit=1)[1].split("/")[:-1]
    modules = [p for p in path if re.fullmatch(r"[a-z_]+\d*", p) and not p.startswith("jit")]
    in_block = any(re.fullmatch(r"layers_\d+", m) for m in modules)
    modules = [m for m in modules if not re.fullmatch(r"layers_\d+", m)]
    modules = [m for i, m in enumerate(modules) if i == 0 or m != modules[i - 1]]
    if in_block:
        return "/".join(["block", *modules]), phase
    return "/".join(modules) or "embedding and positions", phase


def parse_module(hlo_text: str) -> dict[str, Instruction]:
    """Every instruction of an optimised HLO module by name; a fusion carries the product of its
    fused computation, if it has one."""
    statements = []  # (computation, name, shape, call)
    computation = ""
    for line in hlo_text.splitlines():
        if (head := _COMPUTATION.match(line)) and " = " not in line.split("{")[0]:
            computation = head.group(1)
        elif match := _INSTRUCTION.match(line):
            statements.append((computation, match.group(1), *_split_shape(match.group(2))))
    shapes = {name: shape for _, name, shape, _ in statements}
    inner: dict[str, list[Product]] = defaultdict(list)  # computation -> its products
    parsed = []
    for computation, name, shape, call in statements:
        opcode = call.split("(", 1)[0]
        product = _product(name, shape, call, shapes) if opcode == "dot" else None
        if product is not None:
            inner[computation].append(product)
        calls = re.search(r"calls=%?([\w.\-]+)", call)
        op_name = re.search(r'op_name="([^"]*)"', call)
        parsed.append((name, opcode, shape, product,
                       calls.group(1) if calls and opcode == "fusion" else None,
                       model_part(op_name.group(1) if op_name else "")))
    return {name: Instruction(name, opcode, shape, part, phase,
                              product or (_combined(inner[calls]) if inner.get(calls) else None))
            for name, opcode, shape, product, calls, (part, phase) in parsed}


def instruction_kind(instruction: Instruction) -> str:
    """What an instruction does, in the profile's categories."""
    ynn = "ynn" in instruction.name
    if instruction.product is not None:
        return YNNPACK_PRODUCT if ynn else (
            OWN_PRODUCT if instruction.opcode == "dot" else "product in a fusion")
    if instruction.opcode in ("copy", "transpose"):
        return "copy or transpose"
    if instruction.opcode == "fusion":
        return "other fusion, YNNPACK" if ynn else "elementwise or reduction fusion"
    return f"other ({instruction.opcode})"


def _profile_events(trace_dir: Path) -> dict[str, float]:
    """Summed seconds of every event in the trace, by event name."""
    from jax.profiler import ProfileData

    totals: dict[str, float] = defaultdict(float)
    for path in trace_dir.rglob("*.xplane.pb"):
        for plane in ProfileData.from_file(str(path)).planes:
            for line in plane.lines:
                for event in line.events:
                    totals[event.name] += event.duration_ns * 1e-9
    return totals


@dataclass(frozen=True)
class StepProfile:
    """One experiment's step: its wall time and each instruction's share."""

    cfg: ExperimentConfig
    precision: str
    products: str  # where the bf16 products ran: xla or mkl
    steps: int
    wall_s: float  # seconds per step, timed around the profiled steps (profiler running)
    timed: list[Timed]  # every instruction that ran, slowest first


def profile_step(cfg: ExperimentConfig, precision: str, steps: int, products: str = "xla"
                 ) -> StepProfile:
    """Run `steps` training steps of `cfg` on random tokens under the profiler, after a
    warm-up, and attribute their time to the compiled step's instructions."""
    state = create_train_state(cfg, precision, products=products)
    batch = random_batch(cfg)
    compiled = train_step.lower(state, batch).compile()
    instructions = parse_module(compiled.as_text())
    state, metrics = compiled(state, batch)  # warm-up: first-touch allocations
    jax.block_until_ready((state, metrics))
    with tempfile.TemporaryDirectory() as trace:
        jax.profiler.start_trace(trace)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
        wall = (time.perf_counter() - start) / steps
        jax.profiler.stop_trace()
        events = _profile_events(Path(trace))
    timed = [Timed(instructions[name], seconds / steps) for name, seconds in events.items()
             if name in instructions and instructions[name].opcode not in _ENCLOSING]
    return StepProfile(cfg, precision, products, steps, wall,
                       sorted(timed, key=lambda t: -t.seconds))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def _gflops(timed: Timed) -> float:
    return timed.instruction.product.flops / timed.seconds / 1e9


def _rate(timed: Timed, best_ynnpack: float) -> str:
    """A product's GFLOP/s, unless its event can only have timed the launch (module docstring)."""
    if timed.kind == OWN_PRODUCT and _gflops(timed) > best_ynnpack:
        return "launch only"
    return f"{_gflops(timed):,.0f}"


def profile_markdown(profiles: list[StepProfile], top: int = 12) -> str:
    """Per experiment: time by kind of instruction, every matrix product, the slowest others."""
    lines = ["# Where a training step's time goes", "",
             f"- Machine: {machine_description()}.",
             "- Each step on random tokens, the compiled `train_step` under jax's profiler; "
             "milliseconds are per step, averaged over the profiled steps after a warm-up.",
             "- Instructions may overlap on different cores: shares are of their summed time. "
             "A product of XLA's own that claims a higher rate than the best YNNPACK product "
             "ran asynchronously, its event timing the launch only (no rate given); its work "
             "shows as wall time the instructions do not account for.", ""]
    for profile in profiles:
        total = sum(t.seconds for t in profile.timed)
        unaccounted = max(profile.wall_s - total, 0.0)
        lines += [f"## {profile.cfg.name}, {compute_dtype_name(profile.precision)}, "
                  f"{profile.products} products", "",
                  f"Step wall time {_ms(profile.wall_s)} ms under the profiler; instructions "
                  f"{_ms(total)} ms in all; wall time they do not account for "
                  f"{_ms(unaccounted)} ms; over {profile.steps} steps.", "",
                  "| Kind | Instructions | ms | Share |", "|---|---:|---:|---:|"]
        by_kind: dict[str, list[Timed]] = defaultdict(list)
        for timed in profile.timed:
            by_kind[timed.kind].append(timed)
        for kind, members in sorted(by_kind.items(), key=lambda kv: -sum(t.seconds
                                                                        for t in kv[1])):
            seconds = sum(t.seconds for t in members)
            lines.append(f"| {kind} | {len(members)} | {_ms(seconds)} | {seconds / total:.0%} |")
        lines += ["", "| Part (blocks summed) | " + " | ".join(f"{phase.capitalize()} ms"
                                                          for phase in PHASES) + " | Share |",
                  "|---|" + "---:|" * (len(PHASES) + 1)]
        by_part: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(PHASES, 0.0))
        for timed in profile.timed:
            by_part[timed.instruction.part][timed.instruction.phase] += timed.seconds
        for part, phases in sorted(by_part.items(), key=lambda kv: -sum(kv[1].values())):
            lines.append(f"| {part} | " + " | ".join(_ms(phases[p]) for p in PHASES)
                         + f" | {sum(phases.values()) / total:.0%} |")
        lines += ["", "| Product | Part | Phase | Kind | lhs | rhs | Contracted | Output | ms | "
                  "GFLOP/s |", "|---|---|---|---|---|---|---|---|---:|---:|"]
        products = [t for t in profile.timed if t.instruction.product is not None]
        best_ynnpack = max((_gflops(t) for t in products if t.kind == YNNPACK_PRODUCT),
                           default=float("inf"))
        for timed in products:
            instruction, product = timed.instruction, timed.instruction.product
            lines.append(f"| {instruction.name} | {instruction.part} | "
                         f"{instruction.phase} | {timed.kind} | "
                         f"`{product.lhs}` | `{product.rhs}` | {product.contracting} | "
                         f"`{instruction.shape}` | {_ms(timed.seconds)} | "
                         f"{_rate(timed, best_ynnpack)} |")
        lines += ["", f"The {top} slowest other instructions:", "",
                  "| Instruction | Part | Phase | Kind | Output | ms |",
                  "|---|---|---|---|---|---:|"]
        others = [t for t in profile.timed if t.instruction.product is None][:top]
        lines += [f"| {t.instruction.name} | {t.instruction.part} | {t.instruction.phase} | "
                  f"{t.kind} | `{t.instruction.shape}` | {_ms(t.seconds)} |" for t in others]
        lines.append("")
    return "\n".join(lines)
