"""Layer and network benchmarks: fused BatchNorm+activation, a segmentation training step, the
saved-bytes table (ReLU, nn.Mish, naive Mish, mishkit Mish, mishkit fused BN saving its input or
its output), and networks under torch.compile (native vs mishkit, against eager mishkit).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass

import torch
from torch import nn

from mishkit import functional
from mishkit.memory import conv_bn_act_stack, mish_variants
from mishkit.nn import BatchNormAct2d
from mishkit.registry import get_spec
from segmentation.models import build_model

from .probes import peak_memory_bytes, saved_bytes
from .timing import TimingConfig, cycling, measure, rotation_count

LAYER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Elementwise(nn.Module):
    """Wraps a tensor -> tensor function as a module (the baselines' activations)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], label: str):
        super().__init__()
        self.fn, self.label = fn, label

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.label


# -- fused BatchNorm + activation --------------------------------------------------------------


def _bn_then(activation: str, kind: str) -> Callable[[int], nn.Module]:
    spec = get_spec(activation)

    def build(channels: int) -> nn.Module:
        if kind == "native":
            if spec.native is None:
                raise RuntimeError(f"torch has no native {activation} op")
            act = Elementwise(spec.native, f"F.{activation}")
        else:
            act = Elementwise(lambda x: functional.activation(x, activation),
                              f"mishkit.{activation}")
        return nn.Sequential(nn.BatchNorm2d(channels), act)

    return build


def _fused(activation: str, saves: str = "input") -> Callable[[int], nn.Module]:
    def build(channels: int) -> nn.Module:
        return BatchNormAct2d(channels, activation=activation, saves=saves)

    return build


BN_ACT_VARIANTS = {
    "bn+native": lambda act: _bn_then(act, "native"),
    "bn+mishkit": lambda act: _bn_then(act, "mishkit"),
    "BatchNormAct2d": _fused,
    "BatchNormAct2d(saves=output)": lambda act: _fused(act, "output"),
}


def run_bn_act(activations: list[str], dtypes: list[str], shape: tuple[int, int, int, int],
               device: torch.device, timing: TimingConfig,
               log: Callable[[str], None] = print) -> Iterator[dict]:
    """Forward+backward time and saved bytes of each BN+activation variant, per dtype."""
    for activation in activations:
        for dtype_name in dtypes:
            rows = [_bn_act_row(variant, factory(activation), shape, LAYER_DTYPES[dtype_name],
                                device, timing) for variant, factory in BN_ACT_VARIANTS.items()]
            base = next((r for r in rows if r["variant"] == "bn+native" and r["status"] == "ok"),
                        None)
            fused = next((r for r in rows if r["variant"] == "BatchNormAct2d"
                          and r["status"] == "ok"), None)
            for row in rows:
                row.update(record="bn_act", activation=activation, dtype=dtype_name,
                           shape=list(shape))
                if base and row["status"] == "ok":
                    row["speedup_vs_bn_native"] = base["time_ms_median"] / row["time_ms_median"]
                    row["saved_ratio_vs_bn_native"] = row["saved_bytes"] / base["saved_bytes"]
                if fused and row["status"] == "ok":  # saves="output" against saves="input"
                    row["time_ratio_vs_saves_input"] = (row["time_ms_median"]
                                                        / fused["time_ms_median"])
            log(f"bn_act {activation} {dtype_name} {'x'.join(map(str, shape))}: " + ", ".join(
                f"{r['variant']} {r['time_ms_median']:.2f} ms" if r["status"] == "ok"
                else f"{r['variant']} {r['status']}" for r in rows))
            yield from rows


def _bn_act_row(variant, build, shape, dtype, device, timing) -> dict:
    try:
        module = build(shape[1]).to(device=device, dtype=dtype).train()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        return {"variant": variant, "status": "unavailable", "reason": reason}
    params = list(module.parameters())
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    count = rotation_count(3 * numel * dtype.itemsize, device, timing)
    pool = [(torch.randn(shape, device=device, dtype=dtype).requires_grad_(),
             torch.randn(shape, device=device, dtype=dtype)) for _ in range(count)]
    next_pair = cycling(pool)

    def step():
        x, g = next_pair()
        return torch.autograd.grad(module(x), [x, *params], g)

    try:
        t = measure(step, device, timing)
        saved = saved_bytes(module, pool[0][0])
        peak = peak_memory_bytes(step, device)
    except Exception as exc:
        return {"variant": variant, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    return {"variant": variant, "status": "ok", "time_ms_median": t.median * 1e3,
            "time_ms_p20": t.p20 * 1e3, "time_ms_p80": t.p80 * 1e3, "saved_bytes": saved,
            "peak_memory_bytes": peak}


# -- networks --------------------------------------------------------------------------------------


def _segmentation_network() -> nn.Module:
    return build_model("resnet50dilated", "ppm_deepsup")


def _stack_network() -> nn.Module:
    return conv_bn_act_stack(lambda: nn.ReLU(inplace=True))


# Networks built with ReLU(inplace=True), the baseline every variant is derived from.
NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "resnet50dilated+ppm_deepsup": _segmentation_network,
    "conv-bn-act stack": _stack_network,
}


def build_network(name: str) -> tuple[nn.Module, str]:
    """The named network; the segmentation model falls back to the stack (saying why)."""
    try:
        return NETWORKS[name](), name
    except Exception as exc:  # a broken model must not stop the run: the results say so
        if name == "conv-bn-act stack":
            raise
        return _stack_network(), f"conv-bn-act stack ({name} unavailable: {type(exc).__name__})"


def network_variants() -> dict[str, Callable[[nn.Module], nn.Module]]:
    """The memory table's variants, from mishkit.memory (one definition of them)."""
    return mish_variants()


@dataclass(frozen=True)
class NetworkConfig:
    model: str  # a NETWORKS key
    batch: int
    image_size: int
    time_it: bool  # False: saved bytes only (the memory table)


def run_network(config: NetworkConfig, device: torch.device, timing: TimingConfig,
                record: str, log: Callable[[str], None] = print) -> Iterator[dict]:
    """One record per variant: training-step time, images/s, peak memory and saved bytes."""
    rows = []
    for variant, transform in network_variants().items():
        torch.manual_seed(0)
        model, model_name = build_network(config.model)
        row = {"record": record, "variant": variant, "model": model_name, "batch": config.batch,
               "image_size": config.image_size}
        try:
            model = transform(model).to(device).train()
            row.update(_network_row(model, config, device, timing))
        except Exception as exc:
            row.update(status="unavailable", reason=f"{type(exc).__name__}: {exc}")
        rows.append(row)
        log(f"{record} {variant}: " + (f"saved {row['saved_bytes'] / 2**20:.1f} MiB"
                                       if row["status"] == "ok" else row["reason"]))
        del model
    base = rows[0] if rows and rows[0]["status"] == "ok" else None  # ReLU(inplace=True)
    for row in rows:
        if base and row["status"] == "ok":
            row["saved_ratio_vs_relu"] = row["saved_bytes"] / base["saved_bytes"]
    yield from rows


def _network_row(model: nn.Module, config: NetworkConfig, device, timing) -> dict:
    images = torch.randn(config.batch, 3, config.image_size, config.image_size, device=device)
    row = {"status": "ok", "saved_bytes": saved_bytes(model, images)}
    if not config.time_it:
        return row
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    timing = dataclasses.replace(timing, warmup_calls=1)  # one step warms up a whole network

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        surrogate_loss(model(images)).backward()
        optimizer.step()

    t = measure(train_step, device, timing)
    row.update(time_ms_median=t.median * 1e3, time_ms_p20=t.p20 * 1e3, time_ms_p80=t.p80 * 1e3,
               images_per_s=config.batch / t.median,
               peak_memory_bytes=peak_memory_bytes(train_step, device))
    return row


def surrogate_loss(output) -> torch.Tensor:
    """Mean square of every tensor in the model output (logits and deep-supervision heads).

    A benchmark needs a scalar to differentiate, not a meaningful objective: the cost of the
    backward pass does not depend on which loss produced the gradient.
    """
    tensors = list(_tensors_in(output))
    if not tensors:
        raise TypeError(f"model output holds no tensor: {type(output).__name__}")
    return sum(t.float().square().mean() for t in tensors)


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif is_dataclass(value):
        for f in fields(value):
            yield from _tensors_in(getattr(value, f.name))
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)


# -- networks under torch.compile -----------------------------------------------------------------

# variant -> (transform of the ReLU network, compiled?): the same Mish networks three ways
COMPILE_VARIANTS: dict[str, tuple[str, bool]] = {
    "eager native": ("torch_mish", False),
    "eager mishkit": ("mishkit_mish", False),
    "eager mishkit fuse_bn": ("mishkit_mish_fuse_bn", False),
    "eager mishkit fuse_bn output": ("mishkit_mish_fuse_bn_output", False),
    "compile native": ("torch_mish", True),
    "compile mishkit": ("mishkit_mish", True),
    "compile mishkit fuse_bn": ("mishkit_mish_fuse_bn", True),
}
COMPILE_BASELINE, EAGER_BASELINE = "compile native", "eager mishkit"
FUSED_BASELINE = "eager mishkit fuse_bn"  # what fuse_bn="output" is timed against


@dataclass(frozen=True)
class CompileConfig:
    networks: tuple[tuple[str, int, int], ...]  # (NETWORKS key, batch, image size)
    backend: str  # torch.compile backend: "inductor"; "aot_eager" keeps the smoke run short
    min_run_s: float = 0.0  # CPU: time each variant at least this long (a step can take 1 s)


def run_compiled_networks(config: CompileConfig, device: torch.device, timing: TimingConfig,
                          log: Callable[[str], None] = print) -> Iterator[dict]:
    """Per network, one record per variant: saved bytes, forward+backward time, images/s.

    Ratios are against ``compile native`` (time and saved bytes) and ``eager mishkit`` (time),
    all measured in this run.
    """
    for network, batch, image_size in config.networks:
        rows = []
        for variant, (transform, compiled) in COMPILE_VARIANTS.items():
            torch.manual_seed(0)
            torch._dynamo.reset()  # every compiled variant starts from an empty cache
            model, model_name = build_network(network)
            row = {"record": "compile_network", "network": network, "model": model_name,
                   "variant": variant, "batch": batch, "image_size": image_size,
                   "compile_backend": config.backend if compiled else None}
            try:
                model = network_variants()[transform](model).to(device).train()
                row.update(_compiled_row(model, compiled, config.backend, batch, image_size,
                                         device, timing, config.min_run_s))
            except Exception as exc:  # one failing variant must not lose the others
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            rows.append(row)
            log(f"compile_network {network} {variant}: " + (
                f"{row['time_ms_median']:.1f} ms, saved {row['saved_bytes'] / 2**20:.1f} MiB"
                if row["status"] == "ok" else row["reason"]))
            del model
        _add_ratios(rows)
        yield from rows


def _compiled_row(model: nn.Module, compiled: bool, backend: str, batch: int, image_size: int,
                  device: torch.device, timing: TimingConfig, min_run_s: float) -> dict:
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    run = torch.compile(model, backend=backend) if compiled else model

    def step():
        model.zero_grad(set_to_none=True)
        surrogate_loss(run(images)).backward()

    started = time.perf_counter()
    step()  # compiles the forward and backward graphs
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_step_s = time.perf_counter() - started
    saved = saved_bytes(run, images)
    t = measure(step, device, dataclasses.replace(
        timing, warmup_calls=1, cpu_min_run_time_s=max(timing.cpu_min_run_time_s, min_run_s)))
    return {"status": "ok", "saved_bytes": saved, "time_ms_median": t.median * 1e3,
            "time_ms_p20": t.p20 * 1e3, "time_ms_p80": t.p80 * 1e3,
            "images_per_s": batch / t.median, "first_step_s": first_step_s,
            "cpu_ms_per_step": _cpu_ms_per_step(step) if device.type == "cpu" else None,
            "peak_memory_bytes": peak_memory_bytes(step, device)}


def _cpu_ms_per_step(step: Callable[[], object], steps: int = 3) -> float:
    """Process CPU time per step: on a shared machine less disturbed by other processes than the
    wall time (which the ratios and targets use, as a user would see it)."""
    started = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - started) / steps * 1e3


def _add_ratios(rows: list[dict]) -> None:
    ok = {r["variant"]: r for r in rows if r["status"] == "ok"}
    compiled, eager, fused = (ok.get(COMPILE_BASELINE), ok.get(EAGER_BASELINE),
                              ok.get(FUSED_BASELINE))
    for row in ok.values():
        if fused:
            row["time_ratio_vs_eager_fuse_bn"] = row["time_ms_median"] / fused["time_ms_median"]
        if compiled:
            row["time_ratio_vs_compile_native"] = row["time_ms_median"] / compiled["time_ms_median"]
            row["saved_ratio_vs_compile_native"] = row["saved_bytes"] / compiled["saved_bytes"]
        if eager:
            row["time_ratio_vs_eager_mishkit"] = row["time_ms_median"] / eager["time_ms_median"]
