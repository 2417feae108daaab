"""Models in the local HF cache, found through huggingface_hub and never online: a fake cache built in the exact
layout huggingface_hub writes (``models--org--name/{refs/main, snapshots/<commit>/..., blobs/<sha256>}``, the
snapshot's files relative links into ``blobs/``), checked first against huggingface_hub's own cache scanner. A hub id
loads from it, a LoftQ start reads a sharded checkpoint's full weights through its links, and a link that leaves
the cache's repository folder is still refused."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

import surgery
from surgery.base.loading import load_model, load_tokenizer, locate
from surgery.base.ownership import own_state
from surgery.base.sources import full_weights_of
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.disk import HF_SHARED_BLOBS_MARKER, check_inside
from surgery.errors import ModelConfigError, ModelNotFoundError, RewriteError

MAIN, OLD = "a" * 40, "b" * 40
IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))


def cache_model(
    cache: Path, repo_id: str, model, *, commit: str = MAIN, main: bool = True, tokenizer: bool = True, **save
) -> Path:
    """Save ``model`` (and the tiny tokenizer) into ``cache`` as huggingface_hub stores a download: each file as
    blobs/<sha256>, the snapshot's file a relative link to it, refs/main naming the commit. Returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    written = cache.parent / f"written-{repo.name}-{commit[:4]}"
    model.save_pretrained(written, **save)
    if tokenizer:
        tiny_tokenizer().save_pretrained(written)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (written / "generation_config.json").unlink()  # alike for every tiny model: no blob shared between models
    for file in sorted(written.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.move(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    written.rmdir()
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """An empty HF cache that HF_HUB_CACHE points at, and a process in which any network connection fails."""
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # even with the network allowed, nothing may try it

    def no_network(*args, **kwargs):
        pytest.fail("the network was contacted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return folder


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def loftq_rules():
    return {
        "version": 1,
        "quantize": {"scheme": "nf4", "double_quant": False},
        "default": "freeze",
        "rules": [
            {
                "match": "re:.*_proj",
                "type": "linear",
                "action": "adapt",
                "lora": {"r": 4, "alpha": 8, "init_lora_weights": "loftq"},
            }
        ],
    }


def test_the_fake_cache_is_the_layout_huggingface_hub_reads(cache):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    snapshot = cache_model(cache, "org/tiny", tiny_model("tiny-llama"))
    scanned = scan_cache_dir(cache)
    assert not scanned.warnings
    [repo] = scanned.repos
    [revision] = repo.revisions
    assert (repo.repo_id, repo.repo_type, revision.commit_hash, revision.refs) == ("org/tiny", "model", MAIN, {"main"})
    assert all(f.file_path.is_symlink() and f.blob_path.parent.name == "blobs" for f in revision.files)
    assert try_to_load_from_cache("org/tiny", "config.json", cache_dir=cache) == str(snapshot / "config.json")


def test_a_model_in_the_cache_loads_by_its_hub_id_with_its_tokenizer(cache):
    snapshot = cache_model(cache, "org/tiny", tiny_model("tiny-llama"))
    loaded = load_model("org/tiny")
    assert loaded.source == "hub-cache" and loaded.has_weights and type(loaded.model).__name__ == "LlamaForCausalLM"
    assert locate("org/tiny") == ("hub-cache", snapshot.resolve())
    assert torch.equal(logits(loaded.model), logits(tiny_model("tiny-llama")))
    assert load_tokenizer("org/tiny")("hi").input_ids == tiny_tokenizer()("hi").input_ids
    meta = load_model("org/tiny", weights=False)
    assert meta.source == "hub-cache" and next(meta.model.parameters()).is_meta


def test_refs_main_names_the_snapshot_else_the_newest_is_taken(cache):
    old = cache_model(cache, "org/tiny", tiny_model("tiny-gpt2"), commit=OLD, main=False, tokenizer=False)
    new = cache_model(cache, "org/tiny", tiny_model("tiny-llama"), commit=MAIN, main=False)
    repo = cache / "models--org--tiny"
    old_blobs, new_blobs = ({(s / f).resolve() for f in os.listdir(s)} for s in (old, new))
    assert not old_blobs & new_blobs  # huggingface_hub dates a snapshot by its newest blob: none shared
    for blobs, when in ((old_blobs, 1_000_000_000), (new_blobs, 2_000_000_000)):
        for blob in blobs:
            os.utime(blob, (when, when))
    assert locate("org/tiny") == ("hub-cache", new.resolve())  # no refs/main: the newest snapshot
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(OLD)
    assert locate("org/tiny") == ("hub-cache", old.resolve())  # refs/main wins over a newer snapshot
    assert type(load_model("org/tiny").model).__name__ == "GPT2LMHeadModel"


def test_a_name_that_is_not_cached_keeps_its_message(cache):
    cache_model(cache, "org/tiny", tiny_model("tiny-llama"))
    for name in ("org/other", "org/tiny/extra", "not a hub id"):
        with pytest.raises(ModelNotFoundError, match="not in the local HF cache \\(no network is used\\)"):
            load_model(name)
    with pytest.raises(ModelNotFoundError, match="no tokenizer for 'org/other'.*local HF cache"):
        load_tokenizer("org/other")
    (cache / "models--org--empty" / "snapshots").mkdir(parents=True)  # a download that never finished
    assert locate("org/empty") == ("missing", None)


def test_a_loftq_start_reads_a_sharded_cached_checkpoint_through_its_links(cache):
    snapshot = cache_model(cache, "org/sharded", tiny_model("tiny-llama"), max_shard_size=250_000)
    shards = sorted(p.name for p in snapshot.iterdir() if p.name.startswith("model"))
    assert shards == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    expected = own_state(surgery.rewrite(tiny_model("tiny-llama"), loftq_rules()))
    base = load_model("org/sharded", rules=loftq_rules()).model
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())  # quantized while loading: W only on disk
    got = own_state(surgery.rewrite(base, loftq_rules()))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_transformers_model_named_by_its_hub_id_finds_its_cached_checkpoint(cache):
    snapshot = cache_model(cache, "org/tiny", tiny_model("tiny-llama"))
    model = tiny_model("tiny-llama")
    model.name_or_path = "org/tiny"  # as from_pretrained("org/tiny") names it
    weights = full_weights_of(model)
    assert weights.folder == snapshot.resolve() and weights.missing(["model.layers.0.self_attn.q_proj"]) == []


def test_a_shard_linked_out_of_the_cache_repository_is_refused_before_anything_changes(cache, tmp_path, digest):
    snapshot = cache_model(cache, "org/sharded", tiny_model("tiny-llama"), max_shard_size=250_000)
    base = load_model("org/sharded", rules=loftq_rules()).model
    shard = snapshot / "model-00002-of-00002.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(shard, outside)  # the same bytes, but outside the cache's repository folder
    shard.unlink()
    shard.symlink_to(outside)
    before = digest(base)
    with pytest.raises(RewriteError, match="is a link to .*elsewhere.safetensors, outside its folder and its HF cache"):
        surgery.rewrite(base, loftq_rules())
    assert digest(base) == before


def test_links_into_another_repository_or_an_unmarked_blob_store_are_refused(cache):
    snapshot = cache_model(cache, "org/tiny", tiny_model("tiny-llama"))
    other = cache_model(cache, "org/other", tiny_model("tiny-gpt2"))
    check_inside(snapshot, "config.json", error=RewriteError)  # the cache's own layout: accepted
    (snapshot / "stolen.json").symlink_to(os.path.relpath((other / "config.json").resolve(), snapshot))
    with pytest.raises(RewriteError, match="stolen.json: is a link to .*models--org--other.*outside its folder"):
        check_inside(snapshot, "stolen.json", error=RewriteError)

    # huggingface_hub's cache-wide store: <cache>/blobs/<2 hex>/<64 hex>, the repository's blob a link into it
    blob = (snapshot / "config.json").resolve()
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    stored = cache / "blobs" / digest[:2] / digest
    stored.parent.mkdir(parents=True)
    shutil.move(blob, stored)
    blob.symlink_to(os.path.relpath(stored, blob.parent))
    with pytest.raises(RewriteError, match="outside its folder and its HF cache repository"):
        check_inside(snapshot, "config.json", error=RewriteError)  # not marked as huggingface_hub's store
    (cache / "blobs" / HF_SHARED_BLOBS_MARKER).write_text("1\n")
    check_inside(snapshot, "config.json", error=RewriteError)
    with pytest.raises(ModelConfigError, match="stolen.json: is a link to .*outside its folder"):
        load_model("org/tiny")  # the whole snapshot is gated before transformers reads it
    (snapshot / "stolen.json").unlink()
    assert load_model("org/tiny").source == "hub-cache"


def test_a_folder_outside_any_cache_still_refuses_links_out_of_itself(tmp_path):
    folder = tmp_path / "snapshots" / "abc"  # named like a snapshot, but not in a repository folder
    folder.mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    (folder / "config.json").symlink_to(tmp_path / "secret")
    with pytest.raises(RewriteError, match="outside its folder; surgery reads only"):
        check_inside(folder, "config.json", error=RewriteError)
