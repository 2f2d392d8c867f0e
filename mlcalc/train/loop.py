"""The training loop: ``fit(config)`` trains or fine-tunes a model, validates, exports and resumes.

Files in ``config.output_dir``: ``latest.pt`` (the whole run: raw weights, EMA, optimizer, schedule, epoch, best
metric, patience, torch RNG, normalisers, config), ``best_model.pt`` (the EMA weights of the best validation, in
mlcalc's checkpoint format: ``mlcalc.load_model`` and every calculator read it), ``log.csv`` / ``log.jsonl``
(one row per epoch) and ``config.json``. Validation runs the calculator's own ``MLCalculator.evaluate`` on graphs
from ``MLCalculator.build_graph``; training steps run the same arithmetic with ``create_graph=True``
(``batching.evaluate_for_training``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlcalc.calculator import MLCalculator, resolve_device, resolve_dtype
from mlcalc.checkpoint import load_model, save_model
from mlcalc.models.base import MLModel, get_model_class
from mlcalc.train.batching import Sample, collate, evaluate_for_training, make_samples
from mlcalc.train.config import TrainConfig
from mlcalc.train.data import read_db
from mlcalc.train.ema import EMA
from mlcalc.train.logs import EpochLog
from mlcalc.train.losses import (
    LossSums,
    accumulate,
    combine,
    fit_element_energies,
    fit_normalizers,
    loss_terms,
    metrics,
)
from mlcalc.train.schedule import LRSchedule

logger = logging.getLogger(__name__)

STATE_FORMAT = "mlcalc-training-state"
LATEST, BEST = "latest.pt", "best_model.pt"


@dataclass
class FitResult:
    """Outcome of ``fit``: best epoch and its validation metrics, files written, per-epoch history, and the
    model (EMA weights if EMA is on, evaluation mode) at the end of the run."""

    best_epoch: int
    best_metric: float
    best_metrics: dict[str, float]
    last_epoch: int
    stopped_early: bool
    best_model_path: Path
    latest_path: Path
    log_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    model: MLModel | None = None


def _build_model(config: TrainConfig) -> MLModel:
    if config.init_checkpoint is not None:
        model = load_model(config.init_checkpoint)
        if config.model and model.registry_name.lower() != get_model_class(config.model).registry_name.lower():
            raise ValueError(
                f"init_checkpoint holds a {model.registry_name!r} model but config.model is {config.model!r}"
            )
        return model
    model = get_model_class(config.model).from_config(dict(config.model_hparams))
    model.metadata = {}
    return model


def freeze_parameters(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Set requires_grad=False on parameters whose name matches any fnmatch pattern; the frozen names.

    Raises ValueError for a pattern that matches no parameter (a typo would silently train everything).
    """
    names = [n for n, _ in model.named_parameters()]
    frozen = set()
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter (e.g. {names[:3]})")
        frozen.update(hits)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return sorted(frozen)


def _load_samples(config: TrainConfig, calc: MLCalculator) -> tuple[list[Sample], list[Sample], list]:
    train_atoms = read_db(config.train_data, config.train_select or None)[: config.max_train]
    val_atoms = read_db(config.val_data or config.train_data, config.val_select or None)[: config.max_val]
    if not train_atoms:
        raise ValueError(f"no training structures in {config.train_data} for select {config.train_select!r}")
    if not val_atoms:
        raise ValueError(f"no validation structures for select {config.val_select!r}")
    return make_samples(train_atoms, calc), make_samples(val_atoms, calc), train_atoms


def _symbols(sample: Sample) -> set[str]:
    from ase.data import chemical_symbols

    return {chemical_symbols[int(z)] for z in sample.graph.numbers.unique().tolist()}


class _Run:
    """State of one run; ``fit`` drives it."""

    def __init__(self, config: TrainConfig, resume: bool) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype)
        latest = self.out / LATEST
        self.state = None
        if resume:
            if not latest.is_file():
                raise FileNotFoundError(f"cannot resume: {latest} does not exist")
            self.state = torch.load(latest, map_location="cpu", weights_only=True)
            if self.state.get("format") != STATE_FORMAT:
                raise ValueError(f"{latest} is not an mlcalc training state")
            diff = config.differences(self.state["config"])
            if diff:
                lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (new, old) in diff.items())
                raise ValueError(
                    f"refusing to resume {latest}: the config changed ({lines}). Resume with the same config, or "
                    "start a new run (fine-tune from its best_model.pt with init_checkpoint)"
                )
        elif latest.exists():
            raise FileExistsError(f"{self.out} already holds a run ({LATEST}); resume it or choose another output_dir")
        self.out.mkdir(parents=True, exist_ok=True)

        torch.manual_seed(config.seed)
        model = _build_model(config)
        self.frozen = freeze_parameters(model, list(config.freeze))
        self.model = model.to(device=self.device, dtype=self.dtype)
        # the init checkpoint's element list would make the calculator refuse new elements of the fine-tuning
        # data; it is merged with the training elements at export
        self.base_elements = list((getattr(model, "metadata", None) or {}).pop("elements", None) or [])
        self.calc = MLCalculator(self.model, device=self.device, dtype=self.dtype)
        if self.calc.model is not self.model:  # never validate a stale copy
            raise RuntimeError("MLCalculator copied the training model; device/dtype mismatch")
        self.train_samples, self.val_samples, train_atoms = _load_samples(config, self.calc)
        self.elements = sorted({s for a in train_atoms for s in a.get_chemical_symbols()})
        unseen = sorted(
            {s for g in self.val_samples for s in _symbols(g)} - set(self.elements) - set(self.base_elements)
        )
        if unseen and not (config.init_checkpoint is not None and not self.base_elements):
            logger.warning(
                "validation structures contain element(s) %s absent from the training data; the exported model "
                "lists only the training elements and its calculator will refuse them",
                unseen,
            )
        if self.state is not None:
            self.model.element_references = {int(z): float(e) for z, e in self.state["element_references"].items()}
        elif config.element_references == "fit" or (
            config.element_references == "auto" and config.init_checkpoint is None
        ):
            refs = fit_element_energies(self.train_samples)
            for z in {int(z) for g in self.val_samples for z in g.graph.numbers.tolist()} - set(refs):
                refs[z] = 0.0  # seen only in validation: no data to fit it from
            self.model.element_references = refs
        elif config.element_references == "none":
            self.model.element_references = {}
        logger.info("element references %s", self.model.element_references)
        if self.state is not None:
            self.model.normalizers = {k: tuple(v) for k, v in self.state["normalizers"].items()}
        elif isinstance(config.normalizers, dict):
            self.model.normalizers = {k: (float(v[0]), float(v[1])) for k, v in config.normalizers.items()}
        elif config.normalizers == "fit":
            self.model.normalizers = fit_normalizers(
                self.train_samples, self.model.direct_forces, self.model.element_references
            )
        elif not self.model.normalizers:
            raise ValueError(f"normalizers='keep' but {config.init_checkpoint} has no normalizers")
        logger.info("normalizers %s", self.model.normalizers)

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("every parameter is frozen; nothing to train")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, weight_decay=config.weight_decay, amsgrad=config.amsgrad
        )
        steps_per_epoch = math.ceil(len(self.train_samples) / config.batch_size)
        self.schedule = LRSchedule(
            self.optimizer, config.scheduler, config.epochs * steps_per_epoch, config.warmup_steps,
            config.warmup_factor, config.min_lr_ratio, config.plateau_factor, config.plateau_patience,
        )  # fmt: skip
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay else None
        self.epoch, self.best_metric, self.best_epoch, self.bad_epochs = 0, math.inf, 0, 0
        self.best_metrics: dict[str, float] = {}
        self.log = EpochLog(self.out / f"log.{config.log_format}", config.log_format)
        if self.state is not None:
            self._restore(self.state)
        else:
            self.log.reset()
            (self.out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    # -- state ---------------------------------------------------------------------------------------------
    def _restore(self, s: dict[str, Any]) -> None:
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.schedule.load_state_dict(s["schedule"])
        if self.ema is not None:
            if s["ema_names"] != self.ema.names:
                raise ValueError("the training state's EMA covers other parameters than this model's")
            self.ema.load_state_dict(s["ema"])
        self.epoch, self.best_metric, self.best_epoch = int(s["epoch"]), float(s["best_metric"]), int(s["best_epoch"])
        self.bad_epochs, self.best_metrics = int(s["bad_epochs"]), dict(s["best_metrics"])
        torch.set_rng_state(s["rng_cpu"])
        self.log.truncate(self.epoch)
        logger.info(
            "resumed %s at epoch %d (best %s = %.6g)", self.out, self.epoch, self.config.metric, self.best_metric
        )

    def save_state(self) -> None:
        """Write ``latest.pt`` atomically (raw weights, never the EMA ones)."""
        state = {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "model_name": self.model.registry_name,
            "hparams": json.loads(json.dumps(self.model.hparams, default=str)),
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "normalizers": {k: [float(m), float(s)] for k, (m, s) in self.model.normalizers.items()},
            "element_references": {int(z): float(e) for z, e in self.model.element_references.items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "ema_names": self.ema.names if self.ema is not None else None,
            "epoch": self.epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "bad_epochs": self.bad_epochs,
            "rng_cpu": torch.get_rng_state(),
        }
        tmp = self.out / (LATEST + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.out / LATEST)

    def averaged(self):
        """Context with the EMA weights in the model (a no-op without EMA)."""
        if self.ema is None:
            from contextlib import nullcontext

            return nullcontext(self.model)
        return self.ema.swapped_in(self.model)

    def export(self, path: Path, val_metrics: dict[str, float]) -> None:
        """The current (EMA) model in mlcalc's format (``save_model``) with training metadata.

        Metadata: ``elements`` (training elements plus the base checkpoint's; None when fine-tuning a base that
        lists none, e.g. a fairchem file, so the result stays as unrestricted as its base), ``training_data``,
        ``training_config``, ``fine_tuned_from``, ``frozen_parameters``, ``metrics`` (epoch and ``val_*``).
        """
        c = self.config
        # a base checkpoint without an element list (fairchem files) stays unrestricted after fine-tuning
        unrestricted = c.init_checkpoint is not None and not self.base_elements
        elements = None if unrestricted else sorted(set(self.elements) | set(self.base_elements))
        save_model(
            self.model,
            path,
            elements=elements,
            training_data={
                "train": c.train_data, "train_select": c.train_select, "n_train": len(self.train_samples),
                "val": c.val_data or c.train_data, "val_select": c.val_select, "n_val": len(self.val_samples),
            },
            training_config=c.to_dict(),
            fine_tuned_from=c.init_checkpoint,
            frozen_parameters=self.frozen,
            metrics={"epoch": self.epoch, **{f"val_{k}": v for k, v in val_metrics.items()}},
        )  # fmt: skip

    # -- epochs --------------------------------------------------------------------------------------------
    def train_epoch(self, progress: bool) -> dict[str, float]:
        c = self.config
        self.model.train()
        gen = torch.Generator().manual_seed(c.seed + self.epoch)
        order = torch.randperm(len(self.train_samples), generator=gen).tolist()
        batches = [order[k : k + c.batch_size] for k in range(0, len(order), c.batch_size)]
        bar = _progress(batches, progress, f"epoch {self.epoch + 1}/{c.epochs}")
        totals = {"loss": 0.0, "energy_loss": 0.0, "force_loss": 0.0}
        for idx in bar:
            batch = collate([self.train_samples[k] for k in idx])
            out = evaluate_for_training(self.model, batch.graph)
            e_sum, f_sum, n_f = loss_terms(out, batch, c, self.model.normalizers)
            e_loss, f_loss = e_sum / len(idx), f_sum / max(n_f, 1)
            loss = combine(c, e_loss, f_loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
            self.optimizer.step()
            self.schedule.step()
            if self.ema is not None:
                self.ema.update(self.model)
            for key, value in (("loss", loss), ("energy_loss", e_loss), ("force_loss", f_loss)):
                totals[key] += float(value.detach()) / len(batches)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{float(loss):.4g}", lr=f"{self.schedule.lr:.2e}")
        return totals

    def validate(self) -> dict[str, float]:
        """Validation metrics with the calculator's evaluate (EMA weights must already be swapped in)."""
        c = self.config
        self.model.eval()
        sums = LossSums()
        for k in range(0, len(self.val_samples), c.eval_batch_size):
            batch = collate(self.val_samples[k : k + c.eval_batch_size])
            out = self.calc.evaluate(batch.graph)
            accumulate(sums, {n: t.detach() for n, t in out.items()}, batch, c, self.model.normalizers)
        self.model.train()
        return metrics(sums, c)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return items
    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True)


def fit(
    config: TrainConfig, *, resume: bool = False, progress: bool = True, max_epochs: int | None = None
) -> FitResult:
    """Train (or fine-tune) the model ``config`` describes; see ``mlcalc.train.config`` for every key.

    Args:
        config: the run's settings.
        resume: continue the run in ``config.output_dir`` from its ``latest.pt`` (same config required).
        progress: show a tqdm progress bar per epoch (when tqdm is installed).
        max_epochs: stop this call after that epoch (a later ``resume=True`` call continues: N epochs then a resume
            give the same weights as all epochs in one call). Not part of the config.

    Returns a FitResult. Raises FileExistsError (output_dir holds a run and resume is False), FileNotFoundError
    (resume without ``latest.pt``, missing data), ValueError (changed config on resume, bad data or settings).
    The global torch RNG is restored on return; the run seeds its own.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        return _fit(config, resume, progress, max_epochs)


def _fit(config: TrainConfig, resume: bool, progress: bool, max_epochs: int | None) -> FitResult:
    run = _Run(config, resume)
    c = config
    stop_at = c.epochs if max_epochs is None else min(c.epochs, max_epochs)
    stopped_early = c.early_stopping_patience is not None and run.bad_epochs >= c.early_stopping_patience
    while run.epoch < stop_at and not stopped_early:
        t0 = time.perf_counter()
        lr = run.schedule.lr
        train = run.train_epoch(progress)
        run.epoch += 1
        row: dict[str, Any] = {"epoch": run.epoch, "lr": lr, **{f"train_{k}": v for k, v in train.items()}}
        if run.epoch % c.val_every == 0 or run.epoch == c.epochs:
            with run.averaged():
                val = run.validate()
                value = val[c.metric]
                improved = value < run.best_metric - c.min_delta
                if improved:
                    run.best_metric, run.best_epoch, run.best_metrics, run.bad_epochs = value, run.epoch, val, 0
                    run.export(run.out / BEST, val)
                else:
                    run.bad_epochs += 1
            run.schedule.step_metric(value)
            row.update({f"val_{k}": v for k, v in val.items()})
            row["best"] = improved
            stopped_early = c.early_stopping_patience is not None and run.bad_epochs >= c.early_stopping_patience
        row["seconds"] = time.perf_counter() - t0
        run.save_state()
        run.log.append(row)
        logger.info(
            "epoch %d: train loss %.5g, val %s %s (best %.5g at epoch %d)", run.epoch, train["loss"], c.metric,
            f"{row.get('val_' + c.metric, float('nan')):.5g}", run.best_metric, run.best_epoch,
        )  # fmt: skip
    if stopped_early:
        logger.info("early stopping after epoch %d: no improvement for %d validations", run.epoch, run.bad_epochs)
    if run.ema is not None:
        with torch.no_grad():
            for shadow, param in run.ema._pairs(run.model):
                param.copy_(shadow)
    run.model.eval()
    return FitResult(
        best_epoch=run.best_epoch,
        best_metric=run.best_metric,
        best_metrics=dict(run.best_metrics),
        last_epoch=run.epoch,
        stopped_early=stopped_early,
        best_model_path=run.out / BEST,
        latest_path=run.out / LATEST,
        log_path=run.log.path,
        history=run.log.read(),
        model=run.model,
    )
