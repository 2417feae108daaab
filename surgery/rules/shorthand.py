"""The LoRA shorthand: ``--target-modules`` and its companions as a config, and the rule file they stand for.

A one-off LoRA without a rule file, in PEFT's terms (``target_modules``, ``r``, ``lora_alpha``, ...): the config is
checked like every other (an option given without ``--target-modules`` is refused, naming it), and ``rules()``
writes the rule file it stands for, which a run records beside its adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from ..errors import RuleFileError
from ..options import flag, option
from .rule_file import parse_rules
from .ruleset import RuleSet

SHORTHAND = "LoRA shorthand (instead of RULES)"
InitName = Literal["true", "gaussian", "loftq"]
SchemeName = Literal["none", "int8", "nf4", "fp4"]


@dataclass(frozen=True, kw_only=True)
class LoraShorthand:
    """A one-off LoRA: which modules to adapt and how, in PEFT's names (instead of a rule file)."""

    target_modules: str | None = option(
        None,
        help="Instead of RULES, a one-off LoRA: module names to adapt (q_proj,v_proj) or all-linear; the rule file "
        "they stand for is written to OUT/rules.yaml.",
        panel=SHORTHAND,
    )
    lora_r: int | None = option(None, help="With --target-modules: LoRA rank (default 8).", panel=SHORTHAND)
    lora_alpha: float | None = option(
        None, help="With --target-modules: LoRA alpha (default: the rank).", panel=SHORTHAND
    )
    lora_dropout: float | None = option(None, help="With --target-modules: LoRA dropout (default 0).", panel=SHORTHAND)
    use_rslora: bool = option(
        False,
        help="With --target-modules: rank-stabilized LoRA, scaling alpha/sqrt(r) instead of alpha/r (PEFT's "
        "use_rslora).",
        panel=SHORTHAND,
    )
    use_dora: bool = option(
        False,
        help="With --target-modules: DoRA, a trained magnitude per output (PEFT's use_dora; linear layers).",
        panel=SHORTHAND,
    )
    init_lora_weights: InitName | None = option(
        None,
        help="With --target-modules: true (kaiming, B = 0), gaussian, or loftq (start from the base's quantization "
        "error; needs --quantize), as PEFT.",
        panel=SHORTHAND,
    )
    quantize: SchemeName | None = option(
        None,
        help="With --target-modules: none, int8, nf4 or fp4 for every other linear layer and the adapted ones' base "
        "(default none).",
        panel=SHORTHAND,
    )

    def __post_init__(self) -> None:
        if self.target_modules is None:
            stray = next((f.name for f in fields(self) if getattr(self, f.name) not in (None, False)), None)
            if stray is not None:
                raise RuleFileError(
                    f"{flag(type(self), stray)} belongs with --target-modules (a one-off LoRA); with a rule file, "
                    "write it there"
                )
            return
        self.rules()  # every value checked now, naming its flag

    @property
    def given(self) -> bool:
        """True when the shorthand stands for a rule file (``--target-modules`` given)."""
        return self.target_modules is not None

    def rules(self) -> RuleSet:
        """The rule file the options stand for (see ``shorthand_rules``)."""
        if self.target_modules is None:
            raise RuleFileError("--target-modules: the LoRA shorthand needs the modules to adapt")
        init = True if self.init_lora_weights in (None, "true") else self.init_lora_weights
        return shorthand_rules(
            self.target_modules.split(","),
            r=8 if self.lora_r is None else self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout or 0.0,
            quantize=self.quantize or "none",
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            init_lora_weights=init,
        )


ALL_LINEAR = "all-linear"  # PEFT's name for every Linear/Conv1D but the output layer


def shorthand_rules(
    target_modules: list[str],
    *,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    quantize: str = "none",
    use_rslora: bool = False,
    use_dora: bool = False,
    init_lora_weights: bool | str = True,
) -> RuleSet:
    """The rule file that ``--target-modules`` (PEFT-style names, or ``all-linear``), ``--lora-r``,
    ``--lora-alpha`` (default: r), ``--lora-dropout``, ``--use-rslora``, ``--use-dora``, ``--init-lora-weights``
    and ``--quantize`` stand for.

    The targets are adapted, the output layer stays frozen in full precision unless targeted, every
    other Linear/Conv1D is quantized when ``quantize`` is int8 or nf4 (as transformers'
    ``BitsAndBytesConfig`` does), everything else is frozen. Bad values are RuleFileErrors naming the flag.
    """
    targets = [t.strip() for t in target_modules if t.strip()]
    if not targets:
        raise RuleFileError("--target-modules: name at least one module (e.g. q_proj,v_proj) or all-linear")
    lora = {
        "r": r,
        "alpha": r if alpha is None else alpha,
        "dropout": dropout,
        "use_rslora": use_rslora,
        **({"use_dora": True} if use_dora else {}),
        **({"init_lora_weights": init_lora_weights} if init_lora_weights is not True else {}),
    }
    if targets == [ALL_LINEAR]:
        adapt = [
            {"match": "lm_head", "action": "freeze"},
            {"type": "linear", "match": "*", "action": "adapt", "lora": lora},
            {"type": "conv1d", "match": "*", "action": "adapt", "optional": True, "lora": lora},
        ]
    elif ALL_LINEAR in targets:
        raise RuleFileError(f"--target-modules: {ALL_LINEAR} stands alone (it already names every linear layer)")
    else:
        adapt = [{"match": t, "action": "adapt", "lora": lora} for t in targets]
        adapt.append({"match": "lm_head", "action": "freeze", "optional": True})
    quantized = [{"type": kind, "match": "*", "action": "quantize", "optional": True} for kind in ("linear", "conv1d")]
    flags = f"--target-modules {','.join(targets)} --lora-r {r} --lora-alpha {lora['alpha']:g}"
    flags += f" --lora-dropout {dropout:g}{' --use-rslora' if use_rslora else ''}{' --use-dora' if use_dora else ''}"
    flags += f"{'' if init_lora_weights is True else f' --init-lora-weights {init_lora_weights}'} --quantize {quantize}"
    data = {
        "version": 1,
        "description": f"from the command line: {flags}",
        "quantize": quantize,
        "default": "freeze",
        "rules": adapt + (quantized if quantize != "none" else []),
    }
    return parse_rules(
        data, source="--target-modules/--lora-r/--lora-alpha/--lora-dropout/--init-lora-weights/--quantize"
    )
