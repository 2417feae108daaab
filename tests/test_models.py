import socket

import pytest
import torch

import surgery
from surgery.base.loading import load_model
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.model.architectures import ARCHITECTURES


def test_tiny_models_are_deterministic_and_on_cpu():
    a, b = tiny_model("tiny-llama"), tiny_model("tiny-llama")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.device.type == "cpu"
        assert torch.equal(p, q), name


def test_tiny_tokenizer_round_trips_bytes():
    tok = tiny_tokenizer()
    text = "héllo, wörld! 123\n"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)


def test_bundled_architecture_builds_on_meta_with_published_size():
    loaded = load_model("facebook/opt-1.3b", weights=False)
    params = list(loaded.model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert sum(p.numel() for p in params) == 1_315_758_080
    assert params[0].dtype == torch.float16  # the published checkpoint's dtype


PUBLISHED_PARAMETERS = {  # the parameter counts of the published checkpoints
    "facebook/opt-125m": 125_239_296,
    "facebook/opt-350m": 331_196_416,
    "facebook/opt-1.3b": 1_315_758_080,
    "facebook/opt-6.7b": 6_658_473_984,
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "EleutherAI/gpt-j-6B": 6_050_882_784,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "google/gemma-2-9b": 9_241_705_984,
    "microsoft/Phi-3-medium-4k-instruct": 13_960_238_080,
}


def test_every_bundled_architecture_is_listed_with_its_published_size():
    assert set(PUBLISHED_PARAMETERS) == set(ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_bundled_parameter_counts_match_published_models(name):
    model = load_model(name, weights=False).model
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]
    assert all(p.device.type == "meta" for p in model.parameters())


def test_unknown_model_fails_at_once_with_alternatives(monkeypatch):
    asked = []  # "at once": without asking the network for it (a socket opened here is recorded and refused)

    def refuse(*args, **kwargs):
        asked.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(surgery.ModelNotFoundError) as err:
        load_model("facebook/opt-13b")
    assert asked == []
    msg = str(err.value)
    assert "facebook/opt-1.3b" in msg and "--random-init" in msg and "tiny-opt" in msg


def test_architecture_without_weights_needs_random_init():
    with pytest.raises(surgery.ModelNotFoundError, match="--random-init"):
        load_model("facebook/opt-125m")


def test_local_directory_with_and_without_weights(tmp_path):
    model = tiny_model("tiny-opt")
    model.save_pretrained(tmp_path / "full")
    loaded = load_model(str(tmp_path / "full"))
    assert loaded.source == "directory" and loaded.has_weights
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded.model(ids).logits, model(ids).logits)

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    with pytest.raises(surgery.ModelNotFoundError, match="--random-init"):
        load_model(str(tmp_path / "cfg"))
    random = load_model(str(tmp_path / "cfg"), random_init=True)
    assert not random.has_weights and next(random.model.parameters()).device.type == "cpu"
    meta = load_model(str(tmp_path / "cfg"), weights=False)
    assert next(meta.model.parameters()).device.type == "meta"


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(surgery.ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_hub_id_is_found_in_the_local_cache(tmp_path, monkeypatch):
    snap = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    tiny_model("tiny-gpt2").save_pretrained(snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    loaded = load_model("acme/tiny")
    assert loaded.source == "hub-cache" and type(loaded.model).__name__ == "GPT2LMHeadModel"
