"""Every error and warning class of surgery, and what the plan's constraints C1-C7 mean.

Every user mistake ends in a SurgeryError subclass whose message names the file:line or module, says
what is wrong and what to do; the CLI prints it as one line and exits with status 2.
"""

from __future__ import annotations

from dataclasses import dataclass


class SurgeryError(Exception):
    """Base class of every error a user can act on (bad input, impossible plan, bad file)."""


class RuleFileError(SurgeryError):
    """A rule file that cannot be read or is malformed (constraint C5)."""


class PatternTimeout(RuleFileError):
    """A ``re:`` pattern that took too long on one module name (catastrophic backtracking)."""

    def __init__(self, pattern: str, seconds: float):
        super().__init__(
            f"pattern '{pattern}' took over {seconds} s to match one module name (catastrophic "
            "backtracking, e.g. nested repeats like (a+)+); simplify it"
        )
        self.pattern = pattern


class ModelNotFoundError(SurgeryError):
    """A MODEL argument that names no local directory, cached hub model or bundled model."""


class TraceError(SurgeryError):
    """The model could not be traced or inspected at all."""


class PlanError(SurgeryError):
    """A plan that violates one or more constraints; ``violations`` lists them all."""

    def __init__(self, violations: list[Violation], lines: list[str] | None = None, note: str = ""):
        self.violations = violations
        self.lines = lines or [f"[{v.constraint}] {v.message}" for v in violations]
        self.note = note
        shown = len(self.lines)  # grouped by rule: one line may stand for many modules
        modules = f" ({len(violations)} modules)" if len(violations) != shown else ""
        head = f"{shown} constraint violation{'s' if shown != 1 else ''}{modules}:"
        text = self.lines[0] if shown == 1 else "\n".join([head, *self.lines])
        super().__init__(f"{note}\n{text}" if note else text)

    @property
    def constraints(self) -> list[str]:
        return [v.constraint for v in self.violations]


@dataclass(frozen=True)
class Violation:
    """One broken constraint: its id (C1..C7), the message, and the module it concerns."""

    constraint: str
    message: str
    module: str | None = None


class RewriteError(SurgeryError):
    """A fine-tune that cannot be made or moved as asked; a failed rewrite has restored the base."""


class MergeError(SurgeryError):
    """A fine-tune that cannot be merged into a plain model (refused before anything is built)."""


class ExportError(SurgeryError):
    """A fine-tune that torch.export cannot capture, with the reason."""


class DataError(SurgeryError):
    """A data file that cannot be read or does not fit the model."""


class TrainError(SurgeryError):
    """A training run that cannot start, resume or go on (bad options, folders, checkpoints, non-finite loss)."""


class AdapterStateError(SurgeryError):
    """An adapter file that cannot be saved or loaded onto this base."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, bounded: for quoting a library's error in ours."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ModelConfigError(SurgeryError):
    """A model config (or folder) that cannot build a causal language model, or a missing tokenizer."""


class DeviceError(SurgeryError):
    """A device that is not there (--device cuda without CUDA, cuda:N past the last GPU) or a bad --max-memory."""


class ShardingError(SurgeryError):
    """A base that cannot be sharded with FSDP2 as asked, or an operation a sharded base cannot do."""


class SurgeryWarning(UserWarning):
    """Base class of surgery's warnings (the test suite turns them into errors outside pytest.warns)."""


class SharedBaseWarning(SurgeryWarning):
    """A rewrite quantizes modules that fine-tunes made earlier still use in full precision."""


class ShardingWarning(SurgeryWarning):
    """Sharding that saves nothing (one process) or needs care."""


class TruncationWarning(SurgeryWarning):
    """Some training rows lost every loss token to --block-size (their prompts fill the block)."""


CONSTRAINTS = {  # what each constraint id in a PlanError means; docs/rule-files.md's table says the same
    "C1": "no unquantize after quantize: a module the base already holds quantized cannot be planned unquantized "
    "(a rule that freezes it, `quantize: none`) or quantized again with another scheme or other settings",
    "C2": "no trainable quantized module: `plain` on a quantized module is an error",
    "C3": "`adapt` only on Linear, Conv1D, Embedding (and their bitsandbytes forms) and learned positional embeddings",
    "C4": "a rule that matches nothing is an error (close names suggested) unless `optional: true`",
    "C5": "malformed rule files fail at load with file:line",
    "C6": "ties are never split silently: a `plain` rule that splits one needs `untie: true`",
    "C7": "per-module LoRA configs (`lora_by_module`) must cover every adapted module",
}
