import json
import os

import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery_cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_inspect_opt_1_3b_offline_json():
    result = run("inspect", "facebook/opt-1.3b", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["parameters"] == 1_315_758_080 and data["layers"] == 24
    assert data["tied"] == [["model.decoder.embed_tokens.weight", "lm_head.weight"]]
    assert data["trace"] == "export" and "q_proj" in data["adaptable"]
    assert data["memory"]["float16"] == 2 * 1_315_758_080


def test_inspect_table_collapses_repeated_blocks():
    result = run("inspect", "tiny-llama", "--modules", "self_attn.*")
    assert result.exit_code == 0, result.output
    assert "model.layers.*.self_attn.q_proj" in result.stdout and "adaptable modules" in result.stdout
    assert "model.layers.0.self_attn.q_proj" not in result.stdout


def test_plan_without_model_names_the_default():
    result = run("plan", "qv_lora", "--finetunes", "4")
    assert result.exit_code == 0, result.output
    assert "tiny-opt" in result.stdout and "bundled tiny default" in result.stdout
    assert "base + 4 fine-tunes" in result.stdout


def test_plan_json_on_a_bundled_config():
    result = run("plan", "qlora_nf4", "--model", "meta-llama/Llama-3.1-8B", "-n", "8", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and data["memory"]["total_bytes"] < data["memory"]["full_copies_bytes"]


def test_plan_uses_the_rule_files_model_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: tiny-gpt2\nquantize: int8\nrules:\n  - match: c_attn\n    action: adapt\n")
    result = run("plan", str(path))
    assert result.exit_code == 0, result.output
    assert "tiny-gpt2" in result.stdout and "`model:`" in result.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (("plan", "no_such_rules"), "no such rule file"),
        (("inspect", "facebook/opt-13b"), "Did you mean"),
        (("plan", "{path}"), "duplicate key"),
        (("plan", "{c4}"), "matched no module"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, args, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - match: q\n    match: k\n")
    c4 = tmp_path / "c4.yaml"
    c4.write_text("rules:\n  - match: q_projj\n    action: adapt\n")
    args = [a.format(path=bad, c4=c4) for a in args]
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_rules_list_shows_bundled_files():
    for args in (("rules", "list"), ("rules",)):  # bare `surgery rules` lists too
        result = run(*args)
        assert result.exit_code == 0
        for name in ("qv_lora", "all_linear_lora", "qlora_nf4", "finetuna_default", "full_finetune"):
            assert name in result.stdout


def _commands(group: TyperGroup, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf command of the app, found by walking its click groups (not a hand-written list)."""
    out = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        out += _commands(command, path) if isinstance(command, TyperGroup) else [path]
    return out


def test_every_command_has_help_with_an_example():
    commands = _commands(typer.main.get_command(app))
    assert len(commands) >= 13, (
        commands
    )  # demo, models, inspect, plan, apply, rules x2, adapter show, merge, export/import, ...
    for cmd in commands:
        result = run(*cmd, "--help")
        assert result.exit_code == 0 and f"Example: surgery {' '.join(cmd)}" in result.stdout, cmd


def test_loss_curve_png_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    result = run(
        "train",
        "qv_lora_head",
        "--model",
        "tiny-llama",
        "--data",
        "upper",
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "3",
        "--block-size",
        "24",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_apply_as_typed_measures_what_it_planned():
    result = run("apply", "rules/qv_lora.yaml", "--finetunes", "3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "tiny-opt" in out and "bundled tiny default" in out
    assert "equal (3/3 bit-identical)" in out
    # every measured row equals the planned one
    for label in ("base, quantized and shared", "fine-tune 1 (own tensors)", "base + 3 fine-tunes"):
        row = next(line for line in out.splitlines() if label in line)
        cells = [c.strip() for c in row.split("│") if c.strip()]
        assert cells[1] == cells[2], row


def test_apply_without_weights_names_random_init():
    result = run("apply", "qv_lora", "--model", "facebook/opt-125m")
    assert result.exit_code == 2 and "--random-init" in result.output


def test_adapter_files_through_the_cli_apply_show_merge_export_import(tmp_path):
    """apply --out writes adapter files; show, merge, export-peft and import-peft read them back."""
    import torch
    import transformers

    import surgery

    out = tmp_path / "runs" / "qv.safetensors"
    result = run("apply", "qv_lora", "--model", "tiny-llama", "-n", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    first, second = tmp_path / "runs" / "qv-1.safetensors", tmp_path / "runs" / "qv-2.safetensors"
    assert first.exists() and second.exists()

    result = run("adapter", "show", str(first))
    assert result.exit_code == 0, result.output
    assert "tiny-llama" in result.stdout and "LlamaForCausalLM" in result.stdout
    assert "model.layers.0.self_attn.q_proj.lora_A" in result.stdout and "8 tensors" in result.stdout

    result = run("merge", str(first), "--out", str(tmp_path / "merged"), "--report-requantized")
    assert result.exit_code == 0, result.output
    assert "merged vs fine-tune" in result.stdout and "requantized vs merged" in result.stdout
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    expected = surgery.merge(surgery.load_adapter(tiny_model("tiny-llama"), first))
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, expected(ids).logits)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")  # the folder is complete
    assert tokenizer("owl")["input_ids"] == tiny_tokenizer()("owl")["input_ids"]
    assert (tmp_path / "merged" / "generation_config.json").is_file()
    mask = os.umask(0)
    os.umask(mask)
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "merged").iterdir()} == {0o666 & ~mask}  # none 0600
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "no quantization_config" in card and "trained on tiny-llama with 14 modules stored as int8" in card
    assert "load_in_8bit=True" in result.stdout and "llm_int8_skip_modules=['lm_head']" in result.stdout
    again = run("merge", str(first), "--out", str(tmp_path / "merged"))
    assert again.exit_code == 2 and "not empty" in again.output
    assert "note: requantizing" not in result.stdout  # int8: about 1 % on tiny-llama
    nf4 = tmp_path / "nf4.safetensors"
    trained = surgery.rewrite(tiny_model("tiny-llama"), "qlora_nf4")
    with torch.no_grad():  # a trained-looking adapter (a new one has B = 0 and merges to the base itself)
        for tensor in surgery.base.ownership.own_state(trained).values():
            tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    surgery.save_adapter(trained, nf4)
    result = run("merge", str(nf4), "--out", str(tmp_path / "merged-nf4"), "--report-requantized")
    assert result.exit_code == 0 and "note: requantizing moves the logits by" in result.stdout, result.output

    result = run("export-peft", str(first), "--out", str(tmp_path / "peft"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    assert "BitsAndBytesConfig(load_in_8bit=True" in result.stdout
    assert "BitsAndBytesConfig(load_in_8bit=True" in (tmp_path / "peft" / "README.md").read_text()
    result = run(
        "import-peft", str(tmp_path / "peft"), "--out", str(tmp_path / "back.safetensors"), "--quantize", "int8"
    )
    assert result.exit_code == 0, result.output
    back = surgery.read_adapter(tmp_path / "back.safetensors")
    original = surgery.read_adapter(first)
    assert back.tensors.keys() == original.tensors.keys()
    assert all(torch.equal(back.tensors[k], original.tensors[k]) for k in back.tensors)


def test_a_bad_adapter_file_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04garbage")
    for args in (("adapter", "show", str(bad)), ("merge", str(bad), "--out", str(tmp_path / "m"))):
        result = run(*args)
        assert result.exit_code == 2 and "never unpickles" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()


def test_lora_shorthand_flags_train_and_record_the_rule_file_they_stand_for(tmp_path):
    import torch
    import yaml

    import surgery

    common = ["--model", "tiny-llama", "--data", "upper", "--max-steps", "3", "--lr", "1e-2"]
    result = run(
        "train",
        "--target-modules",
        "q_proj,v_proj",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--quantize",
        "nf4",
        *common,
        "--out",
        str(tmp_path / "a"),
    )
    assert result.exit_code == 0, result.output
    recorded = tmp_path / "a" / "rules.yaml"
    assert "rules.yaml" in result.stdout
    first = surgery.read_adapter(tmp_path / "a" / "adapter.safetensors")
    plan = first.rules
    assert plan.quantize.scheme == "nf4" and {r.lora.r for r in plan.rules if r.lora} == {4}
    assert yaml.safe_load(recorded.read_text()) == plan.to_dict()
    # the recorded file trains the same fine-tune again, bit for bit
    result = run("train", str(recorded), *common, "--out", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    again = surgery.read_adapter(tmp_path / "b" / "adapter.safetensors")
    assert again.tensors.keys() == first.tensors.keys()
    assert all(torch.equal(again.tensors[k], first.tensors[k]) for k in first.tensors)
    adapted = [k for k in first.tensors if "lora_A" in k]
    assert len(adapted) == 4 and all("q_proj" in k or "v_proj" in k for k in adapted)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora-r", "4", "--data", "upper"], "--lora-r belongs with --target-modules"),
        (["qv_lora", "--target-modules", "q_proj", "--data", "upper"], "--target-modules replaces RULES"),
        (["--target-modules", "q_proj,all-linear", "--data", "upper"], "all-linear stands alone"),
        (["--target-modules", "q_proj", "--quantize", "int3", "--data", "upper"], "int3"),
        (
            ["--target-modules", "q_proj", "--init-lora-weights", "pissa", "--data", "upper"],
            "init_lora_weights 'pissa' is not supported",
        ),
        (["--init-lora-weights", "gaussian", "--data", "upper"], "--init-lora-weights belongs with --target-modules"),
        (
            ["--target-modules", "q_proj", "--init-lora-weights", "loftq", "--data", "upper"],
            "with init_lora_weights: loftq, which starts the adapter from the base's quantization error, "
            "but the base keeps",
        ),
    ],
)
def test_lora_shorthand_mistakes_are_one_clear_error(tmp_path, args, message):
    result = run("train", *args, "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "o").exists()


def test_chat_template_training_and_generation_through_the_cli(tmp_path):
    """train --chat-template on a tiny model whose tokenizer has a template; generate --chat-template answers
    as transformers' own generate does on the prompt the template writes."""
    import torch
    from test_train import CHAT_TEMPLATE

    import surgery

    folder = tmp_path / "tiny-chat"
    tiny_model("tiny-llama").save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    result = run(
        "train",
        "qv_lora_head",
        "--model",
        str(folder),
        "--data",
        "upper",
        "--chat-template",
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "40",
        "--lr",
        "1e-2",
        "--block-size",
        "48",
    )
    assert result.exit_code == 0, result.output
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0]
    adapter = tmp_path / "run" / "adapter.safetensors"
    prompts = tmp_path / "ask.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "owl ->"}]}) + "\n")
    result = run("generate", "--prompts", str(prompts), "--adapter", str(adapter), "-n", "12")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["prompt"] == "owl ->"
    ft = surgery.load_adapter(surgery.load_model(str(folder)).model, adapter).eval()
    ids = tokenizer("<user>owl -></user>\n<assistant>", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = ft.generate(
            input_ids=ids,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    assert answer["answer"] == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    result = run("generate", "owl ->", "--chat-template", "--adapter", str(adapter), "-n", "12")
    assert result.exit_code == 0 and answer["answer"].strip()[:3] in result.stdout, result.output


def test_bitsandbytes_warnings_about_the_run_show_once_and_its_noise_not_at_all(caplog):
    import logging

    import torch

    import surgery
    from surgery.layers import notices
    from surgery.layers.notices import NOTICES, OnceEach
    from surgery_cli.common import quiet_libraries

    notices._ONCE.seen.clear()  # fresh filters: earlier calls in this process may have shown it
    for name in NOTICES:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, OnceEach)]:
            logger.removeFilter(f)
    quiet_libraries()
    ft = surgery.rewrite(tiny_model("tiny-llama"), "qv_lora")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            ft(input_ids=torch.tensor([[1, 2, 3]]))
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
    said = [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")]
    assert said == ["bitsandbytes: MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization"]


def test_use_rslora_shorthand_trains_a_rank_stabilized_lora_and_exports_it_to_peft(tmp_path):
    import surgery

    result = run(
        "train",
        "--target-modules",
        "q_proj",
        "--lora-r",
        "16",
        "--lora-alpha",
        "8",
        "--use-rslora",
        "--model",
        "tiny-llama",
        "--data",
        "upper",
        "--max-steps",
        "2",
        "--out",
        str(tmp_path / "run"),
    )
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "run" / "adapter.safetensors"
    assert {r.lora.scaling for r in surgery.read_adapter(adapter).rules.rules if r.lora} == {8 / 4}
    assert "--use-rslora" in (tmp_path / "run" / "rules.yaml").read_text()
    result = run("export-peft", str(adapter), "--out", str(tmp_path / "peft"))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 16 and config["lora_alpha"] == 8
    assert run("train", "qv_lora", "--use-rslora", "--data", "upper").exit_code == 2  # only with --target-modules


def test_shorthand_init_and_dora_flags_stand_for_their_rule_keys():
    from surgery.rules.shorthand import shorthand_rules

    rules = shorthand_rules(["q_proj"], init_lora_weights="gaussian", use_dora=True)
    lora = rules.rules[0].lora
    assert lora.init_lora_weights == "gaussian" and lora.use_dora
    assert "--use-dora" in rules.description and "--init-lora-weights gaussian" in rules.description
    assert (
        shorthand_rules(["q_proj"]).rules[0].lora == shorthand_rules(["q_proj"], init_lora_weights=True).rules[0].lora
    )


def test_generate_with_adapters_of_differently_quantized_bases_says_the_one_thing_wrong(tmp_path):
    import surgery

    paths = []
    for rules in ("qv_lora", "qlora_nf4"):  # an int8 base and an nf4 base of the same model
        paths.append(tmp_path / f"{rules}.safetensors")
        surgery.save_adapter(surgery.rewrite(tiny_model("tiny-opt"), rules), paths[-1])
    result = run("generate", "hi", "-a", str(paths[0]), "-a", str(paths[1]), "-n", "2")
    assert result.exit_code == 2 and "Traceback" not in result.output
    error = result.output[result.output.index("error: ") :]
    first_line = error.splitlines()[0]
    assert "disagree on how the base is stored" in first_line and "separate bases" in first_line
    assert "qv_lora.safetensors" in first_line and "qlora_nf4.safetensors" in first_line


def test_generate_reads_a_peft_folder_as_it_is_and_answers_as_the_adapter_it_came_from(tmp_path):
    import torch

    import surgery

    ft = surgery.rewrite(tiny_model("tiny-llama"), "qlora_nf4")
    with torch.no_grad():  # a trained-looking adapter (B = 0 would answer as the base)
        for tensor in surgery.base.ownership.own_state(ft).values():
            tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    file, folder = tmp_path / "a.safetensors", tmp_path / "a-peft"
    surgery.save_adapter(ft, file)
    surgery.export_peft(ft, folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of Peru is\nowl ->\n")
    result = run("generate", "--prompts", str(prompts), "-a", str(folder), "-a", str(file), "--base", "-n", "6")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    by_model = {m: [r["answer"] for r in rows if r["model"] == m] for m in (str(folder), str(file), "base")}
    assert by_model[str(folder)] == by_model[str(file)] and len(by_model[str(file)]) == 2
    assert by_model[str(file)] != by_model["base"]  # the adapter changes the answers: the comparison means something
    alone = run("generate", "--prompts", str(prompts), "-a", str(folder), "-n", "6")  # its base stored as trained
    assert alone.exit_code == 0, alone.output
    assert [json.loads(line)["answer"] for line in alone.stdout.splitlines() if line.startswith("{")] == by_model[
        str(file)
    ]


def test_merge_and_export_refuse_a_full_out_folder_before_the_model_loads(tmp_path):
    import surgery

    file = tmp_path / "a.safetensors"
    surgery.save_adapter(surgery.rewrite(tiny_model("tiny-opt"), "qv_lora"), file)
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep me")
    for command in ("merge", "export-peft"):  # a model that cannot load: the folder is refused first
        result = run(command, str(file), "--model", str(tmp_path / "no-such-model"), "--out", str(full))
        assert result.exit_code == 2 and "exists and is not empty" in result.output, result.output
    assert [p.name for p in full.iterdir()] == ["mine.txt"]


def test_text_rows_under_a_chat_template_are_refused_before_the_model_is_even_looked_up(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "hello there"}) + "\n")
    result = run(
        "train", "qv_lora", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--chat-template",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.exit_code == 2 and f"{data}:1: a `text` row has no roles for a chat template" in result.output
    assert not (tmp_path / "out").exists()


def test_a_block_size_above_the_model_s_positions_is_refused_from_its_config_before_loading(tmp_path):
    from surgery.model.architectures import TINY_MODELS

    folder = tmp_path / "model"  # a config and no weights: loading it would fail, the check comes first
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_MODELS["tiny-llama"]))
    result = run(
        "train", "qv_lora", "--model", str(folder), "--data", "upper", "--block-size", "300", "-o", str(tmp_path / "o")
    )
    assert result.exit_code == 2, result.output
    assert "--block-size 300 is above" in result.output and "maximum sequence length (256)" in result.output
