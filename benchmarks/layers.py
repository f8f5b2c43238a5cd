"""Layer and network benchmarks: fused BatchNorm+activation, a segmentation training step, and
the saved-bytes table (ReLU, nn.Mish, naive Mish, mishkit Mish, mishkit fused BN saving its input
or its output).
"""

from __future__ import annotations

import dataclasses
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
