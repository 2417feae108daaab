"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, one run per job, through each library's client.

``--report-to tensorboard,wandb`` (``train(..., report_to=...)``) opens one tracker run per job on
rank 0 with the job's rule file, plan and settings as its config, logs every step's metrics
(``train/loss``, ``train/lr``, ``eval/loss``, ...) at the step they belong to, and closes the runs
when training ends or stops. The libraries are optional extras, imported only when asked for; a
missing one is a TrainError naming the extra to install, raised before anything trains.

Where runs go, under ``log_dir`` (the CLI's ``--out``): TensorBoard event files in
``tensorboard/JOB``; W&B's run folders in ``wandb/`` (``WANDB_MODE=offline`` keeps them local;
``WANDB_PROJECT``, default ``surgery``); MLflow runs in ``$MLFLOW_TRACKING_URI`` when set, else
in ``mlflow.db`` (SQLite) with artifacts in ``mlruns/`` (experiment ``$MLFLOW_EXPERIMENT_NAME``,
default ``surgery``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import TrainError, first_line
from .config import TrackerName

if TYPE_CHECKING:
    from .job import Job

PROJECT = "surgery"  # W&B project and MLflow experiment unless the environment names one


class TrackerRun(Protocol):
    """One job's run in one tracker."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def run_config(job: Job) -> dict:
    """What a tracker run records as its config: the job, its rule file, its plan and its settings."""
    from ..base.ownership import require_finetune

    info = require_finetune(job.finetune, "reported")
    identity = {k: v for k, v in job.identity.items() if k != "rules"}
    return {
        "job": job.name,
        "rules": info.rules.to_dict(),
        "rules_source": str(info.rules.source),
        "plan": _plan_summary(info.plan),
        "train": dataclasses.asdict(job.config),
        **identity,
        "train_rows": len(job.data),
        "eval_rows": len(job.eval_data) if job.eval_data is not None else 0,
    }


def _plan_summary(plan) -> dict:
    """The plan's memory, trainable count and decisions (module -> action) as JSON-ready data."""
    full = plan.to_dict()
    return {
        "memory": full["memory"],
        "trainable_params_per_finetune": full["trainable_params_per_finetune"],
        "decisions": {d["module"]: d["action"] for d in full["decisions"]},
    }


def metrics_of(record: dict) -> dict[str, float]:
    """A step record as tracker metrics: ``eval_loss`` -> ``eval/loss``, ``perplexity`` -> ``eval/perplexity``,
    the rest ``train/NAME``; only finite numbers (the job name, step and notes are not metrics)."""
    out = {}
    for key, value in record.items():
        if key in ("job", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        if key.startswith("eval_"):
            out[f"eval/{key[len('eval_') :]}"] = float(value)
        elif key == "perplexity":
            out["eval/perplexity"] = float(value)
        else:
            out[f"train/{key}"] = float(value)
    return out


class Trackers:
    """Every tracker run of every job; ``report(job name, record)`` after each step, ``close()`` at the end."""

    def __init__(self, names: tuple[TrackerName, ...], jobs: list[Job], log_dir: Path):
        self.runs: dict[str, list[TrackerRun]] = {}
        try:
            for job in jobs:
                config = run_config(job)
                for name in names:
                    self.runs.setdefault(job.name, []).append(_OPENERS[name](job.name, config, Path(log_dir)))
        except TrainError:
            self.close()
            raise
        except Exception as exc:  # a tracker that cannot start (a bad URI, an unwritable folder, ...)
            self.close()
            raise TrainError(
                f"--report-to: a tracker run could not start in {log_dir} ({type(exc).__name__}: {first_line(exc)})"
            ) from None

    def report(self, job: str, record: dict) -> None:
        metrics = metrics_of(record)
        if metrics:
            for run in self.runs.get(job, ()):
                run.log(metrics, int(record["step"]))

    def close(self) -> None:
        for runs in self.runs.values():
            for run in runs:
                run.close()
        self.runs = {}


class _TensorBoard:
    """A SummaryWriter in LOG_DIR/tensorboard/JOB (one TensorBoard run per job); the config as JSON text."""

    def __init__(self, job: str, config: dict, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir / "tensorboard" / job))
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """A W&B run named after the job (``reinit='create_new'``: several at once), its files in LOG_DIR/wandb."""

    def __init__(self, job: str, config: dict, log_dir: Path):
        import wandb

        log_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=job,
            dir=str(log_dir),
            config=config,
            reinit="create_new",
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    """An MLflow run named after the job through ``MlflowClient`` (several runs at once, no global state)."""

    def __init__(self, job: str, config: dict, log_dir: Path):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            log_dir.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{(log_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        found = self.client.get_experiment_by_name(name)
        experiment = (
            found.experiment_id
            if found
            else self.client.create_experiment(
                name,
                artifact_location=None
                if os.environ.get("MLFLOW_TRACKING_URI")
                else (log_dir / "mlruns").resolve().as_uri(),
            )
        )
        self.run_id = self.client.create_run(experiment, run_name=job).info.run_id
        params = [Param(key, str(value)) for key, value in config["train"].items()]  # searchable settings
        self.client.log_batch(self.run_id, params=params)
        self.client.log_dict(self.run_id, config, "config.json")  # the whole config as an artifact

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}
