"""Adapter files: bit-exact round trips, base fingerprints, a corpus of bad files, atomic writes."""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import re
import struct

import pytest
import torch

import surgery
from surgery import AdapterStateError
from surgery.base.loading import build_from_config, config_from_dict
from surgery.base.tiny import tiny_model
from surgery.model.architectures import TINY_MODELS

RULES = sorted(surgery.bundled_rules())
INPUTS = {"input_ids": torch.tensor([[1, 5, 9, 20, 33, 7, 100, 2]])}


def trained(ft: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Give every trainable tensor a deterministic nudge, as a few training steps would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
    return ft


def tensors_of(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, as plain cloned tensors (for bit-identity checks)."""
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        out[name] = t.detach().clone()
    return out


def assert_same_tensors(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).logits


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_save_then_load_is_bit_exact(tmp_path, model, rules):
    base = tiny_model(model)
    ft = trained(surgery.rewrite(base, rules))
    path = surgery.save_adapter(ft, tmp_path / "ft.safetensors")
    again = surgery.load_adapter(base, path)
    assert again is not ft
    mine, theirs = surgery.base.ownership.own_state(ft), surgery.base.ownership.own_state(again)
    assert mine.keys() == theirs.keys() and mine
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
        assert mine[name] is not theirs[name]
    assert torch.equal(logits(ft), logits(again))


def test_file_holds_only_the_finetunes_own_tensors_and_self_describing_metadata(tmp_path):
    base = tiny_model("tiny-llama")
    ft = surgery.rewrite(base, "qv_lora")
    adapter = surgery.read_adapter(surgery.save_adapter(ft, tmp_path / "a.safetensors"))
    expected = {
        f"{p}.lora_{x}"
        for p in [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
        for x in "AB"
    }
    assert set(adapter.tensors) == expected
    assert adapter.base_model == "tiny-llama" and adapter.base_class == "LlamaForCausalLM"
    assert adapter.rules.to_json() == surgery.load_rules("qv_lora").to_json()
    assert adapter.metadata["format_version"] == "1" and adapter.metadata["surgery_version"] == surgery.__version__
    assert adapter.nbytes == sum(t.numel() * 4 for t in adapter.tensors.values())


def test_adapter_from_an_fp32_base_loads_onto_the_same_checkpoint_quantized(tmp_path):
    fp32_rules = {"quantize": "none", "default": "freeze", "rules": [{"match": "*_proj", "action": "adapt"}]}
    ft = trained(surgery.rewrite(tiny_model("tiny-llama"), fp32_rules))
    path = surgery.save_adapter(ft, tmp_path / "fp32.safetensors")
    for held in ("qv_lora", "qlora_nf4"):
        quantized = tiny_model("tiny-llama")
        surgery.rewrite(quantized, held)  # the base is now int8 / nf4
        loaded = surgery.load_adapter(quantized, path)
        for name, t in surgery.base.ownership.own_state(ft).items():
            assert torch.equal(surgery.base.ownership.own_state(loaded)[name], t)
        assert surgery.load_adapter(loaded, path) is loaded  # its rules follow the base; still compatible
    half = tiny_model("tiny-llama").half()
    assert surgery.fingerprint(half).mismatch(surgery.fingerprint(tiny_model("tiny-llama"))) is None


def test_loading_into_an_existing_finetune_replaces_its_state(tmp_path):
    base = tiny_model("tiny-opt")
    source = trained(surgery.rewrite(base, "qv_lora"), seed=1)
    path = surgery.save_adapter(source, tmp_path / "a.safetensors")
    target = surgery.rewrite(base, "qv_lora")
    assert surgery.load_adapter(target, path) is target
    assert torch.equal(logits(target), logits(source))
    other = surgery.rewrite(base, "all_linear_lora")
    with pytest.raises(AdapterStateError, match="other rules"):
        surgery.load_adapter(other, path)


# ------------------------------------------------------------------------------ bad-file corpus


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained tiny-opt qv_lora fine-tune, its base, and its adapter file."""
    folder = tmp_path_factory.mktemp("saved")
    base = tiny_model("tiny-opt")
    ft = trained(surgery.rewrite(base, "qv_lora"))
    return base, ft, surgery.save_adapter(ft, folder / "good.safetensors")


def _rewritten(path, tensors=None, metadata=None, out=None):
    """Write a variant of a good file with other tensors or metadata (re-sealed checksums when asked)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    data = tensors(data) if tensors else data
    meta = metadata(meta) if metadata else meta
    save_file(data, str(out), metadata=meta)
    return out


def _bad_files(saved, folder) -> dict[str, tuple]:
    """name -> (path, expected message fragment). Generated on the fly from the good file."""
    base, ft, good = saved
    raw = good.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    files = {}

    def write(name, data):
        p = folder / name
        p.write_bytes(data)
        return p

    for i in range(10):  # truncation at ten points through the file
        cut = max(1, len(raw) * i // 10)
        files[f"truncated_{i}"] = (write(f"trunc{i}.safetensors", raw[:cut]), "truncated|header claims|too short")
    rng = random.Random(0)
    for i in range(10):  # random byte flips in the header
        data = bytearray(raw)
        pos = rng.randrange(8, 8 + header_len)
        data[pos] ^= 1 << rng.randrange(8)
        files[f"flip_{i}"] = (
            write(f"flip{i}.safetensors", bytes(data)),
            "corrupted|checksum mismatch|header claims|without surgery adapter metadata|newer than",
        )
    files["header_claims_more"] = (
        write("claims.safetensors", struct.pack("<Q", len(raw) * 2) + raw[8:]),
        "header claims",
    )
    files["empty"] = (write("empty.safetensors", b""), "is empty")
    (folder / "adir.safetensors").mkdir(exist_ok=True)
    files["directory"] = (folder / "adir.safetensors", "is a directory")
    files["pickle"] = (write("model.bin", pickle.dumps({"lora_A": [1.0, 2.0]})), "never unpickles")
    files["torch_save"] = (folder / "model.pt", "never unpickles")
    torch.save({"w": torch.zeros(2)}, folder / "model.pt")
    files["missing"] = (folder / "nope.safetensors", "no such adapter file")
    files["plain_safetensors"] = (
        _rewritten(good, metadata=lambda m: {}, out=folder / "plain.safetensors"),
        "without surgery adapter metadata",
    )
    files["newer_version"] = (
        _rewritten(good, metadata=lambda m: _sealed({**m, "format_version": "99"}), out=folder / "newer.safetensors"),
        "newer than this surgery reads",
    )

    def rename(data):
        key = sorted(data)[0]
        data[key.replace("lora_A", "lora_X")] = data.pop(key)
        return data

    def reshape(data):
        key = sorted(data)[0]
        data[key] = torch.zeros(data[key].shape[0] + 1, data[key].shape[1])
        return data

    def retype(data):
        key = sorted(data)[0]
        data[key] = data[key].half()
        return data

    for name, change, message in [
        ("renamed_key", rename, "unexpected key 'model.decoder.layers.0.self_attn.q_proj.lora_X'"),
        ("reshaped", reshape, "has shape"),
        ("retyped", retype, "float16"),
    ]:
        files[name] = (
            _rewritten(
                good,
                tensors=change,
                metadata=lambda m, change=change: _resealed(good, m, change),
                out=folder / f"{name}.safetensors",
            ),
            message,
        )
    files["tensor_data_changed"] = (
        _rewritten(good, tensors=lambda d: {k: v + 1 for k, v in d.items()}, out=folder / "changed.safetensors"),
        "checksum mismatch",
    )

    other_arch = surgery.rewrite(tiny_model("tiny-llama"), "qv_lora")
    files["other_architecture"] = (
        surgery.save_adapter(other_arch, folder / "llama.safetensors"),
        "was saved on a LlamaForCausalLM",
    )
    other_weights = build_from_config(config_from_dict(TINY_MODELS["tiny-opt"]), device="cpu", seed=99)
    files["other_weights"] = (
        surgery.save_adapter(surgery.rewrite(other_weights, "qv_lora"), folder / "reseeded.safetensors"),
        "other weights",
    )
    return files


def _sealed(meta: dict) -> dict:
    """Metadata with a correct metadata checksum (a deliberate edit, not corruption)."""
    rest = {k: v for k, v in meta.items() if k not in ("metadata_sha256", "tensors_sha256")}
    return {
        **rest,
        "metadata_sha256": surgery.files.adapter_file._metadata_digest(rest),
        "tensors_sha256": meta["tensors_sha256"],
    }


def _resealed(good, meta: dict, change) -> dict:
    """Metadata whose tensor checksum matches the changed tensors (so the key/shape check speaks first)."""
    from safetensors.torch import load_file

    return {**meta, "tensors_sha256": surgery.files.adapter_file._tensors_digest(change(load_file(str(good))))}


def test_every_bad_file_is_refused_and_nothing_changes(saved, tmp_path):
    base, ft, _ = saved
    files = _bad_files(saved, tmp_path)
    assert len(files) == 34
    before_base, before_ft = tensors_of(base), tensors_of(ft)
    before_logits = logits(ft)
    for name, (path, fragment) in files.items():
        for target in (base, ft):
            with pytest.raises(AdapterStateError) as info:
                surgery.load_adapter(target, path)
            message = str(info.value)
            assert str(path) in message, (name, message)
            assert re.search(fragment, message), (name, message)
    assert_same_tensors(before_base, tensors_of(base))
    assert_same_tensors(before_ft, tensors_of(ft))
    assert torch.equal(before_logits, logits(ft))


def test_other_architecture_and_other_weights_are_told_apart(saved, tmp_path):
    files = _bad_files(saved, tmp_path)
    base = saved[0]
    with pytest.raises(AdapterStateError, match="LlamaForCausalLM"):
        surgery.load_adapter(base, files["other_architecture"][0])
    with pytest.raises(AdapterStateError, match="other weights of the same architecture"):
        surgery.load_adapter(base, files["other_weights"][0])


def test_rules_that_do_not_plan_on_the_base_are_refused_before_any_change(tmp_path):
    head_rules = {
        "quantize": "none",
        "default": "freeze",
        "rules": [{"match": "lm_head", "action": "plain", "untie": True}],
    }
    path = surgery.save_adapter(surgery.rewrite(tiny_model("tiny-opt"), head_rules), tmp_path / "a.safetensors")
    quantized = tiny_model("tiny-opt")
    surgery.rewrite(quantized, {"quantize": "int8", "default": "quantize"})  # lm_head is int8 now: no plain copy (C2)
    before = tensors_of(quantized)
    with pytest.raises(AdapterStateError, match="(?s)do not plan on this base.*C2"):
        surgery.load_adapter(quantized, path)
    assert_same_tensors(before, tensors_of(quantized))


def test_storage_follows_the_base_as_held(tmp_path):
    """An int8 file onto an nf4-held base: the adapters load, the base stays nf4."""
    path = surgery.save_adapter(trained(surgery.rewrite(tiny_model("tiny-opt"), "qv_lora")), tmp_path / "a.safetensors")
    nf4 = tiny_model("tiny-opt")
    surgery.rewrite(nf4, "qlora_nf4")
    ft = surgery.load_adapter(nf4, path)
    assert surgery.finetune_info(ft).plan.decisions["model.decoder.layers.0.self_attn.q_proj"].storage == "nf4"
    assert torch.equal(
        surgery.base.ownership.own_state(ft)["model.decoder.layers.0.self_attn.q_proj.lora_B"],
        surgery.read_adapter(path).tensors["model.decoder.layers.0.self_attn.q_proj.lora_B"],
    )


def test_a_failure_while_loading_restores_a_base_it_had_quantized(saved, tmp_path):
    """The rewrite quantizes the fp32 base, then the strict load fails: the base is fp32 again."""
    _, _, good = saved
    bad = _rewritten(
        good,
        tensors=lambda d: {**d, "extra.lora_A": torch.zeros(1)},
        metadata=lambda m: _resealed(good, m, lambda d: {**d, "extra.lora_A": torch.zeros(1)}),
        out=tmp_path / "extra.safetensors",
    )
    base = tiny_model("tiny-opt")
    modules_before = {name: type(m) for name, m in base.named_modules()}
    before = tensors_of(base)
    with pytest.raises(AdapterStateError, match="unexpected key 'extra.lora_A'"):
        surgery.load_adapter(base, bad)
    assert {name: type(m) for name, m in base.named_modules()} == modules_before
    assert_same_tensors(before, tensors_of(base))
    assert all(p.requires_grad for p in base.parameters())


# ------------------------------------------------------------------------------ atomic writes


def test_a_save_that_fails_midway_leaves_the_earlier_file_and_no_temp_file(saved, tmp_path, monkeypatch):
    _, ft, _ = saved
    path = surgery.save_adapter(ft, tmp_path / "a.safetensors")
    earlier = path.read_bytes()
    trained(ft, seed=5)
    real_fsync = os.fsync

    def crash(fd):
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(AdapterStateError, match="previous file, if any, is unchanged"):
        surgery.save_adapter(ft, path)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]

    class Interrupted(Exception):
        pass

    def interrupted(*args, **kwargs):
        raise Interrupted()

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(Interrupted):
        surgery.save_adapter(ft, path)
    assert path.read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_saving_something_that_is_not_a_finetune_is_refused(tmp_path):
    with pytest.raises(AdapterStateError, match="not a fine-tune"):
        surgery.save_adapter(tiny_model("tiny-opt"), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_saved_files_get_ordinary_permissions(saved, tmp_path):
    _, ft, _ = saved
    path = surgery.save_adapter(ft, tmp_path / "a.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_metadata_is_plain_json_a_user_can_read(saved):
    adapter = surgery.read_adapter(saved[2])
    rules = json.loads(adapter.metadata["rules"])
    assert rules["rules"][0]["action"] == "adapt"
    assert json.loads(adapter.metadata["base_fingerprint"])["architecture"] == adapter.fingerprint.architecture


def test_frozen_modules_of_an_adapter_file_follow_a_base_held_quantized(tmp_path, digest):
    """An adapter saved where the base kept embeddings and lm_head frozen in full precision loads onto a base that
    holds them int8 (finetuna's quantize_base_model): freeze becomes quantize-as-held for loading, nothing of the
    base changes; a rule set that would then quantize more than its own is refused (C1) instead."""
    import surgery.finetuna as finetuna

    rules = {"quantize": "none", "default": "freeze", "rules": [{"match": "q_proj", "action": "adapt"}]}
    path = surgery.save_adapter(trained(surgery.rewrite(tiny_model("tiny-opt"), rules)), tmp_path / "a.st")
    held = finetuna.quantize_base_model(tiny_model("tiny-opt"), set())  # lm_head and embeddings int8 too
    finetuna.new_finetuned(held, plain_layers=set())  # a first fine-tune: LLM.int8 state settles in the layers
    before = digest(held)
    loaded = surgery.load_adapter(held, path)
    assert digest(held) == before
    assert torch.equal(loaded.lm_head.weight, held.lm_head.weight)  # the base's own int8 tensor, shared
    for name, t in surgery.read_adapter(path).tensors.items():
        assert torch.equal(surgery.base.ownership.own_state(loaded)[name], t)
    explicit = {"quantize": "none", "default": "freeze", "rules": [{"match": "fc1", "action": "freeze"}]}
    explicit["rules"].append({"match": "q_proj", "action": "adapt"})
    path = surgery.save_adapter(surgery.rewrite(tiny_model("tiny-opt"), explicit), tmp_path / "b.st")
    surgery.load_adapter(held, path)  # the explicit freeze of fc1 follows the base too
    assert digest(held) == before
    partly = tiny_model("tiny-opt")
    surgery.rewrite(
        partly, {"quantize": "int8", "default": "freeze", "rules": [{"match": "fc1", "action": "quantize"}]}
    )
    settled = digest(partly)
    wide = {"quantize": "none", "default": "quantize", "rules": [{"match": "q_proj", "action": "adapt"}]}
    path = surgery.save_adapter(surgery.rewrite(tiny_model("tiny-opt"), wide), tmp_path / "c.st")
    with pytest.raises(AdapterStateError, match=r"C1.*fc1"):
        surgery.load_adapter(partly, path)  # following the base would quantize every other layer too: refused
    assert digest(partly) == settled


def test_a_finetune_is_one_type_that_needs_no_other_module_imported(tmp_path):
    """Built and saved in a fresh interpreter that imports only the module that makes fine-tunes: save_pretrained
    writes the adapter folder (never the base), and nothing surgery imports hooks every optimizer of the process."""
    import subprocess
    import sys

    code = (
        "import json, os, sys, torch, transformers\n"
        "from surgery.finetune.rewriting import rewrite\n"
        "config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,"
        " num_attention_heads=4, num_key_value_heads=2)\n"
        "torch.manual_seed(0)\n"
        "base = transformers.LlamaForCausalLM(config)\n"
        "ft = rewrite(base, 'qv_lora')\n"
        "ft.save_pretrained(sys.argv[1])\n"
        "from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks\n"
        "import surgery, surgery.finetuna, surgery.training.loop, surgery.finetune.batched  # everything, then look\n"
        "print(json.dumps({'files': sorted(os.listdir(sys.argv[1])), 'type': type(ft).__name__,\n"
        "  'is_finetune': isinstance(ft, surgery.Finetune),\n"
        "  'is_llama': isinstance(ft, transformers.LlamaForCausalLM),\n"
        "  'hooks': len(_global_optimizer_pre_hooks) + len(_global_optimizer_post_hooks)}))\n"
    )
    folder = tmp_path / "ft"
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"adapter.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= set(said["files"])
    assert "config.json" not in said["files"]  # the base is never written
    assert (folder / "model.safetensors").stat().st_size == (folder / "adapter.safetensors").stat().st_size
    assert said["type"] == "FinetuneLlamaForCausalLM" and said["is_finetune"] and said["is_llama"]
    assert said["hooks"] == 0
    assert set(surgery.read_adapter(folder).tensors) == {
        f"model.layers.{i}.self_attn.{p}_proj.lora_{m}" for i in (0, 1) for p in "qv" for m in "AB"
    }


def test_the_base_record_hangs_off_the_base_and_copies_of_it_are_new_bases():
    from surgery.base.shared_base import base_record

    base = tiny_model("tiny-opt")
    ft = surgery.rewrite(base, "qv_lora")
    record = base_record(base)
    assert base.__dict__["_surgery_base"] is record and ft in record.finetunes
    assert "_surgery_base" not in ft.__dict__  # a fine-tune is not a base
    twin = copy.deepcopy(base)
    assert base_record(twin) is not record and len(base_record(twin).finetunes) == 0
    assert len(record.finetunes) == 1
