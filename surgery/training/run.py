"""``surgery.train``: a whole training run from its configs, every check before the model loads.

What ``surgery train`` does, as a library call: the jobs' rule files (or the LoRA shorthand) read once, the
combinations of features checked against one table (``surgery.combinations``), the data read and checked, the
output folders and the checkpoints to resume from found, and only then the base loaded (quantized as it loads,
on its devices), the jobs made and trained (``loop.train``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..base.sources import config_identity
from ..combinations import check, rule_features, run_features
from ..devices import DeviceConfig
from ..distributed import world
from ..errors import TrainError
from ..options import set_options
from ..rules.rule_file import load_rules, read_extra_tokens, with_extra_tokens
from ..rules.ruleset import RuleSet
from ..rules.shorthand import LoraShorthand
from .checkpoint import check_output_folder, resume_points
from .config import DataConfig, TrackerConfig, TrainConfig
from .data import DataSource, check_block_size, config_max_length, read_data
from .job import Run
from .trackers import check_trackers


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One fine-tune of a run: its name (its folder under --out), its rules and its data."""

    name: str | None
    rules: RuleSet | str | Path
    data: str | Path

    @classmethod
    def parse(cls, text: str) -> JobSpec:
        """``--job NAME=RULES,DATA``."""
        name, sep, rest = text.partition("=")
        rules, comma, data = rest.partition(",")
        if not (sep and comma and name and rules and data):
            raise TrainError(f"--job {text!r}: write NAME=RULES,DATA, e.g. --job caps=lora_plus_head,capitals")
        return cls(name=name, rules=rules, data=data)


@dataclass(frozen=True)
class RunStart:
    """What a run is about to train, for the caller to show (the CLI's first line)."""

    model: str
    source: str  # why this model: --model, the rule file's model:, the bundled default, a model given
    jobs: tuple[str, ...]
    processes: int
    fsdp: bool
    devices: DeviceConfig
    resumed: tuple[tuple[str, Path], ...] = ()  # (job, the checkpoint it resumes from)


def train(
    model: str | nn.Module | None = None,
    rules: RuleSet | str | Path | None = None,
    *,
    data: str | Path | None = None,
    out: str | Path | None = None,
    jobs: Sequence[JobSpec] = (),
    training: TrainConfig = TrainConfig(),
    data_config: DataConfig = DataConfig(),
    lora: LoraShorthand = LoraShorthand(),
    devices: DeviceConfig = DeviceConfig(),
    trackers: TrackerConfig = TrackerConfig(),
    tokenizer: str | Any | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
    random_init: bool = False,
    on_start: Callable[[RunStart], None] | None = None,
    on_step: Callable[[Run, dict], None] | None = None,
) -> list[Run]:
    """Train one fine-tune (``rules`` + ``data``, or the LoRA shorthand ``lora`` + ``data``), or several on one
    shared base (``jobs``); every check before the model loads.

    Args:
        model: a model name or folder (loaded and quantized for every job's rules as it loads), or a base already
            loaded. Default: the rule file's ``model:``, else the bundled tiny default.
        rules: the rule file of a single job (a RuleSet, a path or a bundled name).
        data: the training data of a single job (a file, a stored dataset, a cached dataset's name or a bundled
            set).
        out: the output folder (one subfolder per job of ``jobs``); None keeps nothing on disk.
        jobs: several fine-tunes on one base, each with its name, rules and data.
        training: how each job trains.
        data_config: how the data is read and cut into rows.
        lora: a one-off LoRA instead of ``rules``.
        devices: where the base computes and how it is placed.
        trackers: experiment trackers.
        tokenizer: a tokenizer, or the folder or model to load one from (default: the model's own).
        resume: a checkpoint folder, or the ``out`` of an earlier run (each job resumes from its newest
            checkpoint).
        overwrite: move an earlier run in ``out`` aside (nothing deleted).
        random_init: build random weights when the model has none.
        on_start: called once before training with what the run is.
        on_step: called after every step of every job with its run and metrics record.

    Returns:
        The finished runs, one per job.

    Raises:
        SurgeryError: every user error, before the model loads where the model is not needed.
    """
    specs = _specs(rules, data, jobs, lora, data_config)
    name, source = _model_choice(model, specs[0][1])
    _check_combinations(training, data_config, devices, specs, name if isinstance(name, str) else None)
    if isinstance(name, str):  # the config says how long a row may be: before anything loads
        identity = config_identity(name)  # {"tiny"|"bundled"|"config.json": the config as JSON}, None unreadable
        config = next(iter(identity.values())) if identity else {}
        check_block_size(data_config.block_size, config_max_length(config), name)
    sources = {job_name: read_data(job_data, data_config) for job_name, _, job_data in specs}
    where = world()
    folders = {job_name: _folder(out, job_name, bool(jobs)) for job_name, _, _ in specs}
    resumed = resume_points(Path(resume) if resume is not None else None, folders, bool(jobs))
    if where.main:
        for job_name, folder in folders.items():
            if folder is not None:
                check_output_folder(folder, resume=resumed.get(job_name), overwrite=overwrite)
        check_trackers(trackers.trackers, None if out is None or overwrite else Path(out))  # --overwrite: OUT anew
    base, tokenizer, label = _load(model, name, specs, devices, tokenizer, random_init, training.fsdp)
    if on_start is not None:
        on_start(
            RunStart(label, source, tuple(folders), where.size, training.fsdp, devices, tuple(sorted(resumed.items())))
        )
    return _run(
        base,
        tokenizer,
        label,
        specs,
        sources,
        folders,
        resumed,
        training,
        data_config,
        trackers,
        out,
        overwrite,
        on_step,
        lora,
    )


def _specs(rules, data, jobs, lora: LoraShorthand, data_config: DataConfig) -> list[tuple[str, RuleSet, Any]]:
    """(job name, rules read once, data) per job; the shorthand stands for a rule file; extra tokens added."""
    if lora.given and (rules is not None or jobs):
        raise TrainError("--target-modules replaces RULES and --job: give one of them")
    single = lora.rules() if lora.given else rules
    specs = [(None, single, data)] if single is not None or data is not None else []
    specs += [(j.name, j.rules, j.data) for j in jobs]
    if not specs or any(r is None or d is None for _, r, d in specs):
        raise TrainError("give RULES with --data, or one or more --job NAME=RULES,DATA")
    loaded = [(n, load_rules(r), d) for n, r, d in specs]
    if data_config.extra_tokens is not None:
        tokens = read_extra_tokens(data_config.extra_tokens)
        loaded = [(n, with_extra_tokens(r, tokens, str(data_config.extra_tokens)), d) for n, r, d in loaded]
    names = [n or ("lora" if lora.given else r.name) for n, r, _ in loaded]
    if len(set(names)) != len(names):
        raise TrainError(f"job names must be unique: {', '.join(names)}")
    return [(name, r, d) for name, (_, r, d) in zip(names, loaded)]


def _model_choice(model, first_rules: RuleSet) -> tuple[str | nn.Module, str]:
    from ..model.architectures import TINY_DEFAULT

    if isinstance(model, nn.Module):
        return model, "a model given"
    if model:
        return str(model), "--model"
    if first_rules.model:
        return first_rules.model, f"`model:` of {first_rules.source}"
    return TINY_DEFAULT, "the bundled tiny default (no --model and no `model:` in the rule file)"


def _check_combinations(training, data_config, devices, specs, model_name: str | None) -> None:
    """The whole run against the table of what combines: options, the rule files' features, the launch."""
    present = run_features(training, data_config, devices, processes=world().size)
    for _, rules, _ in specs:
        plan = _meta_plan(model_name, rules) if training.fsdp and model_name is not None else None
        present.update({k: v for k, v in rule_features(rules, plan).items() if k not in present})
    check(present)


def _meta_plan(model_name: str, rules: RuleSet):
    """The plan of MODEL by ``rules`` on the meta device (from the trace cache): what a rule file really stores."""
    from ..base.layout import graph_of
    from ..planning.decisions import plan as make_plan

    return make_plan(graph_of(model_name), rules)


def _folder(out, job_name: str, named: bool) -> Path | None:
    """A job's output folder: OUT for a single job, OUT/NAME for each of --job."""
    if out is None:
        return None
    return Path(out) / job_name if named else Path(out)


def _load(model, name, specs, devices: DeviceConfig, tokenizer, random_init: bool, fsdp: bool):
    """The base (quantized for every job's rules as it loads, on its devices; sharded with --fsdp) and tokenizer."""
    from ..base.loading import load_model
    from ..base.shared_base import prepare_base
    from ..base.tokenizer import load_tokenizer
    from ..finetune.sharding import shard_base

    rule_sets = [r for _, r, _ in specs]
    if isinstance(name, nn.Module):
        if set_options(devices):
            raise TrainError(
                "the model is already loaded, so --device, --device-map and --max-memory do nothing; "
                "place the base before training, or pass its name"
            )
        base, label = name, type(name).__name__
        prepare_base(base, *rule_sets)
    else:
        base = load_model(name, random_init=random_init, rules=rule_sets, **devices.placement()).model
        label = name
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        if tokenizer is None and not isinstance(name, str):
            raise TrainError("give the tokenizer (a tokenizer, or its folder) when the model is already loaded")
        tokenizer = load_tokenizer(str(tokenizer or name))
    if fsdp:
        shard_base(base)
    return base, tokenizer, label


def _run(
    base,
    tokenizer,
    label,
    specs,
    sources: dict[str, DataSource],
    folders,
    resumed,
    training,
    data_config,
    trackers: TrackerConfig,
    out,
    overwrite,
    on_step,
    lora: LoraShorthand,
) -> list[Run]:
    from .job import make_job
    from .loop import train_jobs

    jobs = [
        make_job(
            base,
            name=n,
            rules=r,
            data=sources[n],
            tokenizer=tokenizer,
            config=training,
            data_config=data_config,
            out=folders[n],
            model_name=label,
        )
        for n, r, _ in specs
    ]
    runs = train_jobs(
        jobs,
        resume=resumed,
        on_step=on_step,
        batched=training.batched,
        max_batched_tokens=training.max_batched_tokens,
        overwrite=overwrite,
        report_to=trackers.trackers,
        log_dir=Path(out) if out is not None else None,
    )
    if lora.given and out is not None and world().main:
        record_rules(specs[0][1], Path(out))
    return runs


def record_rules(rules: RuleSet, out: Path) -> Path:
    """OUT/rules.yaml: the rule file a shorthand run used, next to its adapter."""
    import yaml

    from ..disk import atomic_write

    text = f"# {rules.description}\n" + yaml.safe_dump(rules.to_dict(), sort_keys=False)
    atomic_write(out / "rules.yaml", text.encode(), error=TrainError)
    return out / "rules.yaml"
