"""ft.save_pretrained: an adapter folder (PEFT layout + surgery's file + model card), and Trainer on top of it."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from test_state import logits, trained
from typer.testing import CliRunner

import surgery
from surgery import AdapterStateError
from surgery.base.ownership import own_state
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery_cli.app import app

peft = pytest.importorskip("peft")
runner = CliRunner()
WITH_PLAIN = {
    "quantize": "none",
    "default": "freeze",
    "rules": [
        {"match": "*", "type": "linear", "action": "adapt", "optional": True, "lora": {"r": 4, "alpha": 8}},
        {"match": "*", "type": "conv1d", "action": "adapt", "optional": True, "lora": {"r": 4, "alpha": 8}},
        {"match": "lm_head", "action": "plain", "untie": True},
    ],
}


def peft_model(base, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, folder)


def keys_in(path) -> set[str]:
    with safe_open(path, framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_save_pretrained_writes_an_adapter_folder_that_peft_and_surgery_load(tmp_path, model):
    base = tiny_model(model)
    ft = trained(surgery.rewrite(base, WITH_PLAIN))
    ft.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".surgery-files.json",
        "README.md",
        "adapter.safetensors",
        "adapter_config.json",
        "adapter_model.safetensors",
        "model.safetensors",
    ]
    base_names = {n for n, _ in base.named_parameters()} - set(own_state(ft))
    for name in ("adapter.safetensors", "adapter_model.safetensors", "model.safetensors"):
        assert not {k.removeprefix("base_model.model.") for k in keys_in(tmp_path / name)} & base_names, name
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "adapter.safetensors").read_bytes()
    expected = logits(ft)
    twin = peft_model(tiny_model(model), tmp_path)  # PEFT on the plain base
    assert (logits(twin) - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(logits(surgery.load_adapter(tiny_model(model), tmp_path)), expected)
    card = (tmp_path / "README.md").read_text()
    assert f"base_model: {model}" in card and "PeftModel.from_pretrained" in card and "lm_head" in card


@pytest.mark.parametrize("rules", ["qv_lora", "qlora_nf4"])
def test_save_pretrained_on_a_quantized_base_matches_peft_on_that_base(tmp_path, rules):
    ft = trained(surgery.rewrite(tiny_model("tiny-opt"), rules))
    ft.save_pretrained(tmp_path)
    other = tiny_model("tiny-opt")
    surgery.rewrite(other, rules)  # the same checkpoint quantized the same way, for PEFT to wrap in place
    assert torch.equal(logits(peft_model(other, tmp_path)), logits(ft))
    note = "load_in_8bit=True" if rules == "qv_lora" else 'bnb_4bit_quant_type="nf4"'
    assert note in (tmp_path / "README.md").read_text()


def test_save_pretrained_keywords_are_taken_or_refused_and_a_refusal_writes_nothing(tmp_path):
    ft = trained(surgery.rewrite(tiny_model("tiny-llama"), "qv_lora"))
    ft.save_pretrained(tmp_path / "a", max_shard_size="1MB", safe_serialization=True)  # meaningless here: accepted
    assert (tmp_path / "a" / "adapter.safetensors").is_file()
    ft.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    for kwargs, message in [
        ({"safe_serialization": False}, "safetensors only"),
        ({"variant": "fp16"}, "variant"),
        ({"push_to_hub": True}, "ft.push_to_hub"),
        ({"shard_everything": 1}, "unknown argument"),
    ]:
        with pytest.raises(AdapterStateError, match=message):
            ft.save_pretrained(tmp_path / "b", **kwargs)
    assert not (tmp_path / "b").exists()
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    wrong = {k: torch.zeros(3) for k in own_state(ft)}
    with pytest.raises(AdapterStateError, match="has shape"):
        ft.save_pretrained(tmp_path / "a", state_dict=wrong)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


def test_save_pretrained_takes_own_values_from_a_full_state_dict(tmp_path):
    base = tiny_model("tiny-llama")
    ft = surgery.rewrite(base, "qv_lora")
    state = {k: v.clone() for k, v in ft.state_dict().items()}  # the whole model, as Trainer may pass it
    name = next(iter(own_state(ft)))
    state[name] = torch.full_like(state[name], 0.25)
    ft.save_pretrained(tmp_path, state_dict=state)
    again = surgery.load_adapter(base, tmp_path)
    assert torch.equal(own_state(again)[name], state[name])


def test_push_to_hub_uploads_the_adapter_folder(tmp_path, monkeypatch):
    """The Hub is not reachable here: the upload is intercepted, what would be uploaded is checked."""
    import transformers.utils.hub as hub

    uploaded = {}

    class Api:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    class Card:
        def save(self, path):
            open(path, "w").write("hub card\n")

    def upload(self, folder, repo_id, **kwargs):
        uploaded.update({name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)})
        return "url"

    monkeypatch.setattr(hub, "hf_api", lambda: Api())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: Card())
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", upload)
    ft = surgery.rewrite(tiny_model("tiny-llama"), "qv_lora")
    ft.push_to_hub("me/qv")
    own_bytes = sum(t.numel() * t.element_size() for t in own_state(ft).values())
    assert set(uploaded) == {
        ".surgery-files.json",
        "README.md",
        "adapter.safetensors",
        "adapter_config.json",
        "adapter_model.safetensors",
        "model.safetensors",
    }
    assert uploaded["adapter.safetensors"] < own_bytes + 64 * 1024  # no base tensor


def test_folders_are_read_by_the_cli_and_peft_exports_name_their_base(tmp_path):
    base = tiny_model("tiny-llama")
    ft = trained(surgery.rewrite(base, "qv_lora"))
    ft.save_pretrained(tmp_path / "ft")
    shown = runner.invoke(app, ["adapter", "show", str(tmp_path / "ft")])
    assert shown.exit_code == 0 and "surgery-adapter" in shown.stdout, shown.output
    said = runner.invoke(app, ["generate", "owl ->", "--adapter", str(tmp_path / "ft"), "-n", "3"])
    assert said.exit_code == 0 and "owl ->" in said.stdout, said.output
    surgery.export_peft(ft, tmp_path / "peft")
    shown = runner.invoke(app, ["adapter", "show", str(tmp_path / "peft")])
    fingerprint = surgery.files.adapter_file.base_fingerprint(ft.surgery_info.base).short
    assert shown.exit_code == 0 and "PEFT LoRA adapter" in shown.stdout and fingerprint in shown.stdout, shown.output
    other = tiny_model("tiny-llama")
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(torch.randn_like(p))  # the same architecture, other weights
    with pytest.raises(AdapterStateError, match="exported from another base"):
        surgery.import_peft(other, tmp_path / "peft")


def test_trainer_checkpoints_hold_the_adapter_only_and_resume_exactly(tmp_path):
    from transformers import Trainer, TrainingArguments

    from surgery.training.data import read_examples, tokenize

    blocks = tokenize(read_examples("upper"), tiny_tokenizer(), block_size=24)
    rows = [{k: v[i] for k, v in blocks.batch(torch.arange(len(blocks))).items()} for i in range(len(blocks))]

    def run(out, resume=None, **extra):
        base = tiny_model("tiny-llama")
        ft = surgery.rewrite(base, "qv_lora")
        sibling = surgery.rewrite(base, "qv_lora")
        frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
        untouched = {n: p.detach().clone() for n, p in own_state(sibling).items()}
        args = TrainingArguments(
            output_dir=str(out),
            max_steps=8,
            save_steps=4,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            **extra,
        )
        trainer = Trainer(model=ft, args=args, train_dataset=rows, eval_dataset=rows[:8])
        trainer.train(resume_from_checkpoint=resume)
        assert all(torch.equal(frozen[n], p) for n, p in base.named_parameters())
        assert all(torch.equal(untouched[n], p) for n, p in own_state(sibling).items())
        return trainer, {k: v.detach().clone() for k, v in own_state(ft).items()}, base

    _, straight, base = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-4"
    own_bytes = sum(t.numel() * t.element_size() for t in straight.values())
    weights = {os.stat(p).st_ino: p.stat().st_size for p in checkpoint.glob("*.safetensors")}  # a hard link once
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    assert sum(weights.values()) < 2 * own_bytes + 64 * 1024 < base_bytes
    _, resumed, _ = run(tmp_path / "a", resume=str(checkpoint))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    # load_best_model_at_end: "best" = highest eval loss, i.e. the earlier checkpoint, not the last weights
    trainer, _, _ = run(
        tmp_path / "b",
        eval_strategy="steps",
        eval_steps=4,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,
    )
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-4")
    saved = surgery.read_adapter(best).tensors
    last = surgery.read_adapter(tmp_path / "b" / "checkpoint-8").tensors
    now = own_state(trainer.model)
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    assert any(not torch.equal(saved[k], last[k]) for k in saved)
    trainer.save_model()  # the final output_dir: the adapter folder too
    assert (tmp_path / "b" / "adapter_config.json").is_file() and (tmp_path / "b" / "adapter.safetensors").is_file()
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["peft_type"] == "LORA"
