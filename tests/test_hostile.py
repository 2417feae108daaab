"""A hostile sweep of the surfaces that landed since the last one: adapter folders and PEFT folders from the
internet, --overwrite and --resume pointed at the wrong folder, and a config that claims more than memory holds.
Each attack gets one clear error that names the file or field and the fix, and changes nothing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery.base.tiny import tiny_model
from surgery.errors import AdapterStateError, ModelConfigError
from surgery_cli.app import app


@pytest.fixture(scope="module")
def base():
    return tiny_model("tiny-llama")


def trained_finetune(base, seed: int):
    ft = surgery.rewrite(base, "qv_lora")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return ft


@pytest.fixture()
def folder(base, tmp_path):
    trained_finetune(base, 1).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,what",
    [({"r": 64}, "r"), ({"lora_alpha": 3.0}, "lora_alpha"), ({"target_modules": ["k_proj"]}, "target_modules")],
)
def test_an_adapter_folder_whose_peft_config_disagrees_with_its_weights_is_refused(base, folder, changes, what):
    edit_config(folder, **changes)
    with pytest.raises(AdapterStateError, match=f"PEFT layout.*differ in {what}.*mixes two adapters"):
        surgery.load_adapter(base, folder)


def test_an_adapter_folder_whose_two_weight_files_disagree_is_refused(base, folder, tmp_path):
    trained_finetune(base, 2).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    with pytest.raises(AdapterStateError, match="adapter_model.safetensors' tensors.*save it again"):
        surgery.load_adapter(base, folder)


def test_links_out_of_an_adapter_folder_and_link_loops_are_refused(base, folder, tmp_path):
    secret = tmp_path / "secret.safetensors"
    shutil.copy(folder / "adapter.safetensors", secret)  # a valid file, but outside the folder
    (folder / "adapter.safetensors").unlink()
    os.symlink(secret, folder / "adapter.safetensors")
    with pytest.raises(AdapterStateError, match="is a link to .*secret.safetensors, outside its folder"):
        surgery.load_adapter(base, folder)
    (folder / "adapter.safetensors").unlink()
    os.symlink(folder / "adapter.safetensors", folder / "adapter.safetensors")
    with pytest.raises(AdapterStateError, match="a link that leads nowhere"):
        surgery.load_adapter(base, folder)


def test_a_peft_folder_naming_modules_the_base_lacks_or_a_huge_alpha_is_refused(base, tmp_path):
    ft = trained_finetune(base, 1)
    for changes, message in (
        ({"modules_to_save": ["not_a_module"]}, "modules_to_save names 'not_a_module'"),
        ({"lora_alpha": 1e300}, "alpha 1e\\+300 is beyond"),
        ({"lora_alpha": float("nan")}, "alpha must be a finite number"),
    ):
        target = tmp_path / f"peft-{len(os.listdir(tmp_path))}"
        surgery.export_peft(ft, target)
        edit_config(target, **changes)
        before = {n: t.clone() for n, t in base.state_dict().items()}
        with pytest.raises(AdapterStateError, match=message):
            surgery.import_peft(base, target)
        assert all(torch.equal(before[n], t) for n, t in base.state_dict().items())


def test_overwrite_never_moves_a_folder_of_the_users_own_files(tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("my work")
    done = CliRunner().invoke(
        app,
        [
            "train",
            "qv_lora",
            "--model",
            "tiny-llama",
            "--data",
            "upper",
            "--max-steps",
            "1",
            "--out",
            str(mine),
            "--overwrite",
        ],
    )
    assert (
        done.exit_code == 2 and "not a surgery run (chapter1.tex)" in done.output and "nothing was moved" in done.output
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"] and os.listdir(mine) == ["chapter1.tex"]


def test_resume_takes_the_earlier_runs_folder_and_refuses_another_model_or_rules(tmp_path):
    runner = CliRunner()
    first = runner.invoke(
        app,
        [
            "train",
            "qv_lora",
            "--model",
            "tiny-llama",
            "--data",
            "upper",
            "--max-steps",
            "2",
            "--save-steps",
            "1",
            "--out",
            str(tmp_path / "first"),
        ],
    )
    assert first.exit_code == 0, first.output
    for args, differs in (
        (["qv_lora", "--model", "tiny-opt"], "model"),
        (["all_linear_lora", "--model", "tiny-llama"], "rules"),
    ):
        done = runner.invoke(
            app,
            [
                "train",
                *args,
                "--data",
                "upper",
                "--max-steps",
                "3",
                "--out",
                str(tmp_path / f"again-{differs}"),
                "--resume",
                str(tmp_path / "first"),
            ],
        )
        assert done.exit_code == 2 and f"a checkpoint of another run (differs in: {differs})" in done.output
        assert not (tmp_path / f"again-{differs}" / "adapter.safetensors").exists()
    same = runner.invoke(
        app,
        [
            "train",
            "qv_lora",
            "--model",
            "tiny-llama",
            "--data",
            "upper",
            "--max-steps",
            "3",
            "--out",
            str(tmp_path / "continued"),
            "--resume",
            str(tmp_path / "first"),
        ],
    )
    assert same.exit_code == 0, same.output  # the earlier run's folder is where --resume looks
    assert f"resuming qv_lora from {tmp_path / 'first' / 'checkpoint-'}" in " ".join(same.output.split())


def test_random_init_of_a_config_bigger_than_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    import surgery.base.loading as loading
    import surgery.base.tiny as tiny  # the memory guard of --random-init

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 8192,
                "intermediate_size": 28672,
                "num_hidden_layers": 80,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
            }
        )
    )
    monkeypatch.setattr(tiny, "_available_memory", lambda: 8 * 2**30)
    with pytest.raises(ModelConfigError, match=r"would build 262.8 GiB of weights.*8.0 GiB is available"):
        loading.load_model(str(tmp_path / "m"), random_init=True)
    done = CliRunner().invoke(app, ["demo", "--model", str(tmp_path / "m"), "--random-init", "--steps", "1"])
    assert done.exit_code == 2 and "would build" in done.output


def test_a_trace_cache_path_that_is_a_file_gives_the_same_answer_as_no_cache(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("not a folder")
    runner = CliRunner()
    fresh = runner.invoke(app, ["plan", "qv_lora", "--model", "tiny-llama", "--json", "--no-cache"])
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    cached = runner.invoke(app, ["plan", "qv_lora", "--model", "tiny-llama", "--json"])
    assert cached.exit_code == fresh.exit_code == 0, cached.output
    assert json.loads(cached.stdout) == json.loads(fresh.stdout)
    assert (tmp_path / "cache").read_text() == "not a folder"  # nothing written over it
