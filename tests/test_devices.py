"""Devices: --device on every command that runs a model, one clear error for a device that is not there, the
device options checked before anything loads, and what each command's first line says."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from surgery.base.loading import load_model
from surgery.errors import DeviceError
from surgery_cli.app import app

MODEL_COMMANDS = {  # every command that runs a model, with the arguments it needs before the device
    "train": ["train", "qv_lora", "--model", "tiny-llama", "--data", "upper", "--max-steps", "1", "--out", "OUT/run"],
    "generate": ["generate", "owl ->", "--model", "tiny-llama", "-n", "2"],
    "apply": ["apply", "qv_lora", "--model", "tiny-llama"],
    "demo": ["demo", "--steps", "1", "--out", "OUT/demo"],
    "merge": ["merge", "ADAPTER", "--out", "OUT/merged"],
    "export-peft": ["export-peft", "ADAPTER", "--out", "OUT/peft"],
    "import-peft": ["import-peft", "OUT/peft", "--out", "OUT/imported.safetensors"],
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_a_cuda_device_without_cuda_is_one_clear_error(spec):
    with pytest.raises(DeviceError, match="no CUDA GPU.*--device cpu"):
        load_model("tiny-llama", device=spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:0", "auto:1", ""])
def test_a_device_that_is_not_one_is_named(spec):
    from surgery.devices import resolve_device

    with pytest.raises(DeviceError, match="auto.*cpu.*cuda"):
        resolve_device(spec)


def test_auto_is_the_cpu_without_cuda_and_max_memory_reads_like_accelerate():
    from surgery.devices import parse_max_memory, resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert parse_max_memory("0=20GiB, cuda:1=500MiB,cpu=1.5GB") == {0: 20 * 2**30, 1: 500 * 2**20, "cpu": 1.5e9}
    for bad in ("0=20 parsecs", "gpu0=1GiB", "0=1GiB,0=2GiB", "20GiB", ","):
        with pytest.raises(DeviceError, match="--max-memory"):
            parse_max_memory(bad)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device-adapter")
    done = CliRunner().invoke(
        app, ["apply", "qv_lora", "--model", "tiny-llama", "--out", str(folder / "a.safetensors")]
    )
    assert done.exit_code == 0, done.output
    return folder / "a.safetensors"


def _args(command: str, tmp_path, adapter) -> list[str]:
    return [a.replace("OUT", str(tmp_path)).replace("ADAPTER", str(adapter)) for a in MODEL_COMMANDS[command]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
def test_every_command_that_runs_a_model_refuses_cuda_without_cuda_in_one_line(command, tmp_path, adapter):
    done = CliRunner().invoke(app, [*_args(command, tmp_path, adapter), "--device", "cuda"])
    assert done.exit_code == 2, done.output
    assert "no CUDA GPU" in done.output and "--device cpu" in done.output and "Traceback" not in done.output
    assert not any(p.name != adapter.name for p in tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("command", ["train", "generate", "apply", "merge"])
def test_device_cpu_runs_and_the_first_line_says_where(command, tmp_path, adapter):
    done = CliRunner().invoke(app, [*_args(command, tmp_path, adapter), "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert "device cpu" in done.output.splitlines()[0]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--max-memory", "0=1GiB"], "--max-memory does nothing without --device-map"),
        (["--device-map", "sequential"], "--device-map must be auto or balanced"),
        (["--device-map", "auto", "--max-memory", "0=lots"], "--max-memory 0="),
        (["--device-map", "auto", "--fsdp"], "--device-map places one process's base"),
        (["--attn-implementation", "fast"], "--attn-implementation must be"),
        (["--device", "tpu"], "--device 'tpu'"),
    ],
)
def test_device_options_are_checked_before_anything_loads(extra, message, tmp_path, adapter, monkeypatch):
    import surgery.base.loading

    monkeypatch.setattr(surgery.base.loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    done = CliRunner().invoke(app, [*_args("train", tmp_path, adapter), *extra])
    assert done.exit_code == 2 and message in done.output, done.output
    assert not (tmp_path / "run").exists()


def test_sdpa_and_eager_attention_give_the_same_outputs(tmp_path):
    from surgery.base.loading import tiny_model

    tiny_model("tiny-llama").save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for attention in ("sdpa", "eager"):
        base = load_model(str(tmp_path / "m"), rules="qlora_nf4", attn_implementation=attention).model
        assert base.config._attn_implementation == attention
        outputs[attention] = base(ids).logits
    scale = outputs["eager"].abs().max()
    assert (outputs["sdpa"] - outputs["eager"]).abs().max() <= 1e-5 * scale  # fp32: softmax order only
