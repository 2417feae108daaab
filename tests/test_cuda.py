"""The CUDA path: bitsandbytes' GPU kernels, bf16/fp16 training, 8-bit AdamW, files, memory as planned.

Skipped without a CUDA device (this project's CI has none); run where one is lent.
"""

from __future__ import annotations

import pytest
import torch

import surgery
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.planning.memory import extra_bytes, parameter_bytes
from surgery.training.config import DataConfig
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import train_jobs as train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOK = tiny_tokenizer()
SCHEMES = {"int8": "qv_lora", "nf4": "qlora_nf4"}


def cuda_base(name: str = "tiny-llama") -> torch.nn.Module:
    return tiny_model(name).to("cuda").eval()


def inputs(rows: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, TOK.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0)).cuda()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_planned_bytes_are_held_on_the_gpu(scheme):
    base = cuda_base()
    torch.cuda.synchronize()
    predicted = surgery.plan(surgery.trace(base), SCHEMES[scheme], finetunes=2)
    ft = surgery.rewrite(base, SCHEMES[scheme])
    assert next(ft.parameters()).is_cuda
    assert parameter_bytes(base) == predicted.base_bytes_after
    assert extra_bytes(ft, base) == predicted.finetune_bytes


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_new_finetune_computes_the_quantized_base_on_cuda(scheme):
    base = cuda_base()
    ft = surgery.rewrite(base, SCHEMES[scheme])
    ids = inputs()
    with torch.no_grad():
        got, expected = ft(ids).logits, base(ids).logits
    assert got.is_cuda and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # LoRA B = 0 at init: same kernels, same result


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_on_cuda_learns_and_leaves_base_and_sibling_alone(scheme, precision, digest):
    base = cuda_base()
    surgery.prepare_base(base, SCHEMES[scheme])
    sibling = surgery.rewrite(base, SCHEMES[scheme])
    before_base, before_sibling = digest(base), digest(sibling)
    config = TrainConfig(batch_size=8, lr=1e-2, max_steps=30, seed=0, precision=precision)
    job = make_job(
        base,
        name="job",
        rules="lora_plus_head",
        data="upper",
        tokenizer=TOK,
        config=config,
        data_config=DataConfig(block_size=24),
        model_name="tiny-llama",
    )
    (run,) = train([job])
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-5:]) < losses[0] * 0.7
    assert digest(base) == before_base and digest(sibling) == before_sibling


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_bf16_base_trains_its_plain_head_through_fp32_masters_on_cuda(scheme):
    base = tiny_model("tiny-llama").to("cuda", torch.bfloat16).eval()
    config = TrainConfig(batch_size=8, lr=1e-2, max_steps=20, seed=0, precision="bf16")
    job = make_job(
        base,
        name="job",
        rules="lora_plus_head",
        data="upper",
        tokenizer=TOK,
        config=config,
        data_config=DataConfig(block_size=24),
        model_name="tiny-llama",
    )
    (run,) = train([job])
    ((head, master),) = run.masters.pairs
    assert head.is_cuda and head.dtype == torch.bfloat16 and master.dtype == torch.float32
    assert torch.equal(head, master.bfloat16())
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert min(losses[-5:]) < losses[0] * 0.7


def test_8bit_adamw_runs_on_cuda():
    base = cuda_base()
    config = TrainConfig(batch_size=8, lr=1e-2, max_steps=10, seed=0, optimizer="adamw8bit")
    job = make_job(
        base,
        name="job",
        rules="lora_plus_head",
        data="upper",
        tokenizer=TOK,
        config=config,
        data_config=DataConfig(block_size=24),
        model_name="tiny-llama",
    )
    (run,) = train([job])
    assert type(run.optimizer).__module__.startswith("bitsandbytes")
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in run.history if "loss" in r])))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adapter_file_round_trip_and_merge_on_cuda(tmp_path, scheme):
    base = cuda_base()
    ft = surgery.rewrite(base, SCHEMES[scheme])
    with torch.no_grad():
        for p in ft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    path = surgery.save_adapter(ft, tmp_path / "ft.safetensors")
    again = surgery.load_adapter(base, path)
    ids = inputs()
    with torch.no_grad():
        reference = ft(ids).logits
        torch.testing.assert_close(again(ids).logits, reference, rtol=0, atol=0)
        merged = surgery.merge(ft)
        error = (merged(ids).logits - reference).abs().max() / reference.abs().max()
    bound = {"int8": 0.05, "nf4": 1e-5}[scheme]  # int8: LLM.int8's activation quantization; nf4: exact
    assert float(error) <= bound


# ----------------------------------------------------------------------- the GPU path of #22 (quantize on load)


@pytest.mark.parametrize("rules", ["qlora_nf4", "qv_lora", "finetuna_default"])
def test_quantized_while_loading_onto_cuda_equals_quantizing_on_the_cpu(tmp_path, rules):
    """bitsandbytes' CUDA and CPU quantization of the same tensors: the issue asks for bit-identical storage."""
    from surgery.base.loading import load_model

    tiny_model("tiny-llama").to(torch.bfloat16).save_pretrained(tmp_path / "m")
    on_gpu = load_model(str(tmp_path / "m"), rules=rules, device="cuda").model
    on_cpu = load_model(str(tmp_path / "m"), rules=rules, device="cpu").model
    assert all(t.is_cuda for t in on_gpu.parameters())
    gpu = {k: t.detach().cpu() for k, t in on_gpu.state_dict().items() if isinstance(t, torch.Tensor)}
    cpu = {k: t.detach() for k, t in on_cpu.state_dict().items() if isinstance(t, torch.Tensor)}
    assert gpu.keys() == cpu.keys()
    differ = [
        k
        for k in gpu
        if not torch.equal(
            gpu[k].view(torch.uint8) if gpu[k].dim() else gpu[k], cpu[k].view(torch.uint8) if cpu[k].dim() else cpu[k]
        )
    ]
    assert not differ, differ[:5]


def test_a_4bit_base_loaded_for_cuda_computes_in_bf16_unless_the_rule_file_says():
    from surgery.base.loading import load_model
    from surgery.rules.rule_file import parse_rules

    base = load_model("tiny-llama", rules="qlora_nf4", device="cuda").model
    assert base.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16  # the file leaves it open
    written = parse_rules({"quantize": {"scheme": "nf4", "compute_dtype": "float32"}, "default": "quantize"})
    base = load_model("tiny-llama", rules=written, device="cuda").model
    assert base.model.layers[0].mlp.up_proj.compute_dtype == torch.float32


@pytest.mark.parametrize("command", ["train", "generate", "apply", "merge", "export-peft", "demo"])
def test_every_command_runs_with_device_cuda(tmp_path, command):
    from typer.testing import CliRunner

    from surgery_cli.app import app

    runner = CliRunner()
    adapter = tmp_path / "a.safetensors"
    made = runner.invoke(
        app, ["apply", "qlora_nf4", "--model", "tiny-llama", "--out", str(adapter), "--device", "cuda"]
    )
    assert made.exit_code == 0, made.output
    args = {
        "train": [
            "train",
            "qlora_nf4",
            "--model",
            "tiny-llama",
            "--data",
            "upper",
            "--max-steps",
            "3",
            "--out",
            str(tmp_path / "run"),
            "--precision",
            "bf16",
        ],
        "generate": ["generate", "owl ->", "--adapter", str(adapter), "-n", "4"],
        "apply": ["apply", "qv_lora", "--model", "tiny-llama", "-n", "2"],
        "merge": ["merge", str(adapter), "--out", str(tmp_path / "merged")],
        "export-peft": ["export-peft", str(adapter), "--out", str(tmp_path / "peft")],
        "demo": ["demo", "--steps", "10", "--out", str(tmp_path / "demo")],
    }[command]
    done = runner.invoke(app, [*args, "--device", "cuda"])
    assert done.exit_code == 0, done.output
    assert "cuda" in done.output.splitlines()[0]


def test_a_peft_export_loads_in_peft_on_cuda_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    tiny_model("tiny-llama").save_pretrained(tmp_path / "base")
    base = surgery.load_model(str(tmp_path / "base"), rules="qv_lora", device="cuda").model
    ft = surgery.rewrite(base, "qv_lora")
    with torch.no_grad():
        for p in ft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    surgery.export_peft(ft, tmp_path / "peft")
    card = (tmp_path / "peft" / "README.md").read_text()
    import re

    from transformers import BitsAndBytesConfig

    call = re.search(r"^base = (AutoModelForCausalLM\.from_pretrained\(.*\))$", card, re.M).group(1)
    loaded = eval(
        call.replace(f"{str(tmp_path / 'base')!r}", f"{str(tmp_path / 'base')!r}, device_map='cuda'"),
        {"AutoModelForCausalLM": AutoModelForCausalLM, "BitsAndBytesConfig": BitsAndBytesConfig, "torch": torch},
    )
    theirs = peft.PeftModel.from_pretrained(loaded, tmp_path / "peft").eval()
    ids = inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ft.eval()(ids).logits, rtol=0, atol=0)


def test_generation_on_cuda_answers_like_the_cpu_greedily():
    from surgery.finetune.batched import generate

    tok = tiny_tokenizer()
    answers = {}
    for device in ("cpu", "cuda"):
        base = surgery.load_model("tiny-llama", device=device).model.requires_grad_(False)
        answers[device] = generate(base, [None], ["owl ->", "van ->"], tok, max_new_tokens=6)
    assert answers["cuda"] == answers["cpu"]  # fp32, greedy: argmax ties aside, the same tokens


def test_the_planned_device_map_is_the_one_the_loader_uses(tmp_path):
    from surgery.base.loading import graph_of, load_model
    from surgery.base.quantizer import planned_device_map

    tiny_model("tiny-llama").save_pretrained(tmp_path / "m")
    memory = {0: 200 * 1024, "cpu": 2**30}  # a tiny budget on the GPU: part of the base goes to the CPU
    planned = planned_device_map(
        load_model(str(tmp_path / "m"), weights=False).model,
        surgery.plan(graph_of(str(tmp_path / "m")), "qlora_nf4"),
        memory,
    )
    base = load_model(str(tmp_path / "m"), rules="qlora_nf4", device_map="auto", max_memory=memory).model
    assert {k: str(v) for k, v in base.hf_device_map.items()} == {k: str(v) for k, v in planned.items()}


def test_loftq_on_cuda_equals_peft_s_replace_lora_weights_loftq(tmp_path):
    """PEFT's LoftQ over a bitsandbytes base (its replace_lora_weights_loftq, which runs only on CUDA) and ours:
    the same nf4 base, W read from the same safetensors checkpoint, alpha = r (PEFT leaves the scaling out)."""
    peft = pytest.importorskip("peft")
    from peft.utils.loftq_utils import replace_lora_weights_loftq
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("tiny-llama").save_pretrained(tmp_path / "ckpt")
    rules = {
        "version": 1,
        "quantize": {"scheme": "nf4", "double_quant": False, "compute_dtype": "float32"},
        "default": "freeze",
        "rules": [
            {"match": "lm_head", "action": "freeze"},
            {
                "match": "re:.*(q_proj|v_proj)",
                "action": "adapt",
                "lora": {"r": 4, "alpha": 4, "init_lora_weights": "loftq"},
            },
            {"type": "linear", "match": "*", "action": "quantize"},
        ],
    }
    base = surgery.load_model(str(tmp_path / "ckpt"), rules=rules, device="cuda").model
    ours = surgery.rewrite(base, rules).eval()
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["lm_head"],
    )
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", quantization_config=bnb, device_map={"": 0})
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    replace_lora_weights_loftq(theirs, model_path=str(tmp_path / "ckpt"))
    ids = inputs()
    with torch.no_grad():
        got, expected = ours(ids).logits, theirs.eval()(ids).logits
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_new_tokens_train_on_cuda_and_leave_the_nf4_base_alone(precision, digest):
    """extra_tokens on a CUDA nf4 base: the rows live on the GPU, train under autocast, and the base stays as is."""
    base = cuda_base()
    rules = {
        "version": 1,
        "quantize": "nf4",
        "default": "freeze",
        "extra_tokens": ["<t>"],
        "rules": [
            {"match": "re:.*(q_proj|v_proj)", "action": "adapt", "lora": {"r": 4}},
            {"type": "linear", "match": "re:model\\..*", "action": "quantize"},
        ],
    }
    surgery.prepare_base(base, rules)
    before = digest(base)
    config = TrainConfig(batch_size=8, lr=1e-2, max_steps=20, seed=0, precision=precision)
    job = make_job(
        base,
        name="job",
        rules=rules,
        data="upper",
        tokenizer=TOK,
        config=config,
        data_config=DataConfig(block_size=24),
        model_name="tiny-llama",
    )
    rows = job.finetune.get_output_embeddings().extra_rows  # tiny-llama's head is untied: rows of its own
    assert rows.is_cuda and job.finetune.config.vocab_size == 261
    start = rows.detach().clone()
    (run,) = train([job])
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses))) and digest(base) == before
    assert not torch.equal(rows, start)  # the softmax over 261 logits trains the new output row too


@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_packed_examples_keep_apart_on_cuda(attention):
    """Each example's loss in packed rows is its loss alone on the GPU: SDPA reads the restarting position ids row by
    row; flash attention gets the micro-batch flattened into one row (its variable-length kernels)."""
    from test_packing import packed_and_alone_losses

    from surgery.training.job import _packed_attention

    if attention == "flash_attention_2":
        pytest.importorskip("flash_attn")
    dtype = torch.bfloat16 if attention == "flash_attention_2" else torch.float32
    model = tiny_model("tiny-llama").to("cuda", dtype).eval()
    model.set_attn_implementation(attention)
    form = _packed_attention(model, "tiny-llama")
    assert form == ("flattened" if attention == "flash_attention_2" else "positions")
    got, expected = packed_and_alone_losses(model, form)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def _cuda_llama(**fields) -> torch.nn.Module:
    """A randomly initialised Llama with small widths on the GPU (eager attention: deterministic kernels)."""
    import transformers

    config = transformers.LlamaConfig(
        **{
            "vocab_size": 260,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "attn_implementation": "eager",
            **fields,
        }
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to("cuda").eval()


def _lora_finetune(base: torch.nn.Module, head: str = "freeze", storage: str = "none") -> torch.nn.Module:
    head_rule = {"match": "lm_head", "action": head} | (
        {"lora": {"r": 4, "init": "gaussian"}} if head == "adapt" else {}
    )
    rules = {
        "version": 1,
        "quantize": storage,
        "default": "freeze",
        "rules": [
            head_rule,
            {"match": "re:.*(q_proj|v_proj)", "action": "adapt", "lora": {"r": 4, "init": "gaussian"}},
        ],
    }
    ft = surgery.rewrite(base, rules)
    with torch.no_grad():
        for p in ft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return ft.train()


def _peak_step(ft, compute, context=None):
    """The loss, gradients and peak allocated bytes above the start of one step on the GPU."""
    import contextlib

    params = [p for p in ft.parameters() if p.requires_grad]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    with context if context is not None else contextlib.nullcontext():
        loss = compute()
    grads = torch.autograd.grad(loss, params)
    torch.cuda.synchronize()
    return loss.detach(), grads, torch.cuda.max_memory_allocated() - before


def test_offloaded_checkpoints_train_bit_identically_and_hold_less_on_cuda():
    """Gradient checkpointing keeps each layer's input for backward (16 layers x 4,096 tokens x 256 fp32 = 64 MiB);
    offloaded, they wait in pinned host memory: the same gradients bit for bit, a lower peak."""
    from surgery.training.job import checkpoint_activations
    from surgery.training.offload import offloaded_activations

    layers, tokens, hidden = 16, 4096, 256
    ft = _lora_finetune(_cuda_llama(num_hidden_layers=layers))
    checkpoint_activations(ft)
    ids = torch.randint(0, 260, (1, tokens), generator=torch.Generator().manual_seed(0)).cuda()

    def compute():
        return ft(input_ids=ids, labels=ids, use_cache=False).loss

    first, again = _peak_step(ft, compute), _peak_step(ft, compute)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))  # determinism
    moved = _peak_step(ft, compute, offloaded_activations("cuda"))
    assert torch.equal(moved[0], first[0]) and all(torch.equal(a, b) for a, b in zip(moved[1], first[1]))
    saved = layers * tokens * hidden * 4
    assert moved[2] <= first[2] - saved // 2, (moved[2], first[2], saved)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("head", "storage"), [("freeze", "nf4"), ("adapt", "nf4"), ("plain", "none")])
def test_the_chunked_loss_equals_the_full_loss_on_cuda_and_holds_less(head, storage, precision):
    """A 32,000-token vocabulary at 2 x 2,048 tokens: the full fp32 logits are 500 MiB, one chunk's 62.5 MiB."""
    from surgery.training.loss import causal_lm_loss, causal_lm_parts

    vocab, rows, tokens = 32000, 2, 2048
    ft = _lora_finetune(_cuda_llama(vocab_size=vocab, hidden_size=64, intermediate_size=128), head, storage)
    parts = causal_lm_parts(ft)
    ids = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(0)).cuda()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = torch.autocast("cuda", dtype=dtype, enabled=precision == "bf16")
    full = _peak_step(ft, lambda: ft(input_ids=ids, labels=ids, use_cache=False).loss, autocast)
    autocast = torch.autocast("cuda", dtype=dtype, enabled=precision == "bf16")
    ours = _peak_step(ft, lambda: causal_lm_loss(parts, ids, ids), autocast)
    tolerance = 2 * torch.finfo(torch.bfloat16).eps if precision == "bf16" else 1e-5  # GEMMs of other shapes

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    assert rel(ours[0], full[0]) <= tolerance
    assert max(rel(a, b) for a, b in zip(ours[1], full[1])) <= tolerance
    assert ours[2] < full[2] - rows * tokens * vocab * 4, (ours[2], full[2])
