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

Before the model loads, ``check_trackers`` makes sure each tracker can start without waiting: its folders under
``log_dir`` are folders (or absent), and a tracking server it would contact (``MLFLOW_TRACKING_URI`` over HTTP,
W&B online) answers one request within ``REACH_SECONDS``; MLflow's client would otherwise retry for minutes.
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
REACH_SECONDS = 5.0  # one request to a tracking server, answered within this or the run is refused
FOLDERS = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "mlflow": ("mlruns",)}  # made under log_dir
WANDB_OFFLINE = ("offline", "disabled", "dryrun")


def check_trackers(names: tuple[TrackerName, ...], log_dir: Path | None) -> None:
    """Every tracker in ``names`` can start at once: its folders under ``log_dir`` are not files, and a server it
    would contact answers (one request, ``REACH_SECONDS`` at most). Called before the model loads.

    Args:
        names: the trackers of ``--report-to``.
        log_dir: where their runs go (``--out``); None when there is none (then nothing is written there).

    Raises:
        TrainError: naming the folder or the URI, and what to do.
    """
    for name in names:
        if log_dir is not None:
            _check_folders(name, Path(log_dir))
    if "mlflow" in names and os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
        if uri.lower().startswith(("http://", "https://")):
            _reach(uri, "MLFLOW_TRACKING_URI", "start the MLflow server, or unset the variable to keep runs in OUT")
    if "wandb" in names and os.environ.get("WANDB_MODE", "online").lower() not in WANDB_OFFLINE:
        if os.environ.get("WANDB_DISABLED", "").lower() not in ("1", "true"):
            url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
            _reach(url, "WANDB_BASE_URL", "set WANDB_MODE=offline to keep the W&B runs in OUT/wandb")


def _check_folders(name: TrackerName, log_dir: Path) -> None:
    """The tracker's folders under ``log_dir`` (and MLflow's local database file) are what they must be."""
    import stat

    paths = [log_dir / folder for folder in FOLDERS[name]]
    for path in paths:
        if os.path.lexists(path) and not path.is_dir():
            raise TrainError(
                f"--report-to {name}: {path} is not a folder, but the tracker keeps its runs there; move it away "
                "or choose another --out"
            )
    database = log_dir / "mlflow.db"
    if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI") and os.path.lexists(database):
        if not database.exists() or not stat.S_ISREG(os.stat(database).st_mode):  # a dangling link, a FIFO
            raise TrainError(
                f"--report-to mlflow: {database} is not a regular file, but MLflow keeps its runs in that SQLite "
                "database; move it away or choose another --out"
            )


def _reach(url: str, variable: str, remedy: str) -> None:
    """One HTTP request to ``url`` answered within REACH_SECONDS (any HTTP status counts), else a TrainError."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=REACH_SECONDS):
            pass
    except urllib.error.HTTPError:
        return  # the server answered
    except (OSError, ValueError) as exc:  # refused, unreachable, no answer in time, not a URL
        reason = getattr(exc, "reason", None) or exc  # URLError wraps the socket's error
        why = first_line(reason) if isinstance(reason, BaseException) else str(reason)
        raise TrainError(
            f"--report-to: {variable}={url} does not answer ({why}; one request, {REACH_SECONDS:g} s at most); {remedy}"
        ) from None


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
        check_trackers(names, log_dir)
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
