"""benchmarks.isa_model: the kernels' vector loops out of the built extension, llvm-mca on them;
and that every vector function of the CPU kernels is inlined into its loop."""

from __future__ import annotations

import re
import shutil

import pytest

from benchmarks import isa_model
from mishkit import backends

needs_llvm_mca = pytest.mark.skipif(shutil.which("llvm-mca") is None,
                                    reason="llvm-mca (LLVM) is not installed here")


@pytest.fixture(scope="module")
def library():
    module, reason = backends.extension_module()
    if module is None:
        pytest.fail(f"the CPU extension must load for these tests: {reason}")
    return module.__file__


def test_no_vector_function_of_any_build_is_left_out_of_line(library):
    # a lambda body compiled on its own (a symbol of its own) is called from the loop, twice per
    # iteration, with the loop's vectors spilled around each call: what GCC did with every
    # AVX-512 backward function until setup.py raised --param early-inlining-insns
    pattern = re.compile(r"mishkit::cpu::\w+::(forward|backward)_loop<.*\{lambda\(at::vec::"
                         r"\w+::Vectorized<.*\)#2\}::operator\(\)")
    out_of_line = [name for _, _, name in isa_model._symbols(library)
                   if name.startswith("mishkit::") and pattern.search(name)]
    assert not out_of_line, out_of_line[:3]


@pytest.mark.parametrize(("build", "register", "elements"), [("avx2", "ymm", 16),
                                                             ("avx512", "zmm", 32)])
def test_the_mish_forward_loop_is_the_two_vector_contiguous_loop_of_its_build(
        library, build, register, elements):
    loop = isa_model.extract_loop(library, build, "mish", "forward")
    body = "\n".join(loop.instructions)
    # at::native's contiguous loop: two loads, two stores of full vectors, one division each
    assert loop.elements == elements
    assert len(re.findall(rf"vdivps\s+%{register}", body)) == 2
    assert re.search(r"^j[a-z]+\s", loop.instructions[-1])
    assert not any(re.match(r"call\s", t) for t in loop.instructions)  # exp is inlined
    assert set(re.findall(r"%([xyz]mm)\d+", body)) <= {"xmm", register}  # no wider vectors


def test_backward_loops_read_two_inputs(library):
    loop = isa_model.extract_loop(library, "avx2", "silu", "backward")
    loads = [t for t in loop.instructions if re.match(r"vmovu?ps\s+-?(0x[0-9a-f]+)?\(", t)]
    memory_operands = [t for t in loop.instructions if "(" in t]
    assert loop.elements == 16 and len(memory_operands) >= 4 and len(loads) >= 1


def test_unknown_activations_and_missing_tools_are_named(library, monkeypatch):
    with pytest.raises(isa_model.ModelError, match="no C\\+\\+ kernel for 'mush'"):
        isa_model.extract_loop(library, "avx2", "mush", "forward")
    monkeypatch.setattr(isa_model.shutil, "which", lambda name: None)
    loop = isa_model.Loop("avx2", "mish", "forward", ("nop",), 16)
    with pytest.raises(isa_model.ModelError, match="llvm-mca is not on PATH"):
        isa_model.cycles_per_element(loop, "znver3")


@needs_llvm_mca
def test_the_model_ranks_the_avx512_mish_loop_faster_on_intel_models(library):
    loops = {b: isa_model.extract_loop(library, b, "mish", "forward") for b in isa_model.BUILDS}
    for model in ("skylake-avx512", "icelake-server"):
        avx2 = isa_model.cycles_per_element(loops["avx2"], model)
        avx512 = isa_model.cycles_per_element(loops["avx512"], model)
        assert 0.1 < avx512 < avx2 < 20, (model, avx2, avx512)


@needs_llvm_mca
def test_the_command_prints_one_row_per_kernel_and_model(library, capsys, tmp_path):
    out = tmp_path / "model.md"
    assert isa_model.main(["--activations", "mish,silu", "--models", "skylake-avx512,znver3",
                           "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| mish") or
            line.startswith("| silu")]
    assert len(rows) == 2 * 2 * 2  # activation x direction x model
    # LLVM 14 has no AVX-512 Zen model: that cell is empty, not a failure
    assert all(line.rstrip().endswith("| – |") for line in rows if "znver3" in line)
    assert out.read_text() == printed


@needs_llvm_mca
def test_validation_times_this_cpus_build_and_reports_the_implied_clock(library, capsys):
    module, _ = backends.extension_module()
    if module.cpu_capability() not in isa_model.BUILDS:
        pytest.skip(f"this CPU runs the {module.cpu_capability()} build, which the model does "
                    "not cover (no AVX2)")
    rows = isa_model.validate(library, ["mish"], "skylake-avx512", module.cpu_capability())
    assert [r["direction"] for r in rows] == ["forward", "backward"]
    for r in rows:
        assert 0.01 < r["ns"] < 100 and r["implied_ghz"] == pytest.approx(r["cycles"] / r["ns"])
    text = isa_model.render_validation(rows, "skylake-avx512", module.cpu_capability(), "this CPU")
    assert "| mish | forward |" in text and "implied clock" in text
