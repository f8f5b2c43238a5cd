"""The training loop: DDP, AMP, poly LR, deep supervision, logs, checkpoints and exact resume.

An *epoch* is ``TRAIN.epoch_iters`` iterations (CSAIL's convention; 0 = one pass over the data).
The batch of global iteration ``i`` is a pure function of ``(TRAIN.seed, i)``: pass
``i // len(sampler)``, position ``i % len(sampler)``. A resumed run therefore replays exactly the
batches an uninterrupted run would have seen, and every experiment arm sees the same data.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..config import Config
from .builders import (
    ResumableBatchSampler,
    autocast_dtype,
    build_segmentation_model,
    build_train_dataset,
    build_train_sampler,
    freeze_batchnorm,
    prepare_dataset,
)
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import DistContext, all_reduce_sum, barrier
from .evaluator import PER_IMAGE_FILE, evaluate
from .logging import MetricsLogger, progress_bar
from .loss import SegmentationLoss, pixel_counts
from .optim import PolyLR, build_optimizer

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic
    # On CPU the kernels used here are deterministic for a fixed thread count; warn_only keeps
    # CUDA runs going where an op has no deterministic implementation.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


class Trainer:
    """Owns model, optimizer, scheduler, scaler and data stream of one training run."""

    def __init__(self, cfg: Config, ctx: DistContext, *, out_dir: str | Path | None = None) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.out_dir = Path(out_dir or cfg.DIR)
        self.ckpt_dir = Path(cfg.TRAIN.ckpt_dir or self.out_dir / "checkpoints")
        t = cfg.TRAIN
        if t.num_threads > 0 and ctx.device.type == "cpu":
            torch.set_num_threads(t.num_threads)
        configure_determinism(t.deterministic, ctx.device)
        seed_everything(t.seed)
        prepare_dataset(cfg, ctx)
        self.dataset = build_train_dataset(cfg)
        self.sampler = build_train_sampler(cfg, self.dataset, ctx)
        self.batches = ResumableBatchSampler(self.sampler)
        self.loader = DataLoader(
            self.dataset, batch_sampler=self.batches, collate_fn=self.dataset.collate_fn,
            num_workers=t.workers, pin_memory=ctx.device.type == "cuda",
            persistent_workers=t.workers > 0,
            generator=torch.Generator().manual_seed(t.seed))
        self.epoch_iters = t.epoch_iters or len(self.sampler)
        self.max_iters = t.max_iters or t.num_epoch * self.epoch_iters

        seed_everything(t.seed)  # model initialisation independent of the data set-up
        self.model = build_segmentation_model(cfg, ctx, pretrained=not self._resume_path())
        if t.fix_bn:
            freeze_batchnorm(self.model)
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = PolyLR(self.optimizer, self.max_iters, t.lr_pow)
        self.amp_dtype = autocast_dtype(t.amp)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=t.amp == "fp16")
        self.criterion = SegmentationLoss(t.deep_sup_scale)
        self.network: nn.Module = self.model
        if ctx.distributed:
            self.network = DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.iteration = 0
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
        resume = self._resume_path()
        if resume:
            self.load(resume)
        # After the resume: the log keeps exactly the records up to the restored iteration.
        self.metrics = MetricsLogger(self.out_dir / "metrics.jsonl", enabled=ctx.is_main,
                                     tensorboard=t.tensorboard, start_step=self.iteration)

    # ---- checkpoints ----

    def _resume_path(self) -> Path | None:
        t = self.cfg.TRAIN
        if t.resume == "auto":
            last = self.ckpt_dir / "last.pth"
            return last if last.is_file() else None
        if t.resume:
            return Path(t.resume)
        if t.start_epoch > 0:  # CSAIL: start_epoch N continues from epoch_N
            return self.ckpt_dir / f"epoch_{t.start_epoch}.pth"
        return None

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.iteration // self.epoch_iters,
            "iteration": self.iteration,
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
        }

    def save(self, name: str) -> Path | None:
        """Write ``name`` and ``last.pth`` (rank 0); all ranks wait for it."""
        path = None
        if self.ctx.is_main:
            path = save_checkpoint(self.ckpt_dir / name, self.state())
            last = self.ckpt_dir / "last.pth"
            tmp = self.ckpt_dir / ".last.pth.link"
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)  # a second name for the same file, swapped in atomically
            os.replace(tmp, last)
        barrier()
        return path

    def load(self, path: str | Path) -> None:
        state = load_checkpoint(path, map_location=self.ctx.device)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(f"{path}: model weights do not fit this config: {err}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        if self.scheduler.max_iters != self.max_iters:
            raise CheckpointError(f"{path} was trained for {self.scheduler.max_iters} "
                                  f"iterations, this config asks for {self.max_iters}")
        set_rng_state({k: v for k, v in state["rng"].items()
                       if k != "cuda" or self.ctx.device.type == "cuda"})
        log.info("resumed from %s at iteration %d", path, self.iteration)

    # ---- training ----

    def _stream(self, start: int) -> Iterator[dict | None]:
        passes, position = divmod(start, len(self.sampler))
        while True:
            self.sampler.set_epoch(passes)
            self.batches.skip = position
            yield from self.loader
            passes, position = passes + 1, 0

    def _step(self, batch: dict) -> tuple[float, int, int]:
        images = batch["img"].to(self.ctx.device, non_blocking=True)
        target = batch["segm"].to(self.ctx.device, non_blocking=True)
        with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            out = self.network(images)
            loss = self.criterion(out.logits, target, out.aux_logits)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        correct, labelled = pixel_counts(out.logits.detach(), target)
        return loss.item(), correct, labelled

    def _log_window(self, window: torch.Tensor, seconds: float, pbar) -> None:
        # Sums over the window and over ranks; means are taken only after the reduction.
        loss_sum, steps, correct, labelled, images = all_reduce_sum(window).tolist()
        record = {
            "epoch": self.iteration / self.epoch_iters,
            "loss": loss_sum / max(steps, 1),
            "pixel_acc": correct / max(labelled, 1),
            "lr_encoder": self.optimizer.param_groups[0]["lr"],
            "lr_decoder": self.optimizer.param_groups[-1]["lr"],
            "images_per_s": images / max(seconds, 1e-9),
        }
        self.metrics.write("train", self.iteration, **record)
        pbar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['pixel_acc']:.3f}",
                         lr=f"{record['lr_encoder']:.2e}", ips=f"{record['images_per_s']:.1f}")

    def train(self, stop_at: int | None = None) -> dict:
        """Train to ``max_iters`` (or stop after iteration ``stop_at``, writing a checkpoint).

        Returns ``{"iteration", "images_per_s", "seconds"}``; validation results (every
        ``TRAIN.eval_every`` epochs and after the last iteration) go to the metrics log as
        ``kind="val"`` records with the per-class IoU list ``class_iou`` (None where a class is
        in neither ground truth nor prediction); the last one also writes ``eval/`` and
        ``per_image.jsonl``.
        """
        t, ctx = self.cfg.TRAIN, self.ctx
        end = self.max_iters if stop_at is None else min(stop_at, self.max_iters)
        self.network.train()
        if t.fix_bn:
            freeze_batchnorm(self.model)
        pbar = progress_bar(self.max_iters, self.iteration, ctx.is_main and t.progress)
        window = torch.zeros(5, dtype=torch.float64, device=ctx.device)
        window_start = time.perf_counter()
        train_seconds, train_images = 0.0, 0
        stream = self._stream(self.iteration)
        while self.iteration < end:
            batch = next(stream)
            step_start = time.perf_counter()
            if batch is None:  # every sample of the batch was skipped (DATASET.skip_bad)
                if ctx.distributed:
                    raise RuntimeError(f"iteration {self.iteration}: a whole batch was bad; "
                                       "fix the dataset (skip_bad cannot keep ranks in step)")
                log.warning("iteration %d: empty batch skipped", self.iteration)
            else:
                loss, correct, labelled = self._step(batch)
                n = len(batch["name"])
                window += torch.tensor([loss, 1, correct, labelled, n], dtype=torch.float64,
                                       device=ctx.device)
                train_images += n * ctx.world_size
            self.scheduler.step()
            self.iteration += 1
            train_seconds += time.perf_counter() - step_start
            pbar.update(1)
            if self.iteration % t.disp_iter == 0 or self.iteration == end:
                self._log_window(window, time.perf_counter() - window_start, pbar)
                window.zero_()
                window_start = time.perf_counter()
            if self.iteration % self.epoch_iters == 0 or self.iteration == self.max_iters:
                self._end_of_epoch()
        if stop_at is not None and self.iteration < self.max_iters:
            self.save(f"iter_{self.iteration}.pth")
        pbar.close()
        return {"iteration": self.iteration, "seconds": train_seconds,
                "images_per_s": train_images / max(train_seconds, 1e-9)}

    def _end_of_epoch(self) -> None:
        t = self.cfg.TRAIN
        epoch = -(-self.iteration // self.epoch_iters)
        finished = self.iteration == self.max_iters
        if finished or (t.eval_every > 0 and epoch % t.eval_every == 0):
            result = evaluate(self.model, self.cfg, self.ctx,
                              out_dir=self.out_dir / "eval" if finished else None,
                              per_image=self.out_dir / PER_IMAGE_FILE if finished else None)
            self.metrics.write("val", self.iteration, epoch=epoch, protocol=result.protocol,
                               **result.summary, class_iou=result.matrix.iou().tolist())
            self.network.train()
            if t.fix_bn:
                freeze_batchnorm(self.model)
        if epoch % t.ckpt_every == 0 or finished:
            self.save(f"epoch_{epoch}.pth")

    def close(self) -> None:
        self.metrics.close()
