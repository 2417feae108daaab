"""Every fenced Python and shell block of README.md and docs/*.md runs as written, or is checked for syntax.

Python blocks run page by page, each page's blocks in order in one namespace, in a temporary folder, with surgery's
warnings as errors; what their comments claim is asserted for the pages that claim something. Shell blocks run their
``surgery`` lines in process. A block marked ``<!-- no-run: why -->`` on the line before it (a GPU, your own model,
minutes of training) is compiled (Python) or checked with ``bash -n`` (shell), and each ``surgery`` command in it
must name a real subcommand with options it has.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import torch
import typer
from typer.testing import CliRunner

from surgery.errors import SurgeryWarning
from surgery_cli.app import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
FENCE = re.compile(r"(?:<!-- no-run: (?P<why>[^>]*?) -->\n)?```(?P<lang>python|bash)\n(?P<code>.*?)```", re.S)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    why_not: str | None

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The Python and shell blocks of a page, in order."""
    text = page.read_text()
    return [
        Block(page, text.count("\n", 0, m.start("code")), m["lang"], m["code"], m["why"]) for m in FENCE.finditer(text)
    ]


ALL = [b for page in PAGES for b in blocks(page)]


def run_python(page: str, tmp_path: Path, monkeypatch) -> dict:
    """Run a page's runnable Python blocks in order in one namespace, in a temporary folder."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT and transformers chatter
        warnings.simplefilter("error", SurgeryWarning)  # e.g. a SharedBaseWarning means the example is wrong
        for block in blocks(ROOT / page):
            if block.lang == "python" and block.why_not is None:
                exec(compile(block.code, str(block), "exec"), scope)
    return scope


def commands(code: str) -> list[list[str]]:
    """The ``surgery`` command lines of a shell block as argument lists (continuations joined, comments dropped)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line.replace("$(which surgery)", "surgery"), comments=True)
        for i, word in enumerate(words):
            if word in ("surgery", "surgery_cli.app"):
                out.append(words[i + 1 :])
                break
    return out


def parse(argv: list[str]) -> None:
    """Parse a command line against the CLI's click commands: the subcommand and every option must exist."""
    command: click.Command = typer.main.get_command(app)
    name = "surgery"
    while isinstance(command, click.Group) and argv and argv[0] in command.commands:
        name, command, argv = argv[0], command.commands[argv[0]], argv[1:]
    assert not isinstance(command, click.Group) or "--help" in argv, f"no such subcommand in {name} {argv}"
    command.make_context(name, list(argv), resilient_parsing=True)


def test_blocks_are_found_and_every_page_with_python_is_run_here():
    pages = {b.page.name for b in ALL if b.lang == "python" and b.why_not is None}
    assert pages == set(PYTHON_PAGES)
    assert sum(p.read_text().count("```python") for p in PAGES) == sum(b.lang == "python" for b in ALL)


@pytest.mark.parametrize("block", [b for b in ALL if b.why_not is not None], ids=str)
def test_a_block_that_does_not_run_here_is_still_valid(block, tmp_path):
    assert block.why_not.strip(), f"{block}: say why it does not run"
    if block.lang == "python":
        compile(block.code, str(block), "exec")
        return
    script = tmp_path / "block.sh"
    script.write_text(block.code)
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, f"{block}: {checked.stderr}"
    for argv in commands(block.code):
        parse(argv)


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "bash" and b.why_not is None], ids=str)
def test_a_shell_block_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = commands(block.code)
    assert lines and len(lines) == len([x for x in block.code.splitlines() if x.strip()]), f"{block}: only surgery"
    for argv in lines:
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, f"{block}: surgery {' '.join(argv)}\n{result.output}"


# ------------------------------------------------------------------------------------ pages whose Python runs


def check_readme(scope: dict) -> None:
    model, ft1, ft2, ft, again = (scope[k] for k in ("model", "ft1", "ft2", "ft", "again"))
    fc1 = model.model.decoder.layers[0].fc1
    assert type(fc1).__name__ == "Linear8bitLt"
    for each in (ft1, ft2):  # the same int8 base under both (all_linear_lora adapts fc1 over it)
        layer = each.model.decoder.layers[0].fc1
        assert getattr(layer, "base_layer", layer).weight is fc1.weight
    assert scope["plan"].ok and scope["runs"][0].step == 20
    with torch.no_grad():
        assert torch.equal(again.eval()(IDS).logits, ft(IDS).logits)  # "same logits, bit for bit"
    assert Path("runs/caps/adapter.safetensors").is_file() and Path("caps-peft/adapter_config.json").is_file()


def check_getting_started(scope: dict) -> None:
    assert scope["plan"].ok and isinstance(scope["report"], dict)
    fc1 = scope["model"].model.decoder.layers[0].fc1
    assert scope["ft2"].model.decoder.layers[0].fc1.base_layer.weight is fc1.weight  # one int8 base under both
    assert scope["opt"].param_groups[0]["params"] and scope["built_from"] is not None


def check_rule_files(scope: dict) -> None:
    page = (ROOT / "docs/rule-files.md").read_text()
    shown = re.search(r"prints both violations.*?```text\n(.*?)```", page, re.S)[1]
    assert scope["message"] == shown.strip()  # the page shows the message as it is


def check_training(scope: dict) -> None:
    run = scope["run"]
    assert run.step == 8 and Path("runs/up/adapter.safetensors").is_file()
    assert "--batch-size" in scope["refused"]


def check_many_finetunes(scope: dict) -> None:
    ft1, ft2, ids = scope["ft1"], scope["ft2"], scope["ids"]
    assert [run.step for run in scope["runs"]] == [10, 10]
    assert len(scope["answers"]) == 3 and all(len(a) == 2 for a in scope["answers"])
    with torch.no_grad():
        for rows, each in ((slice(0, 4), ft1), (slice(4, 8), ft2)):
            alone = each.eval()(input_ids=ids[rows]).logits
            assert (scope["logits"][rows] - alone).abs().max() <= 1e-5 * alone.abs().max()
        assert scope["new_ids"][0, -1] == 260 and scope["new_logits"].shape[-1] == 262
        assert scope["sibling"](input_ids=ids[:1]).logits.shape[-1] == 260


def check_adapters(scope: dict) -> None:
    pytest.importorskip("peft")
    ft1, ft3, ft4 = scope["ft1"], scope["ft3"], scope["ft4"]
    with torch.no_grad():
        assert torch.equal(scope["logits"], ft1(scope["input_ids"]).logits)  # the exported program, bit for bit
        for each in (ft3, ft4):
            assert torch.equal(each(IDS).logits, ft1(IDS).logits)
        expected = scope["ft"].eval()(IDS).logits  # Trainer leaves it in train mode (dropout)
        for model in (scope["twin"], scope["again"]):  # int8 bases quantized alike: bit for bit
            assert torch.equal(model.eval()(IDS).logits, expected)
    assert Path("merged/config.json").is_file() and Path("ft1/adapter_config.json").is_file()
    assert Path("runs/trainer/adapter.safetensors").is_file()
    assert not Path("runs/trainer/config.json").exists()  # never the base model
    assert Path("runs/qv-vllm/adapter_config.json").is_file()


def check_finetuna(scope: dict) -> None:
    assert type(scope["base"].model.decoder.layers[0].fc1).__name__ == "Linear8bitLt"
    assert any(p.requires_grad for p in scope["ft"].parameters())


PYTHON_PAGES = {
    "README.md": check_readme,
    "getting-started.md": check_getting_started,
    "rule-files.md": check_rule_files,
    "training.md": check_training,
    "many-finetunes.md": check_many_finetunes,
    "adapters.md": check_adapters,
    "finetuna.md": check_finetuna,
}


@pytest.mark.parametrize("page", list(PYTHON_PAGES))
def test_a_pages_python_runs_and_does_what_it_says(page, tmp_path, monkeypatch):
    path = "README.md" if page == "README.md" else f"docs/{page}"
    scope = run_python(path, tmp_path, monkeypatch)
    PYTHON_PAGES[page](scope)
