"""What every command shares: consoles, options, the one error handler, the warning filter, model lookup."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup
from typer.exceptions import TyperException

from surgery.devices import DeviceConfig
from surgery.options import options_of

from .options import typer_option

# markup off: messages carry paths, module names and install hints such as "pip install 'model-surgery[plot]'",
# which rich markup would swallow; styles are given explicitly (say, rich Text)
console = Console(width=None if sys.stdout.isatty() else 160, markup=False)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160, markup=False)


def say(*parts: str | tuple[str, str], out: Console | None = None) -> None:
    """Print one message as it is written (never as markup); a part given as (text, style) is styled."""
    (out or console).print(Text.assemble(*parts), highlight=False, soft_wrap=True)


RULES_ARG = typer.Argument(..., help="Rule file path or bundled name (see `surgery rules list`).")
MODEL_OPT = typer.Option(
    None, "--model", "-m", help="Model (default: the rule file's `model:`, else the bundled tiny default)."
)
ADAPTER_ARG = typer.Argument(..., help="Adapter file written by surgery (apply --out, train, import-peft).")
BASE_OPT = typer.Option(None, "--model", "-m", help="Base model (default: the base named in the adapter file).")
RANDOM_INIT_OPT = typer.Option(False, "--random-init", help="Build random weights when none are available.")
TOKENIZER_OPT = typer.Option(None, "--tokenizer", help="Tokenizer folder or model (default: the model's own).")
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out folder.")
NO_CACHE_OPT = typer.Option(
    False,
    "--no-cache",
    help="Trace the model again instead of reading the trace cache "
    "($SURGERY_CACHE, else $XDG_CACHE_HOME/surgery, else ~/.cache/surgery).",
)
DEVICE_OPT = typer_option(next(o for o in options_of(DeviceConfig) if o.name == "device"))  # --device alone
NOISY_LIBRARIES = ("transformers", "torch", "bitsandbytes", "peft", "accelerate", "huggingface_hub", "kernels")


class Commands(TyperGroup):
    """The command group: every command of the app (sub-groups included) runs through ``invoke``'s one handler."""

    def invoke(self, ctx):
        from surgery.errors import SurgeryError

        try:
            return super().invoke(ctx)
        except SurgeryError as exc:
            say(("error: ", "bold red"), str(exc), out=err_console)
            raise typer.Exit(2) from None
        except OSError as exc:  # a path the user gave that the library did not wrap: still one line
            where = f"{exc.filename}: " if exc.filename else ""
            say(("error: ", "bold red"), f"{where}{exc.strerror or exc}", out=err_console)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, TyperException, KeyboardInterrupt):
            raise
        except Exception:
            say(
                ("internal error", "bold red"),
                " (a bug in surgery, not in what you typed): please report it with the command you ran and the "
                "traceback below",
                out=err_console,
            )
            raise


def quiet_libraries() -> None:
    """Silence third-party chatter by module (surgery's own warnings still show); never touch the network.

    transformers is not imported for it (commands that never build a model never pay for it): its
    verbosity and progress bars follow these variables when it is imported later.
    """
    for variable, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
        ("DATASETS_VERBOSITY", "error"),
    ):
        os.environ.setdefault(variable, value)
    for module in NOISY_LIBRARIES:
        warnings.filterwarnings("ignore", module=module + r"(\.|$)")
        logging.getLogger(module).setLevel(logging.ERROR)
    from surgery.layers.notices import NOTICES, OnceEach  # torch-free

    for name, prefixes in NOTICES.items():
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, OnceEach) for f in logger.filters):
            logger.addFilter(OnceEach(prefixes, label="bitsandbytes: "))
    if "transformers" in sys.modules:  # already imported: its logging read the variables before they were set
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


def model_for(rules, model: str | None) -> tuple[str, str]:
    """The model to use: --model, else the rule file's `model:`, else the bundled tiny default."""
    from surgery.model.architectures import TINY_DEFAULT

    if model:
        return model, "--model"
    if rules.model:
        return rules.model, f"`model:` of {rules.source}"
    return TINY_DEFAULT, "the bundled tiny default (no --model and no `model:` in the rule file)"


def finetune_from(adapter: Path, model: str | None, random_init: bool, where: dict | None = None):
    """Load the base (from --model or the file's metadata), quantized for the adapter's rules as it loads, on the
    device asked for, and the adapter onto it."""
    from surgery.base.loading import load_model
    from surgery.files.adapter_file import read_adapter
    from surgery.finetune.loading import load_adapter

    info = read_adapter(adapter)
    name = model or info.base_model
    if not name:
        raise typer.BadParameter("the adapter file names no base model; pass --model")
    base = load_model(name, random_init=random_init, rules=info.rules, **(where or {})).model
    return base, load_adapter(base, info), name


def probe_inputs(model) -> dict:
    """Fixed token ids (seeded on the CPU, so the same everywhere) on the device of the model's input embedding."""
    import torch

    from surgery.devices import input_device

    vocab = getattr(getattr(model, "config", None), "vocab_size", 256)
    ids = torch.randint(0, min(vocab, 256), (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(input_device(model))}
