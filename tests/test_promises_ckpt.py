"""Promises about checkpoints, options and verdicts, each tested by the attack that broke it: a checkpoint is what it
claims (or one clear error names the file and the weights), the loaded base owns its tensors, no option is accepted
and ignored, a verdict compares what can be compared, and advice names a remedy that works."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery
from surgery.base.ownership import own_state
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.errors import ModelConfigError, RewriteError
from surgery.rules.rule_file import parse_rules

QUANTIZE_LINEAR = {"type": "linear", "match": "re:.*_proj", "action": "adapt", "lora": {"r": 4}}


def quantizing(scheme: str = "nf4", init: str | bool = True):
    lora = {"r": 4, "init_lora_weights": init}
    return parse_rules(
        {"version": 1, "quantize": scheme, "default": "freeze", "rules": [{**QUANTIZE_LINEAR, "lora": lora}]}
    )


def saved(folder, model: str = "tiny-llama"):
    """A tiny model saved as a model folder; returns the folder and its safetensors file."""
    tiny_model(model).save_pretrained(folder)
    return folder, folder / "model.safetensors"


def rewrite_tensors(file, change) -> None:
    """Rewrite a safetensors file with ``change(tensors)`` applied (a new file, as a user's save would write)."""
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# 1(a) LoftQ reads W from the checkpoint: another model's weights of the same shapes are refused, naming the file.


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_loftq_refuses_same_shaped_weights_of_another_model_naming_the_file(tmp_path, digest, scheme):
    folder, file = saved(tmp_path / "base")
    base = surgery.load_model(str(folder), rules=quantizing(scheme)).model
    right = own_state(surgery.rewrite(base, quantizing(scheme, "loftq")))  # the checkpoint the base came from: fine
    assert right
    before = digest(base)
    generator = torch.Generator().manual_seed(7)

    def another_model(tensors):
        for key, t in tensors.items():
            tensors[key] = (torch.randn(t.shape, generator=generator) * t.float().std()).to(t.dtype)

    rewrite_tensors(file, another_model)
    with pytest.raises(RewriteError) as caught:
        surgery.rewrite(base, quantizing(scheme, "loftq"))
    message = str(caught.value)
    assert str(file) in message and "is not the one the base's quantized layer holds" in message
    assert "init_lora_weights: true" in message
    assert digest(base) == before


# 1(b) a checkpoint missing a weight, or holding one the model has no place for: one error naming keys and file.


def test_a_missing_weight_is_refused_naming_the_keys_and_the_file_unless_random_init(tmp_path):
    folder, file = saved(tmp_path / "m")
    gone = [f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1)] + ["model.norm.weight"]
    gone += ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    rewrite_tensors(file, lambda t: [t.pop(k) for k in gone])
    before = snapshot(folder)
    with pytest.raises(ModelConfigError) as caught:
        surgery.load_model(str(folder))
    message = str(caught.value)
    assert message.startswith(f"{file}: has no tensor for ")
    assert "model.layers.0.mlp.down_proj.weight" in message and "and 2 more" in message
    assert "--random-init" in message
    loaded = surgery.load_model(str(folder), random_init=True).model  # asked for: the missing ones start random
    reference = tiny_model("tiny-llama").state_dict()
    state = loaded.state_dict()
    assert torch.equal(state["model.layers.0.mlp.gate_proj.weight"], reference["model.layers.0.mlp.gate_proj.weight"])
    assert snapshot(folder) == before


def test_tied_weights_and_buffers_are_not_missing(tmp_path):
    """GPT-2 and OPT tie lm_head to the embedding and save it once; their buffers are not weights."""
    for model in ("tiny-gpt2", "tiny-opt"):
        folder, _ = saved(tmp_path / model, model)
        loaded = surgery.load_model(str(folder)).model
        assert torch.equal(loaded.lm_head.weight, tiny_model(model).lm_head.weight)


def test_an_unexpected_weight_is_refused_naming_it_and_the_file(tmp_path):
    folder, file = saved(tmp_path / "m")
    rewrite_tensors(file, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(ModelConfigError, match=r"model\.safetensors: holds model\.layers\.7\.mlp\.up_proj\.weight, "):
        surgery.load_model(str(folder))


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_a_missing_weight_the_plan_quantizes_is_one_error_naming_it_the_rule_and_the_file(tmp_path, scheme):
    folder, file = saved(tmp_path / "m")
    rewrite_tensors(file, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ModelConfigError) as caught:
        surgery.load_model(str(folder), rules=quantizing(scheme))
    message = str(caught.value)
    assert message.startswith(f"{file}: has no tensor for model.layers.0.mlp.up_proj.weight, which ")
    assert "quantizes" in message and "CB" not in message and "quant_state" not in message


# 1(c) a config whose sizes disagree with the weights: one error naming the tensor, both shapes and the file.


@pytest.mark.parametrize("scheme", [None, "nf4", "int8"])
def test_a_config_that_disagrees_with_the_weights_names_the_tensor_both_shapes_and_the_file(tmp_path, scheme):
    folder, file = saved(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError) as caught:
        surgery.load_model(str(folder), rules=quantizing(scheme) if scheme else ())
    message = str(caught.value)
    assert message.startswith(f"{file}: model.layers.0.mlp.")
    assert "in the checkpoint, but config.json" in message and "(64, 128)" in message or "(128, 64)" in message
    assert "136" in message and "above report" not in message


def test_the_cli_names_the_missing_weight_without_a_traceback(tmp_path):
    from test_cli import run

    folder, file = saved(tmp_path / "m")
    tiny_tokenizer().save_pretrained(folder)
    rewrite_tensors(file, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    result = run("generate", "hi", "--model", str(folder), "--base", "--max-new-tokens", "2")
    assert result.exit_code == 2, result.output
    assert "model.layers.0.mlp.up_proj.weight" in result.output and "Traceback" not in result.output


# 1(d) the loaded base owns its tensors: a checkpoint file changed on disk changes nothing in it.


def test_a_checkpoint_changed_in_place_on_disk_leaves_the_loaded_base_unchanged(tmp_path, digest):
    folder, file = saved(tmp_path / "m")
    for rules in ((), quantizing("nf4")):
        base = surgery.load_model(str(folder), rules=rules).model
        before = digest(base)
        size = file.stat().st_size
        with open(file, "r+b") as f:  # the same file (same inode), its tensors overwritten where they lie
            f.seek(size // 2)
            f.write(b"\x7f" * (size - size // 2))
        assert digest(base) == before
        saved(folder)


# 2. no option accepted and ignored: the same answer on every command and model source.

NO_FLASH_ATTN = __import__("importlib").util.find_spec("flash_attn") is None
NO_GPU = not torch.cuda.is_available()
TRAIN = ("train", "qv_lora", "--data", "upper", "--max-steps", "1")


@pytest.mark.skipif(not NO_FLASH_ATTN, reason="flash-attn is installed here")
def test_flash_attention_without_flash_attn_is_refused_for_every_command_and_model_source(tmp_path):
    from test_cli import run

    folder, _ = saved(tmp_path / "m")
    tiny_tokenizer().save_pretrained(folder)
    for model in ("tiny-llama", str(folder)):
        for command in (
            [*TRAIN, "--model", model, "--out", str(tmp_path / "run")],
            ["generate", "hi", "--model", model, "--base", "-n", "2"],
        ):
            result = run(*command, "--attn-implementation", "flash_attention_2")
            assert result.exit_code == 2, (command, result.output)
            assert (
                "flash-attn package is not installed" in result.output and "--attn-implementation sdpa" in result.output
            )
            assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    with pytest.raises(surgery.errors.DeviceError, match="flash-attn"):
        surgery.load_model("tiny-llama", attn_implementation="flash_attention_2")


def test_an_attention_implementation_is_applied_to_a_model_built_from_its_config():
    assert surgery.load_model("tiny-llama", attn_implementation="eager").model.config._attn_implementation == "eager"
    assert surgery.load_model("tiny-llama", attn_implementation="sdpa").model.config._attn_implementation == "sdpa"


def test_empty_values_and_a_backend_without_compile_are_refused_naming_the_option(tmp_path):
    from test_cli import run

    for extra, named in (
        (["--device", ""], "--device ''"),
        (["--device-map", "auto", "--max-memory", ""], "--max-memory is empty"),
        (["--compile-backend", "eager"], "--compile-backend does nothing without --compile"),
    ):
        result = run(*TRAIN, "--model", "tiny-llama", "--out", str(tmp_path / "run"), *extra)
        assert result.exit_code == 2 and named in result.output, (extra, result.output)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_max_memory_naming_a_gpu_the_machine_lacks_is_one_answer_for_every_model_source(tmp_path):
    from test_cli import run

    folder, _ = saved(tmp_path / "m")
    for model in ("tiny-llama", str(folder)):
        result = run(*TRAIN, "--model", model, "--out", str(tmp_path / "run"), "--device-map", "auto",
                     "--max-memory", "0=1GiB,cpu=4GiB")  # fmt: skip
        assert result.exit_code == 2, result.output
        assert "--max-memory 0=...: this machine has no CUDA GPU; name only cpu and disk" in result.output
        with pytest.raises(surgery.errors.DeviceError, match="this machine has no CUDA GPU"):
            surgery.load_model(model, device_map="auto", max_memory={0: 2**30, "cpu": 2**32})
    assert not (tmp_path / "run").exists()


def test_max_memory_too_small_for_the_base_names_max_memory_for_every_model_source(tmp_path):
    folder, _ = saved(tmp_path / "m")
    for model in ("tiny-llama", str(folder)):
        for rules in ((), quantizing("nf4")):
            with pytest.raises(surgery.errors.DeviceError) as caught:
                surgery.load_model(model, rules=rules, device_map="auto", max_memory={"cpu": 1024})
            message = str(caught.value)
            assert message.startswith("--max-memory cpu=1.0KiB holds too little of the base")
            assert "raise the limits" in message and "random-init" not in message
    assert surgery.load_model(str(folder), device_map="auto", max_memory={"cpu": 2**30}).model is not None


# 3. no false verdict: apply compares new tokens' fine-tunes with the base on the base's vocabulary.

EXTRA_RULES = """version: 1
quantize: int8
default: freeze
extra_tokens: [{first}, "<b>"]
rules:
  - match: "re:.*(q_proj|v_proj)"
    action: adapt
    lora: {{r: 4}}
"""


def test_apply_with_new_tokens_compares_on_the_base_vocabulary_and_says_so(write_rules):
    from test_cli import run

    from surgery.finetune.apply import apply

    rules = write_rules(EXTRA_RULES.format(first='"<a>"'))
    applied = apply(tiny_model("tiny-llama"), str(rules))
    assert applied.equal_at_init == (True,) and applied.new_tokens == 2
    result = run("apply", str(rules), "--model", "tiny-llama")
    assert result.exit_code == 0, result.output
    assert "equal (1/1 bit-identical on the base's vocabulary; the 2 new tokens' logits" in result.output


# 4. advice that helps: each message names the culprit and a remedy that works.


def test_a_new_token_already_in_the_vocabulary_is_named_with_its_rule_file_line(tmp_path, write_rules):
    from test_cli import run

    rules = write_rules(EXTRA_RULES.format(first="a"))
    result = run("train", str(rules), "--model", "tiny-llama", "--data", "upper", "--max-steps", "1",
                 "--out", str(tmp_path / "run"))  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"{rules}:4: extra token 'a' is already in the tokenizer's vocabulary (id 97)" in result.output.replace(
        "\n", ""
    )
    assert "rename it" in result.output and not (tmp_path / "run").exists()
