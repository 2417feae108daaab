"""New tokens per fine-tune (`extra_tokens:`, `--extra-tokens FILE`): private embedding and output rows, the shared
embedding and every sibling bit-identical; adapter files and folders, merge, PEFT's trainable_token_indices (logits
equal to PEFT's own model on the resized base) and the CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import surgery
from surgery.base.ownership import own_state
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.errors import AdapterStateError, ExportError, RewriteError, RuleFileError
from surgery.files.peft_format import export_peft
from surgery.finetune.batched import batched, generate
from surgery.finetune.loading import import_peft
from surgery.finetune.vocabulary import extended_tokenizer
from surgery.rules.rule_file import parse_rules, read_extra_tokens

TOKENS = ["<tool>", "</tool>"]
IDS = torch.tensor([[104, 260, 32, 7, 261, 9]])  # byte ids of the tiny tokenizer and the two new ids
ADAPT = {"tiny-llama": "re:.*(q_proj|v_proj)", "tiny-opt": "re:.*(q_proj|v_proj)", "tiny-gpt2": "c_attn"}


def rules(model: str = "tiny-llama", storage: str = "int8", extra=TOKENS, **more) -> dict:
    out = {
        "version": 1,
        "quantize": storage,
        "default": "freeze",
        **more,
        "rules": [{"match": ADAPT[model], "action": "adapt", "lora": {"r": 4, "alpha": 8}}],
    }
    return out | ({"extra_tokens": extra} if extra is not None else {})


def nudged(ft, scale: float = 0.1):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in own_state(ft).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return ft


def logits(model, ids=IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("model", list(ADAPT))
def test_new_tokens_train_rows_of_their_own_and_leave_the_base_and_a_sibling_bit_identical(model, digest):
    base = tiny_model(model)
    sibling = surgery.rewrite(base, rules(model, extra=None))
    ft = surgery.rewrite(base, rules(model))
    before, sibling_before = digest(base), logits(sibling, IDS.clamp(max=255))
    assert ft.config.vocab_size == 262 and base.config.vocab_size == 260
    old = IDS.clamp(max=255)
    assert torch.equal(logits(ft, old)[..., :260], logits(sibling, old))  # at the start: the base on old tokens
    optimizer = torch.optim.AdamW([p for p in ft.parameters() if p.requires_grad], lr=1e-2)
    ft.train()
    for _ in range(3):
        loss = ft(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss) and logits(ft).shape[-1] == 262
    rows = {k: v for k, v in own_state(ft).items() if k.endswith("extra_rows")}
    tied = model != "tiny-llama"  # OPT and GPT-2 tie lm_head to the embedding: one set of new rows, as PEFT ties them
    assert len(rows) == (1 if tied else 2) and all(r.shape == (2, 64) for r in rows.values())
    assert digest(base) == before and torch.equal(logits(sibling, old), sibling_before)


def test_ids_are_mapped_by_id_so_a_padded_vocabulary_keeps_its_width():
    """A tokenizer shorter than the embedding gives new ids below the row count: those rows become the fine-tune's
    own (the base's stay), and the vocabulary does not grow."""
    base = tiny_model("tiny-llama")
    ft = nudged(surgery.rewrite(base, rules(extra={"tokens": TOKENS, "first_id": 258})))
    assert ft.config.vocab_size == 260
    ids = torch.tensor([[5, 258, 259, 6]])
    embedding, rows = ft.get_input_embeddings(), own_state(ft)["model.embed_tokens.extra_rows"]
    with torch.no_grad():
        assert torch.equal(embedding(ids)[0, 1:3], rows)
        assert torch.equal(embedding(ids)[0, [0, 3]], base.get_input_embeddings()(ids)[0, [0, 3]])
        hidden = torch.randn(3, 64)
        head = ft.get_output_embeddings()(hidden)
        torch.testing.assert_close(head[:, 258:260], hidden @ own_state(ft)["lm_head.extra_rows"].t())
        torch.testing.assert_close(head[:, :258], base.get_output_embeddings()(hidden)[:, :258])


@pytest.mark.parametrize("model", list(ADAPT))
def test_adapter_files_and_folders_load_back_bit_for_bit_and_merge_into_a_model_transformers_loads(tmp_path, model):
    import transformers

    ft = nudged(surgery.rewrite(tiny_model(model), rules(model, storage="none")))
    surgery.save_adapter(ft, tmp_path / "a.safetensors")
    ft.save_pretrained(tmp_path / "folder")
    for source in (tmp_path / "a.safetensors", tmp_path / "folder"):
        again = surgery.load_adapter(tiny_model(model), source)
        assert torch.equal(logits(again), logits(ft))
    merged = surgery.merge(ft)
    assert merged.config.vocab_size == 262 and rel(logits(merged), logits(ft)) <= 1e-5
    tied = model != "tiny-llama"  # a tied base's merge stays tied: one matrix, as the base holds one
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == tied
    assert merged.config.tie_word_embeddings == tied
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(logits(reloaded), logits(merged))


@pytest.mark.parametrize("model", list(ADAPT))
def test_peft_export_is_trainable_token_indices_with_peft_s_logits_on_the_resized_base_and_imports_back(
    tmp_path, model
):
    peft = pytest.importorskip("peft")
    the_rules = rules(model)
    ft = nudged(surgery.rewrite(tiny_model(model), the_rules))
    export_peft(ft, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    name = {"tiny-llama": "embed_tokens", "tiny-opt": "embed_tokens", "tiny-gpt2": "wte"}[model]
    expected = {name: [260, 261], **({"lm_head": [260, 261]} if model == "tiny-llama" else {})}
    assert config["trainable_token_indices"] == expected
    assert "base.resize_token_embeddings(262)" in (tmp_path / "peft" / "README.md").read_text()
    base = tiny_model(model)
    surgery.prepare_base(base, the_rules)
    base.resize_token_embeddings(262)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
    assert rel(logits(theirs), logits(ft)) <= 1e-5
    ours = tiny_model(model)
    surgery.prepare_base(ours, the_rules)
    assert torch.equal(logits(import_peft(ours, tmp_path / "peft")), logits(ft))
    for target in ("vllm", "lorax"):
        with pytest.raises(ExportError, match="adds its own tokens"):
            export_peft(ft, tmp_path / target, target=target)
        assert not (tmp_path / target).exists()


def test_a_peft_folder_with_token_rows_but_no_token_strings_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    ft = nudged(surgery.rewrite(tiny_model("tiny-llama"), rules()))
    export_peft(ft, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(weights), weights)  # PEFT's own save: no surgery metadata
    with pytest.raises(AdapterStateError, match="names by id only"):
        import_peft(tiny_model("tiny-llama"), tmp_path)


def test_batched_passes_refuse_a_fine_tune_with_its_own_tokens_and_generate_answers_with_it_alone():
    base = tiny_model("tiny-llama")
    ft = nudged(surgery.rewrite(base, rules()), scale=0.5)
    with pytest.raises(RewriteError, match="adds its own tokens.*a batched pass needs one vocabulary"):
        batched(base, [ft, None])
    tokenizer = extended_tokenizer(ft, tiny_tokenizer())
    assert tokenizer.convert_tokens_to_ids(TOKENS) == [260, 261] and len(tiny_tokenizer()) == 260
    answer = generate(base, [ft], ["hi <tool>"], tokenizer, max_new_tokens=6)[0][0]
    ids = tokenizer("hi <tool>", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = ft.eval().generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert answer == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_bad_extra_tokens_are_one_clear_error_and_change_nothing(tmp_path, digest):
    for extra, message in (
        ([], "non-empty list"),
        (["<a>", "<a>"], "listed twice"),
        ([""], "non-empty string"),
        ({"tokens": ["<a>"], "first_id": -1}, "first_id must be an integer"),
        ({"tokens": ["<a>"], "frist_id": 3}, "frist_id"),
    ):
        with pytest.raises(RuleFileError, match=message):
            parse_rules(rules(extra=extra))
    base = tiny_model("tiny-llama")
    before = digest(base)
    with pytest.raises(RewriteError, match="first_id 300 leaves ids 260..299 with no row"):
        surgery.rewrite(base, rules(extra={"tokens": ["<a>"], "first_id": 300}))
    assert digest(base) == before
    ft = surgery.rewrite(base, rules(extra=["a", "<b>"]))  # "a" is already a token of the tiny tokenizer
    with pytest.raises(RewriteError, match=r"extra token .a. is already in the tokenizer.s vocabulary \(id 97\)"):
        extended_tokenizer(ft, tiny_tokenizer())
    (tmp_path / "tokens.txt").write_text("<x>\n\n<y>\n<x>\n")
    with pytest.raises(RuleFileError, match=r"tokens.txt.*'<x>' is listed twice"):
        read_extra_tokens(tmp_path / "tokens.txt")


def test_train_with_extra_tokens_then_generate_and_merge_from_the_cli(tmp_path):
    """The CLI trains the new tokens (ids from the tokenizer's length, recorded in the adapter file), writes the
    tokenizer beside the adapter, and generate and merge read and write the new tokens."""
    import transformers
    from test_cli import run

    rows = [
        {"prompt": f"Capital of {c}? ", "completion": f"<city>{v}</city>"}
        for c, v in [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo")] * 4
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tokens.txt").write_text("<city>\n</city>\n")
    result = run(
        "train",
        "lora_plus_head",
        "--model",
        "tiny-llama",
        "--data",
        str(tmp_path / "d.jsonl"),
        "--extra-tokens",
        str(tmp_path / "tokens.txt"),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "40",
        "--lr",
        "1e-2",
    )
    assert result.exit_code == 0, result.output
    adapter = surgery.read_adapter(tmp_path / "run" / "adapter.safetensors")
    assert adapter.rules.extra_tokens.tokens == ("<city>", "</city>") and adapter.rules.extra_tokens.first_id == 260
    assert "lm_head.base_layer.weight" in adapter.tensors  # the plain head under the new rows is saved too
    saved = transformers.AutoTokenizer.from_pretrained(tmp_path / "run")
    assert saved.convert_tokens_to_ids(["<city>", "</city>"]) == [260, 261]
    result = run(
        "generate",
        "Capital of Spain? ",
        "--adapter",
        str(tmp_path / "run" / "adapter.safetensors"),
        "--max-new-tokens",
        "4",
    )
    assert result.exit_code == 0 and "<city>" in result.stdout, result.output
    result = run("merge", str(tmp_path / "run" / "adapter.safetensors"), "--out", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = tokenizer("Capital of Spain? ", return_tensors="pt").input_ids
    out = merged.generate(ids, max_new_tokens=4, do_sample=False)
    assert out[0, ids.shape[1]].item() == 260 and tokenizer.decode(out[0, ids.shape[1]]) == "<city>"
    (tmp_path / "with.yaml").write_text(json.dumps(rules()))
    result = run(
        "train",
        str(tmp_path / "with.yaml"),
        "--model",
        "tiny-llama",
        "--data",
        str(tmp_path / "d.jsonl"),
        "--extra-tokens",
        str(tmp_path / "tokens.txt"),
        "--out",
        str(tmp_path / "twice"),
    )
    assert result.exit_code == 2 and "already lists extra_tokens" in result.output
    result = run(
        "train",
        "--model",
        "tiny-llama",
        "--out",
        str(tmp_path / "batched"),
        "--batched",
        "--job",
        "a=qv_lora,upper",
        "--job",
        "b=qv_lora,capitals",
        "--extra-tokens",
        str(tmp_path / "tokens.txt"),
    )
    assert result.exit_code == 2 and "a batched pass needs one" in " ".join(result.output.split())
    assert not (tmp_path / "batched").exists()  # refused before anything loads or is written


@pytest.mark.parametrize("model", list(ADAPT))
@pytest.mark.parametrize("head", ["freeze", "plain"])
def test_the_plan_counts_the_new_rows_as_the_fine_tune_holds_them(model, head):
    """n × hidden float32 per set of rows: one set where lm_head still shares the embedding's tensor, two where
    it does not (its own weights, or a plain copy that splits the tie)."""
    from surgery.planning.memory import extra_bytes

    base = tiny_model(model)
    more = rules(model, storage="none")
    more["rules"] = [
        {"match": "lm_head", "action": head, **({"untie": True} if head == "plain" else {})},
        *more["rules"],
    ]
    ft = surgery.rewrite(base, more)
    plan = surgery.finetune_info(ft).plan
    rows = 1 if model != "tiny-llama" and head == "freeze" else 2
    without = surgery.plan(base, {**more, "extra_tokens": None})
    assert plan.finetune_bytes - without.finetune_bytes == rows * 2 * 64 * 4
    assert extra_bytes(ft, base) == plan.finetune_bytes
