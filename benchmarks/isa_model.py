"""Static throughput model of the CPU kernels' inner loops, per ISA build and microarchitecture.

``python -m benchmarks.isa_model`` takes each activation's contiguous vector loop (forward and
backward, float) out of the built extension for the AVX2 and the AVX-512 build, and runs
``llvm-mca`` on it for CPU models this machine may not have (Intel Skylake-SP, Ice Lake-SP,
Sapphire Rapids, AMD Zen 3): predicted core cycles per element, cache-resident, one thread,
steady state. It is a model, not a measurement: no memory bandwidth, no AVX-512 frequency
reduction, no denormal assists. ``--validate MODEL`` checks a model against this CPU: it times
each forward and backward kernel of the build that runs here (one thread, 2^15 floats, in L2)
and divides the model's cycles per element by the measured time, giving the clock rate the
model implies. A right model implies the same clock for every kernel; how far those clocks
spread is its error on ratios between kernels (and between builds, which are ratios of
per-element costs). Kernels the model puts below one cycle per element are bound by the call
and by loads and stores, not by their arithmetic, and are left out of that spread.

Needs binutils (``nm``, ``objdump``) and ``llvm-mca`` on PATH (``--llvm-mca`` names another).
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.benchmark as torch_benchmark

from mishkit import backends
from mishkit.registry import ACTIVATIONS, get_spec

from .report import device_name

MODELS = ("skylake-avx512", "icelake-server", "sapphirerapids", "znver3")
BUILDS = {"avx2": "AVX2", "avx512": "AVX512"}  # build name: its C++ namespace
VECTOR_BYTES = {"x": 16, "y": 32, "z": 64}
_CALL = re.compile(r"call\s")
VECTOR_REGISTER = {"avx2": "y", "avx512": "z"}
# a vector store to the output; stores relative to %rbp / %rsp are register spills
_STORE = re.compile(r"v(movu?p[sd]|movdqu\d*|movdqa\d*)\s+%([xyz])mm\d+,\s*-?(0x[0-9a-f]+)?"
                    r"\(%(?!rbp|rsp)")


class ModelError(RuntimeError):
    """A tool missing, or a loop that is not in the extension; the message says which."""


@dataclass(frozen=True)
class Loop:
    build: str
    activation: str
    direction: str  # "forward" or "backward"
    instructions: tuple[str, ...]
    elements: int  # per iteration: what its vector stores write


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ModelError(f"{name} is not on PATH (binutils / LLVM); the model needs it")
    return path


@functools.cache
def _symbols(library: str) -> tuple[tuple[int, int, str], ...]:
    out = subprocess.run([_tool("nm"), "-C", "-S", library], capture_output=True, text=True,
                         check=True).stdout
    symbols = []
    for line in out.splitlines():
        match = re.match(r"([0-9a-f]+) ([0-9a-f]+) [tTwW] (.*)$", line)  # defined code, sized
        if match:
            symbols.append((int(match.group(1), 16), int(match.group(2), 16), match.group(3)))
    return tuple(symbols)


@functools.cache
def _functors() -> dict[str, str]:
    """Activation name: its C++ functor, from csrc/activations.h's MISHKIT_FOR_EACH_ACTIVATION."""
    listing = Path(__file__).resolve().parents[1] / "csrc" / "activations.h"
    return dict(re.findall(r"X\((\w+), (\w+)\)", listing.read_text()))


def _functor(activation: str) -> str:
    if activation not in _functors():
        raise ModelError(f"no C++ kernel for '{activation}' in csrc/activations.h")
    return _functors()[activation]


def _loop_functions(library: str, build: str, activation: str,
                    direction: str) -> list[tuple[int, int]]:
    """at::native's loop functions of the kernel: VectorizedLoop2d, and vectorized_loop where
    the compiler kept it out of line."""
    ns = BUILDS[build]
    lambda_of = (f"mishkit::cpu::{ns}::{direction}_loop<mishkit::act::{_functor(activation)}, "
                 "float>")
    found = [(address, size) for address, size, name in _symbols(library)
             if re.match(rf"(void )?at::native::{ns}::(VectorizedLoop2d|vectorized_loop)<"
                         rf"{re.escape(lambda_of)}", name)]
    if not found:
        raise ModelError(f"no {build} {direction} float loop for {activation} in {library}")
    return found


def _disassemble(library: str, address: int, size: int) -> list[tuple[int, str]]:
    out = subprocess.run([_tool("objdump"), "-d", "--no-show-raw-insn", "-M", "att",
                          f"--start-address={address}", f"--stop-address={address + size}",
                          library], capture_output=True, text=True, check=True).stdout
    lines = []
    for line in out.splitlines():
        match = re.match(r"\s*([0-9a-f]+):\s+(\S.*)$", line)
        if match:
            text = re.sub(r"\s+<[^>]*>$", "", match.group(2).split("#")[0]).strip()
            lines.append((int(match.group(1), 16), text))
    return lines


def extract_loop(library: str, build: str, activation: str, direction: str) -> Loop:
    """at::native's contiguous vector loop of the kernel. Candidates are the loops (a back edge
    and the code from its target to it) with no call inside that store exactly two full vectors
    of the build's width; of the innermost ones (containing no other candidate: a longer span
    with the same stores is an outer loop around one) the one with the most vector
    instructions, so a plain copy loop elsewhere in the function loses to the arithmetic.
    Branches inside it (vectorized_loop tests which argument is a broadcast scalar) stay in the
    listing; llvm-mca reads it as straight-line code."""
    register = VECTOR_REGISTER[build]
    best: list[str] | None = None
    for function in _loop_functions(library, build, activation, direction):
        code = _disassemble(library, *function)
        spans = [(start, end) for start, end in _loops(code)
                 if _stores(code[start:end + 1]) == [register, register]
                 and not any(_CALL.match(t) for _, t in code[start:end + 1])]
        for start, end in spans:
            if any((s, e) != (start, end) and start <= s and e <= end for s, e in spans):
                continue
            body = [t for _, t in code[start:end + 1]]
            if best is None or _vector_count(body) > _vector_count(best):
                best = body
    if best is None:
        raise ModelError(f"no call-free loop storing two {register}mm vectors in the {build} "
                         f"{direction} {activation} kernel")
    return Loop(build, activation, direction, tuple(best), 2 * VECTOR_BYTES[register] // 4)


def _stores(code: list[tuple[int, str]]) -> list[str]:
    return [m.group(2) for _, t in code if (m := _STORE.match(t))]


def _vector_count(body: list[str]) -> int:
    return sum(bool(re.search(r"%[yz]mm", t)) for t in body)


def _loops(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """Every backward jump's span as (index of its target, index of the jump)."""
    where = {address: i for i, (address, _) in enumerate(code)}
    spans = []
    for i, (address, text) in enumerate(code):
        match = re.match(r"j[a-z]+\s+([0-9a-f]+)$", text)
        if match and int(match.group(1), 16) < address and int(match.group(1), 16) in where:
            spans.append((where[int(match.group(1), 16)], i))
    return spans


def cycles_per_element(loop: Loop, model: str, llvm_mca: str = "llvm-mca",
                       iterations: int = 400) -> float:
    """llvm-mca's steady-state cycles per iteration over the elements one iteration writes."""
    out = subprocess.run([_tool(llvm_mca), f"-mcpu={model}", f"-iterations={iterations}"],
                         input="\n".join(loop.instructions) + "\n", capture_output=True,
                         text=True)
    match = re.search(r"Total Cycles:\s+(\d+)", out.stdout)
    if out.returncode != 0 or match is None:
        raise ModelError(f"llvm-mca -mcpu={model} failed on the {loop.build} {loop.direction} "
                         f"{loop.activation} loop: {out.stderr.strip()[:300]}")
    return int(match.group(1)) / iterations / loop.elements


def _has_model(build: str, model: str) -> bool:
    # LLVM 14 has no AVX-512 Zen model (znver4 came later)
    return build != "avx512" or not model.startswith("znver")


def model_table(library: str, activations: list[str], models: list[str],
                llvm_mca: str = "llvm-mca") -> list[dict]:
    rows = []
    for activation in activations:
        for direction in ("forward", "backward"):
            loops = {b: extract_loop(library, b, activation, direction) for b in BUILDS}
            for model in models:
                row = {"activation": activation, "direction": direction, "model": model}
                for build, loop in loops.items():
                    if _has_model(build, model):
                        row[build] = cycles_per_element(loop, model, llvm_mca)
                rows.append(row)
    return rows


def measured_ns_per_element(activation: str, direction: str, numel: int = 2**15) -> float:
    """One thread, inputs in cache: the kernel alone (torch.ops, no autograd), the fastest of
    torch.utils.benchmark's blocks (the least disturbed by other work on a shared machine)."""
    params = list(get_spec(activation).defaults)
    x = torch.randn(numel) * 3
    grad = torch.randn(numel)
    if direction == "forward":
        stmt, names = "op(x, name, params)", {"op": torch.ops.mishkit.act_forward}
    else:
        stmt, names = "op(g, x, name, params)", {"op": torch.ops.mishkit.act_backward, "g": grad}
    timer = torch_benchmark.Timer(stmt, globals={**names, "x": x, "name": activation,
                                                  "params": params}, num_threads=1)
    return min(timer.blocked_autorange(min_run_time=0.5).times) / numel * 1e9


def validate(library: str, activations: list[str], model: str, build: str,
             llvm_mca: str = "llvm-mca") -> list[dict]:
    """Per kernel of ``build`` (the one running here): measured ns/element, the model's
    cycles/element, and the clock (GHz) their ratio implies."""
    rows = []
    for activation in activations:
        for direction in ("forward", "backward"):
            cycles = cycles_per_element(extract_loop(library, build, activation, direction),
                                        model, llvm_mca)
            ns = measured_ns_per_element(activation, direction)
            rows.append({"activation": activation, "direction": direction, "ns": ns,
                         "cycles": cycles, "implied_ghz": cycles / ns})
    return rows


def render_validation(rows: list[dict], model: str, build: str, cpu: str) -> str:
    clocks = sorted(r["implied_ghz"] for r in rows if r["cycles"] >= 1.0)
    if not clocks:
        return "no kernel the model puts at one cycle per element or more"
    middle = clocks[len(clocks) // 2]
    lines = [f"Model {model} against {cpu}, {build} build, one thread, 2^15 floats in L2:",
             "", "| activation | direction | measured ns/element | model cycles/element | "
             "implied GHz | vs median |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['activation']} | {r['direction']} | {r['ns']:.3f} | {r['cycles']:.3f} | "
              f"{r['implied_ghz']:.2f} | {r['implied_ghz'] / middle:.2f} |" for r in rows]
    spread = max(middle / clocks[0], clocks[-1] / middle)
    lines += ["", f"Kernels at ≥ 1 model cycle per element ({len(clocks)}): implied clock "
              f"{clocks[0]:.2f}–{clocks[-1]:.2f} GHz, median {middle:.2f}; the model's "
              f"per-kernel error reaches {spread:.2f}×."]
    return "\n".join(lines)


def _llvm_mca_version(llvm_mca: str) -> str:
    out = subprocess.run([_tool(llvm_mca), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"LLVM version (\S+)", out)
    return match.group(1) if match else "unknown"


def render(rows: list[dict], llvm_mca: str = "llvm-mca") -> str:
    version = _llvm_mca_version(llvm_mca)
    lines = [f"# Static model of the CPU kernels' float loops (llvm-mca {version})",
             "", "`python -m benchmarks.isa_model`: predicted core cycles per element of each "
             "kernel's contiguous loop, steady state, data in L1, one thread; no memory "
             "bandwidth, no AVX-512 clock reduction. A model, not a measurement. relu, "
             "leaky_relu, hardswish and hardmish fp32 run their AVX2 loop in the AVX-512 build "
             "(act_kernels_impl.h), so their AVX-512 column is the unused 512-bit loop.", "",
             "| activation | direction | model | AVX2 cycles/element | AVX-512 cycles/element "
             "| AVX-512 speed-up |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        avx2, avx512 = r.get("avx2"), r.get("avx512")
        ratio = f"{avx2 / avx512:.2f}×" if avx2 and avx512 else "–"
        lines.append(f"| {r['activation']} | {r['direction']} | {r['model']} | "
                     f"{avx2:.3f} | " + (f"{avx512:.3f}" if avx512 else "–") + f" | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.isa_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activations", help="comma list (default: every activation with a "
                        "C++ kernel)")
    parser.add_argument("--models", default=",".join(MODELS), help="llvm-mca -mcpu names")
    parser.add_argument("--llvm-mca", default="llvm-mca")
    parser.add_argument("--extension", help="the built mishkit._C library (default: the one "
                        "mishkit loads)")
    parser.add_argument("--validate", metavar="MODEL", help="time this CPU's kernels and compare "
                        "with MODEL (e.g. znver3 on a Zen 3) instead of tabulating the models")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    library = args.extension
    if library is None:
        module, reason = backends.extension_module()
        if module is None:
            parser.error(f"mishkit._C does not load ({reason}); pass --extension")
        library = module.__file__
    names = (args.activations.split(",") if args.activations
             else [n for n in ACTIVATIONS if n in _functors()])
    try:
        if args.validate:
            module, reason = backends.extension_module()
            if module is None:
                parser.error(f"--validate times the loaded extension, and it does not load: "
                             f"{reason}")
            build = module.cpu_capability()
            if build not in BUILDS:
                parser.error(f"the {build} build runs here; --validate models AVX2 / AVX-512")
            rows = validate(library, names, args.validate, build, args.llvm_mca)
            table = render_validation(rows, args.validate, build, device_name(torch.device("cpu")))
        else:
            table = render(model_table(library, names, args.models.split(","), args.llvm_mca),
                           args.llvm_mca)
    except ModelError as exc:
        print(f"isa_model: {exc}", file=sys.stderr)
        return 1
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
