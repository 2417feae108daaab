"""What combines with what: one table of feature interactions, each row with its reason and remedy.

A row either refuses two features together (``conflict``) or refuses a feature without the one it needs
(``needs``: an option that would do nothing). Every caller checks the same rows: each config's ``__post_init__``
for the rows within it, ``surgery train`` and ``surgery.train`` for the whole run before anything loads,
``surgery plan`` so that it refuses exactly what training would, rule files and exports for theirs. The docs'
table of combinations is generated from ``ROWS`` (``table_markdown``).

Features are named as users meet them: an option by its flag (``--fsdp``), a rule-file feature by its key
(``use_dora``, ``extra_tokens``), a storage by its scheme (``int8``). A check takes the features present, each
with where it comes from (``--fsdp``, ``rules/qv_lora.yaml:3``), so the one error names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .errors import DataError, DeviceError, ExportError, RuleFileError, ShardingError, SurgeryError, TrainError

Kind = Literal["conflict", "needs"]


@dataclass(frozen=True)
class Row:
    """One interaction: ``first`` with ``second`` refused (conflict), or ``first`` without ``second`` (needs)."""

    first: str
    second: str
    kind: Kind
    reason: str
    remedy: str
    error: type[SurgeryError] = TrainError

    def message(self, where: Mapping[str, str]) -> str:
        a = _named(self.first, where)
        if self.kind == "needs":
            return f"{a} does nothing without {self.second}: {self.reason}; {self.remedy}"
        return f"{a} with {_named(self.second, where)}: {self.reason}; {self.remedy}"


def _named(feature: str, where: Mapping[str, str]) -> str:
    source = where.get(feature, feature)
    return feature if source == feature else f"{feature} ({source})"


_SHARDED = "FSDP2 holds the base sharded over the processes"
ROWS: tuple[Row, ...] = (
    # --fsdp: one base sharded over the ranks
    Row(
        "--fsdp",
        "--batched",
        "conflict",
        "a batched pass does not run on a sharded base yet",
        "drop --batched (the jobs take turns on the sharded base) or drop --fsdp",
        ShardingError,
    ),
    Row(
        "--fsdp",
        "--device-map",
        "conflict",
        "--device-map places one process's base over the GPUs, --fsdp shards one base over the processes",
        "use one of them",
        ShardingError,
    ),
    Row(
        "--device-map",
        "torchrun",
        "conflict",
        "under torchrun each process would hold its own placed base",
        "shard one base over the processes with --fsdp, or launch one process with --device-map",
        ShardingError,
    ),
    Row(
        "--fsdp",
        "int8",
        "conflict",
        "FSDP cannot shard LLM.int8 (its row scales live in a per-layer matmul state)",
        "quantize the base as nf4 (`quantize: nf4`) to shard it, or train with DDP without --fsdp",
        ShardingError,
    ),
    Row(
        "--fsdp",
        "4-bit embedding",
        "conflict",
        "FSDP2 cannot shard bitsandbytes' Embedding4bit (it has no quant_storage to rebuild its weight from a shard)",
        "keep embeddings unquantized (`type: embedding, action: freeze`), or train without --fsdp",
        ShardingError,
    ),
    Row(
        "--fsdp",
        "use_dora",
        "conflict",
        f"DoRA reads each adapted layer's whole weight in every forward, and {_SHARDED}",
        "train DoRA without --fsdp (DDP, or one process), or drop use_dora",
        ShardingError,
    ),
    Row(
        "--fsdp",
        "loftq",
        "conflict",
        f"a LoftQ start reads each adapted layer's whole weight, and {_SHARDED}",
        "train without --fsdp",
        ShardingError,
    ),
    Row(
        "--fsdp",
        "extra_tokens",
        "conflict",
        f"new tokens get rows of their own beside the embedding and output layer, and {_SHARDED}",
        "train new tokens without --fsdp (DDP, or one process)",
        ShardingError,
    ),
    Row(
        "--fsdp",
        "--compile",
        "conflict",
        "torch.compile of a fine-tune's forward does not cover the sharded base's gathers",
        "train without --compile",
        ShardingError,
    ),
    Row(
        "ACCELERATE_USE_FSDP",
        "--fsdp",
        "needs",
        "accelerate's FSDP setting does not apply to surgery's training "
        "loop, and FSDP1 cannot wrap fine-tunes that share a base",
        "launch with `accelerate launch --multi_gpu` "
        "without an FSDP config and pass --fsdp to shard the base with FSDP2",
        ShardingError,
    ),
    # --batched: several jobs' micro-batches in one base pass
    Row(
        "--batched",
        "--gradient-checkpointing",
        "conflict",
        "a batched pass's backward runs after the pass is re-routed per job, so a recompute would route wrongly",
        "drop one of them (the jobs take turns with checkpointing)",
    ),
    Row(
        "--batched",
        "--compile",
        "conflict",
        "--compile compiles each fine-tune's forward, which batched passes do not call",
        "drop one of them (the jobs take turns compiled)",
    ),
    Row(
        "--batched",
        "extra_tokens",
        "conflict",
        "a fine-tune with tokens of its own has another vocabulary than the base, and a batched pass needs one",
        "train without --batched (the jobs take turns)",
    ),
    Row(
        "--batched",
        "--packing",
        "conflict",
        "a shared base pass pads every job's rows to one mask, which packed rows cannot share",
        "train packed jobs without --batched",
    ),
    Row(
        "--max-batched-tokens",
        "--batched",
        "needs",
        "it caps the tokens of a batched pass",
        "add --batched or leave it out",
    ),
    # memory
    Row(
        "--offload-activations",
        "--gradient-checkpointing",
        "needs",
        "it moves the layer inputs that checkpointing keeps",
        "add --gradient-checkpointing or leave it out",
    ),
    Row(
        "--mlp-chunk-tokens",
        "--batched",
        "conflict",
        "a batched pass runs the base's structure, not each fine-tune's own MLP blocks",
        "train these jobs without --batched (they take turns), or leave --mlp-chunk-tokens out",
    ),
    Row(
        "--loss-chunk-tokens",
        "--fsdp",
        "conflict",
        "FSDP2 gathers the output layer in the root module's forward, which the chunked loss goes around",
        "leave --loss-chunk-tokens out under --fsdp (the model's own loss over the full logits)",
    ),
    Row(
        "--compile-backend",
        "--compile",
        "needs",
        "it picks the backend --compile uses",
        "add --compile or leave it out",
    ),
    # data
    Row(
        "--packing",
        "--group-texts",
        "conflict",
        "--packing fills rows with whole examples, and --group-texts already concatenates the data into full blocks",
        "give one of them",
        DataError,
    ),
    Row(
        "--eval-split",
        "--eval",
        "conflict",
        "--eval-split holds out part of the training data, and --eval gives other data for evaluation",
        "give one of them",
        DataError,
    ),
    Row(
        "--dataset-test-split",
        "--eval",
        "needs",
        "it picks the split --eval reads",
        "add --eval or leave it out",
        DataError,
    ),
    Row(
        "--early-stopping-patience",
        "--eval-steps",
        "needs",
        "it stops on the eval loss, computed every --eval-steps",
        "add --eval-steps N and --eval FILE or --eval-split FRACTION",
    ),
    Row(
        "--early-stopping-patience",
        "eval data",
        "needs",
        "it stops on the eval loss",
        "add --eval FILE or --eval-split FRACTION",
    ),
    # devices
    Row(
        "--max-memory",
        "--device-map",
        "needs",
        "it bounds what each device takes in accelerate's placement",
        "add --device-map auto or leave it out",
        DeviceError,
    ),
    # rule files and adapters
    Row(
        "use_dora",
        "bias",
        "conflict",
        "DoRA with a LoRA bias is not supported (PEFT refuses it too)",
        "drop one of them",
        RuleFileError,
    ),
    Row(
        "use_dora",
        "loftq",
        "conflict",
        "DoRA's magnitude is the norm of the base's weight, which a LoftQ start changes",
        "drop one of them",
        RuleFileError,
    ),
    Row(
        "use_dora",
        "embedding",
        "conflict",
        "DoRA here covers linear and conv1d layers only",
        "narrow the rule (e.g. `type: linear`) or drop use_dora for it",
        RuleFileError,
    ),
    Row(
        "extra_tokens",
        "--for vllm",
        "conflict",
        "vLLM loads LoRA weights only, not rows of new tokens",
        "merge the fine-tune (`surgery merge`) and serve the merged model",
        ExportError,
    ),
    Row(
        "extra_tokens",
        "--for lorax",
        "conflict",
        "LoRAX loads LoRA weights only, not rows of new tokens",
        "merge the fine-tune (`surgery merge`) and serve the merged model",
        ExportError,
    ),
    Row(
        "use_dora",
        "--for vllm",
        "conflict",
        "vLLM's LoRA loader refuses use_dora",
        "merge the fine-tune, or export for PEFT",
        ExportError,
    ),
    Row(
        "use_dora",
        "--for lorax",
        "conflict",
        "LoRAX reads LoRA A/B weights only",
        "merge the fine-tune, or export for PEFT",
        ExportError,
    ),
)


def problems(present: Mapping[str, str]) -> list[Row]:
    """The rows that refuse the features present (a mapping feature -> where it comes from)."""
    found = []
    for row in ROWS:
        if row.first not in present:
            continue
        if (row.kind == "conflict") == (row.second in present):
            found.append(row)
    return found


def check(present: Mapping[str, str], *, only: tuple[str, ...] | None = None) -> None:
    """Raise one error naming every refused combination of the features present (the first row's error class).

    Args:
        present: the features present, each with where it comes from (``{"--fsdp": "--fsdp", "int8": "rules/x.yaml"}``).
        only: check only rows whose features are all among these (a config checks the rows within itself; a
            ``needs`` row whose needed feature lies outside is left to the whole run's check).
    """
    rows = [r for r in problems(present) if only is None or (r.first in only and r.second in only)]
    if rows:
        raise rows[0].error("; and ".join(row.message(present) for row in rows))


def run_features(*configs, processes: int = 1, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The features of a training run that the table knows, from its configs (``TrainConfig``, ``DataConfig``,
    ``DeviceConfig``: the options they set, evaluation data) and its launch: what ``surgery train`` checks before
    loading and ``surgery plan`` checks for the run it plans, so both refuse the same.

    Args:
        configs: the run's configs.
        processes: processes of the launch (torchrun's world size; ``surgery plan --world-size``).
        environ: the environment (default ``os.environ``): accelerate's FSDP setting.

    Returns:
        Feature -> where it comes from.
    """
    import os

    from .options import set_options

    present: dict[str, str] = {}
    for config in configs:
        present.update(set_options(config))
    data = next((c for c in configs if hasattr(c, "eval_split")), None)
    if data is not None and (data.eval_data is not None or data.eval_split is not None):
        present["eval data"] = "--eval" if data.eval_data is not None else "--eval-split"
    if processes > 1:
        present["torchrun"] = f"{processes} processes"
    if (os.environ if environ is None else environ).get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        present["ACCELERATE_USE_FSDP"] = "the environment"
    return present


def row(first: str, second: str) -> Row:
    """The row about ``first`` and ``second`` (for a caller that phrases the refusal in its own terms)."""
    return next(r for r in ROWS if r.first == first and r.second == second)


def rule_features(rules, plan=None) -> dict[str, str]:
    """The features of a rule file (a ``RuleSet``) the table knows, each with where it is written; with its ``plan`` of
    a model, also what that plan really stores (``int8`` layers, a ``4-bit embedding``), named with the deciding
    rule and module."""
    out: dict[str, str] = {}
    if rules.extra_tokens is not None:
        out["extra_tokens"] = f"{rules.source}: extra_tokens"
    configs = [(r, c) for r in rules.rules for c in [r.lora, *(c for _, c in r.lora_by_module)] if c is not None]
    for key, test in (("use_dora", lambda c: c.use_dora), ("loftq", lambda c: c.init_lora_weights == "loftq")):
        found = next((r for r, c in configs if test(c)), None)
        if found is not None:
            out[key] = f"{found.location}: {found.label}"
    for d in plan.quantized if plan is not None else ():
        rule = d.decided_by if d.rule else f"{rules.source} (`default: {rules.default}`)"
        if d.quant.scheme == "int8":
            out.setdefault("int8", f"{rule} stores '{d.path}' as LLM.int8")
        elif d.kind == "embedding":
            out.setdefault("4-bit embedding", f"{rule} stores the embedding '{d.path}' as {d.quant.scheme}")
    return out


def table_markdown() -> str:
    """The docs' table of combinations, generated from ``ROWS``."""
    lines = ["| with | refused | why | what to do |", "|---|---|---|---|"]
    for r in ROWS:
        what = f"`{r.first}` without `{r.second}`" if r.kind == "needs" else f"`{r.first}` with `{r.second}`"
        lines.append(f"| {r.first} | {what} | {r.reason} | {r.remedy} |")
    return "\n".join(lines) + "\n"
