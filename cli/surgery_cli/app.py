"""The `surgery` command: a Typer app whose commands are thin layers over the library.

Commands live in modules by noun (models and rule files, adapter files, training, the demo); this
module builds the app and registers them. Every user error ends as one line and exit status 2
(``common.Commands``).
"""

from __future__ import annotations

import sys

import typer

from . import adapter_cmds, demo, generate_cmd, model_cmds, plan_cmd, train_cmds
from .common import Commands

app = typer.Typer(
    help="Rule-driven model surgery for HuggingFace models: one quantized base, many fine-tunes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Commands,
)
rules_app = typer.Typer(help="Bundled rule files (bare `surgery rules` lists them).")
adapter_app = typer.Typer(help="Adapter files (safetensors written by surgery).", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
app.add_typer(adapter_app, name="adapter")

app.command()(demo.demo)
app.command("models")(model_cmds.models_cmd)
app.command()(model_cmds.inspect)
app.command()(plan_cmd.plan)
app.command()(model_cmds.apply)
rules_app.command("list")(model_cmds.rules_list)


@rules_app.callback(invoke_without_command=True)
def rules(ctx: typer.Context) -> None:
    """Bundled rule files: `surgery rules` (or `rules list`) lists them, `surgery rules show NAME` prints one."""
    if ctx.invoked_subcommand is None:
        model_cmds.rules_list()


rules_app.command("show")(model_cmds.rules_show)
adapter_app.command("show")(adapter_cmds.adapter_show)
app.command()(adapter_cmds.merge)
app.command("export-peft")(adapter_cmds.export_peft_cmd)
app.command("import-peft")(adapter_cmds.import_peft_cmd)
app.command()(train_cmds.train)
app.command()(generate_cmd.generate)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
