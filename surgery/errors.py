"""The error classes of surgery: every user mistake ends in a SurgeryError subclass."""

from __future__ import annotations

from dataclasses import dataclass


class SurgeryError(Exception):
    """Base class of every error a user can act on (bad input, impossible plan, bad file)."""


class RuleFileError(SurgeryError):
    """A rule file that cannot be read or is malformed (constraint C5)."""


class ModelNotFoundError(SurgeryError):
    """A MODEL argument that names no local directory, cached hub model or bundled model."""


class TraceError(SurgeryError):
    """The model could not be traced or inspected at all."""


class PlanError(SurgeryError):
    """A plan that violates one or more constraints; ``violations`` lists them all."""

    def __init__(self, violations: list["Violation"]):
        self.violations = violations
        lines = [f"[{v.constraint}] {v.message}" for v in violations]
        head = f"{len(violations)} constraint violation{'s' if len(violations) != 1 else ''}:"
        super().__init__(lines[0] if len(lines) == 1 else "\n".join([head, *lines]))

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


class AdapterStateError(SurgeryError):
    """An adapter file that cannot be saved or loaded onto this base."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, bounded: for quoting a library's error in ours."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


class ModelConfigError(SurgeryError):
    """A model config (or folder) that cannot build a causal language model, or a missing tokenizer."""
