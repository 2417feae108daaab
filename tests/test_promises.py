"""What surgery promises under hostile input: isolation, crash-safe runs, no hang, one clear error.

Each class of the reliability issue has its own corpus here. Every refusal is checked for its error
class, the key words of its message, bounded work (limits by size, depth or steps; a hang guard of minutes
where a hang is the failure mode, never a clock) and that nothing changed (base, siblings, files).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery.base.ownership import own_state
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.distributed import rank_seed, world
from surgery.errors import (
    AdapterStateError,
    DataError,
    ModelConfigError,
    PlanError,
    RewriteError,
    RuleFileError,
    TrainError,
)
from surgery.rules.rule_file import load_rules, parse_rules
from surgery.training.checkpoint import latest_checkpoint, read_checkpoint, run_lock
from surgery.training.config import DataConfig
from surgery.training.data import read_examples
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import train_jobs as train
from surgery_cli.app import app

TOK = tiny_tokenizer()
FP32_RULES = {
    "quantize": "none",
    "default": "freeze",
    "rules": [
        {"match": "q_proj", "action": "adapt", "lora": {"r": 4, "dropout": 0.1}},
        {"match": "lm_head", "action": "plain", "untie": True},
    ],
}
SLOW_PATTERN = r"re:(.*)(.*)(.*)(.*)(.*)(.*)(.*)(.*)\1\."  # backtracks for hours on any module name


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def logits(model, ids=torch.tensor([[3, 9, 27, 81, 200, 7]])) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def step(ft, seed=0):
    """One plain PyTorch training step over the fine-tune's trainable tensors."""
    torch.manual_seed(seed)
    ids = torch.randint(0, 256, (2, 12))
    opt = torch.optim.AdamW([p for p in ft.parameters() if p.requires_grad], lr=1e-2)
    ft.train()
    ft(input_ids=ids, labels=ids).loss.backward()
    opt.step()


# ============================================================================ 1. isolation


def test_nothing_done_through_a_finetune_reaches_the_base_or_a_sibling(digest):
    base = tiny_model("tiny-llama")
    sibling = surgery.rewrite(base, FP32_RULES)
    ft = surgery.rewrite(base, FP32_RULES)
    base_before, sibling_before = digest(base), digest(sibling)

    with pytest.raises(RewriteError, match="shares with its base.*`plain` rule"):
        ft.requires_grad_(True)
    for p in ft.parameters():  # around the guard: flags set by hand, then an optimizer over everything
        p.requires_grad = True
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(RewriteError, match="shares with its base.*made trainable by hand"):
        ft(input_ids=ids, labels=ids)  # no gradient can reach a shared tensor: the fine-tune does not run
    assert all(p.grad is None for p in base.parameters())
    for p in base.parameters():
        p.requires_grad_(False)

    twin = copy.deepcopy(ft)
    assert surgery.finetune_info(twin).base is base  # the same shared base, not a copy of it
    assert {id(p) for p in own_state(twin).values()}.isdisjoint(id(p) for p in own_state(ft).values())
    assert torch.equal(logits(twin), logits(ft))
    mine = {k: v.clone() for k, v in own_state(ft).items()}
    step(twin)
    assert all(torch.equal(mine[k], v) for k, v in own_state(ft).items())  # training the copy left ft alone

    restored = pickle.loads(pickle.dumps(ft))
    assert surgery.finetune_info(restored) is not None and torch.equal(logits(restored), logits(ft))
    step(ft)
    assert digest(base) == base_before and digest(sibling) == sibling_before


def test_a_meta_model_is_refused_by_rewrite_but_planned():
    meta = surgery.load_model("facebook/opt-125m", weights=False).model
    surgery.plan(surgery.trace(meta), "qv_lora")
    with pytest.raises(RewriteError, match="meta device.*needs real weights"):
        surgery.rewrite(meta, "qv_lora")


@pytest.mark.parametrize(
    "first,second,setting",
    [
        ({"scheme": "nf4"}, {"scheme": "nf4", "double_quant": True}, "double_quant"),
        ({"scheme": "nf4"}, {"scheme": "nf4", "blocksize": 128}, "blocksize"),
        (
            {"scheme": "nf4", "compute_dtype": "float32"},
            {"scheme": "nf4", "compute_dtype": "bfloat16"},
            "compute_dtype",
        ),
        ({"scheme": "int8"}, {"scheme": "int8", "threshold": 0.0}, "threshold"),
    ],
)
def test_other_quantization_settings_on_a_quantized_base_are_a_c1_violation(first, second, setting, digest):
    base = tiny_model("tiny-llama")
    surgery.rewrite(base, {"quantize": first, "rules": [{"match": "q_proj", "action": "adapt"}]})
    before = digest(base)
    with pytest.raises(PlanError, match=f"{setting}.*held") as info:
        surgery.rewrite(base, {"quantize": second, "rules": [{"match": "q_proj", "action": "adapt"}]})
    assert set(info.value.constraints) == {"C1"}
    assert digest(base) == before


def test_4bit_weights_repacked_for_the_cpu_kernel_are_read_as_usual(tmp_path):
    import bitsandbytes as bnb

    base = tiny_model("tiny-llama")
    ft = surgery.rewrite(base, "qlora_nf4")
    sibling = surgery.rewrite(base, "qlora_nf4")
    with torch.no_grad():
        for p in own_state(sibling).values():
            p.add_(0.02)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(
        m.support_avx512bf16_for_cpu for m in [*ft.modules(), *base.modules()] if isinstance(m, bnb.nn.Linear4bit)
    )  # surgery never lets bitsandbytes repack
    merged_before, print_before = logits(surgery.merge(sibling)), surgery.fingerprint(base)
    program = surgery.export_graph(sibling, torch.tensor([[1, 2, 3, 4]]))
    for m in layers:  # what an eval forward on an AVX512-BF16 CPU does to the shared weight objects
        m.weight.data, m.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
            m.weight.data, m.weight.quant_state
        )
    assert layers[0].weight.quant_state.packing_format_for_cpu
    # Repacking stores each block's absmax in bf16, so the weights now differ from before by that rounding
    # (double quantization re-rounds them) and no more: read as the standard layout they would be off by whole weights.
    merged_after = logits(surgery.merge(sibling))
    assert (merged_after - merged_before).abs().max() <= 2e-2 * merged_before.abs().max(), float(
        (merged_after - merged_before).abs().max() / merged_before.abs().max()
    )
    assert surgery.fingerprint(base).mismatch(print_before) is None
    ids = torch.tensor([[1, 2, 3, 4]])
    eager = logits(sibling, ids)
    assert (program.module()(input_ids=ids) - eager).abs().max() <= 2e-2 * eager.abs().max()
    assert (eager - logits(surgery.merge(sibling), ids)).abs().max() <= 1e-5 * eager.abs().max()


def test_a_base_changed_in_place_gets_a_new_fingerprint(tmp_path):
    base = tiny_model("tiny-opt")
    ft = surgery.rewrite(base, FP32_RULES | {"rules": [FP32_RULES["rules"][0]]})
    path = surgery.save_adapter(ft, tmp_path / "a.safetensors")
    with torch.no_grad():
        for p in base.parameters():
            p.data.copy_(torch.randn_like(p))  # same objects, new values (through .data: no version bump)
    with pytest.raises(AdapterStateError, match="other weights"):
        surgery.load_adapter(base, path)


# ============================================================================ 2. runs


def _job(base, out=None, rules="qv_lora_head", **config):
    settings = {"batch_size": 8, "lr": 1e-2, "max_steps": 6, "seed": 0, **config}
    return make_job(
        base,
        name="job",
        rules=rules,
        data="upper",
        tokenizer=TOK,
        config=TrainConfig(**settings),
        data_config=DataConfig(block_size=24),
        out=out,
        model_name="tiny-llama",
    )


def test_a_second_run_on_the_same_out_fails_at_once(tmp_path):
    out = tmp_path / "run"
    with run_lock(out):
        assert (out / ".surgery.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(TrainError, match=f"another surgery run \\(pid {os.getpid()}\\)"):
            train([_job(tiny_model("tiny-llama"), out=out)])
    assert not (out / ".surgery.lock").exists()
    (out / ".surgery.lock").write_text("999999\n")  # left by a crashed run: the kernel lock died with it
    train([_job(tiny_model("tiny-llama"), out=out, max_steps=2)])
    assert (out / "adapter.safetensors").is_file() and not (out / ".surgery.lock").exists()


def test_a_non_finite_loss_stops_the_job_and_keeps_the_last_good_files(tmp_path):
    base = tiny_model("tiny-llama")
    out = tmp_path / "run"
    job = _job(base, out=out, save_steps=2, max_steps=6)

    def poison(run, record):
        if run.step == 3:
            with torch.no_grad():
                next(iter(own_state(run.job.finetune).values())).fill_(float("nan"))

    # Which check fires first (the loss, or the gradient norm when the CPU's kernels keep the loss finite) is not
    # the promise; that step 4 is never taken and the last good files stay is.
    with pytest.raises(TrainError, match="job job: step 4: (loss|gradient norm) nan is not finite"):
        train([job], on_step=poison)
    assert latest_checkpoint(out).name == "checkpoint-2"
    assert not (out / "adapter.safetensors").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("lr", float("nan"), "--lr must be a finite number > 0"),
        ("lr", float("inf"), "--lr must be a finite"),
        ("lr", -1.0, "--lr must be"),
        ("weight_decay", float("nan"), "--weight-decay must be a finite"),
        ("weight_decay", -0.1, "--weight-decay"),
        ("max_grad_norm", float("inf"), "--max-grad-norm must be a finite"),
        ("max_grad_norm", -1.0, "--max-grad-norm"),
        ("seed", 1 << 64, "--seed must be between"),
        ("seed", -(1 << 63) - 1, "--seed must be between"),
    ],
)
def test_bad_option_values_are_refused_before_anything(option, value, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig(**{option: value})


@pytest.mark.parametrize(
    "lora,message",
    [
        ({"alpha": float("nan")}, "alpha must be a finite"),
        ({"alpha": float("inf")}, "alpha must be a finite"),
        ({"dropout": float("nan")}, "dropout must be in"),
        ({"r": 10**9}, "r must be an integer from 1"),
    ],
)
def test_non_finite_lora_settings_are_refused(lora, message):
    with pytest.raises(RuleFileError, match=message):
        parse_rules({"rules": [{"match": "q_proj", "action": "adapt", "lora": lora}]})


def test_a_pad_token_outside_the_vocabulary_is_refused():
    base = tiny_model("tiny-llama")
    with pytest.raises(DataError, match="--pad-token-id 100000 is outside the model's vocabulary"):
        make_job(
            base,
            name="j",
            rules="qv_lora_head",
            data="upper",
            tokenizer=TOK,
            config=TrainConfig(),
            data_config=DataConfig(pad_token_id=100_000),
        )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train([_job(tiny_model("tiny-llama"), out=out, save_steps=2, max_steps=4)])
    return out / "checkpoint-2"


def _edit_state(folder: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "training_state.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(meta["state"])
    state, tensors = change(state, tensors)
    save_file(tensors, str(path), metadata={"state": json.dumps(state)})


@pytest.mark.parametrize(
    "case,change,message",
    [
        ("step_not_int", lambda s, t: ({**s, "step": "two"}, t), "step is missing or not a int"),
        ("no_optimizer", lambda s, t: ({k: v for k, v in s.items() if k != "optimizer"}, t), "optimizer is missing"),
        (
            "groups_not_list",
            lambda s, t: ({**s, "optimizer": {**s["optimizer"], "param_groups": 3}}, t),
            "param_groups",
        ),
        ("rng_short", lambda s, t: (s, {**t, "rng": t["rng"][..., :100]}), "random state 'rng'"),
        ("rng_float", lambda s, t: (s, {**t, "rng": t["rng"].float()}), "random state 'rng'"),
        (
            "optimizer_tensor_gone",
            lambda s, t: (s, {k: v for k, v in t.items() if not k.endswith("exp_avg")}),
            "has entries",
        ),
        (
            "scheduler_wrong",
            lambda s, t: ({**s, "scheduler": {"last_epoch": "x", "base_lrs": None}}, t),
            "cannot be resumed",
        ),
        ("not_json", None, "unreadable training state"),
    ],
)
def test_a_damaged_training_state_is_one_clear_error(checkpoint, tmp_path, case, change, message):
    import shutil

    folder = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, folder)
    if change is None:
        (folder / "training_state.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    else:
        _edit_state(folder, change)
    job = _job(tiny_model("tiny-llama"), out=tmp_path / "again", save_steps=2, max_steps=4)
    with pytest.raises(TrainError, match=message) as info:
        train([job], resume={"job": folder})
    assert "training_state.safetensors" in str(info.value)


def test_a_resume_needs_the_same_global_batch_not_the_same_process_count(monkeypatch):
    base = tiny_model("tiny-llama")
    alone = _job(base, batch_size=8)
    monkeypatch.setenv("WORLD_SIZE", "2")
    two = _job(base, batch_size=4)
    assert alone.identity == two.identity and alone.identity["global_batch"] == 8


def test_each_rank_draws_its_own_dropout_but_rank_0_keeps_the_seed():
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(8)}) == 8
    assert all(0 <= rank_seed(s, r) < 1 << 64 for s in (0, (1 << 64) - 1) for r in range(4))


def test_accelerate_cpu_launch_that_collapsed_to_one_process_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(TrainError, match="--multi_gpu --num_processes N"):
        world()


def test_a_model_folder_without_a_tokenizer_names_the_missing_tokenizer(tmp_path):
    tiny_model("tiny-llama").save_pretrained(tmp_path / "m")
    with pytest.raises(ModelConfigError, match="holds no tokenizer.*--tokenizer"):
        surgery.base.loading.load_tokenizer(str(tmp_path / "m"))


# ---------------------------------------------------------------------- kill loop


def _wait_for_progress(made, child, what: str) -> None:
    """Poll until ``made()`` (the child got somewhere) or the child ended: kill points relative to the child's
    progress, so a loaded machine changes when they fall, never whether there is anything to find after them."""
    for _ in range(30_000):  # 10 ms apart: a hang guard of 5 minutes, not a clock
        if made() or not child.is_alive():
            return
        time.sleep(0.01)
    pytest.fail(f"the child made no progress in 5 minutes ({what})")


def _checkpoint_step(out: Path) -> int:
    found = latest_checkpoint(out)
    return int(found.name.split("-")[1]) if found is not None else 0


def test_killed_runs_lose_nothing_and_always_resume(tmp_path, monkeypatch):
    import multiprocessing
    import random

    here = str(Path(__file__).parent)  # Python 3.11's fork server ignores sys.path: give it the path to preload
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])]))
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["kill_child"])
    import kill_child

    out = tmp_path / "run"
    rng = random.Random(0)
    for kill in range(20):
        ready, start = context.Event(), _checkpoint_step(out)
        child = context.Process(target=kill_child.run, args=(str(out), 100_000, ready))
        child.start()
        assert ready.wait(300), "the training child did not start"
        if kill % 2:  # every other kill comes after a new checkpoint, whatever the machine's load
            _wait_for_progress(lambda s=start: _checkpoint_step(out) > s, child, f"a checkpoint after step {start}")
        time.sleep(rng.uniform(0.0, 0.6))
        child.kill()  # SIGKILL: no cleanup of any kind
        child.join()
        visible = [p for p in out.iterdir() if p.name.startswith("checkpoint-")] if out.exists() else []
        for folder in visible:  # every checkpoint anyone can pick is complete
            state, _ = read_checkpoint(folder)
            surgery.read_adapter(folder / "adapter.safetensors")
            assert state["step"] == int(folder.name.split("-")[1])
    steps = read_checkpoint(latest_checkpoint(out))[0]["step"]
    ready = context.Event()
    finish = context.Process(target=kill_child.run, args=(str(out), steps + 2, ready))
    finish.start()
    finish.join(300)
    assert finish.exitcode == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 3))  # no step logged twice after resumes
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # leftovers cleaned up


@pytest.mark.parametrize("kind", ["adapter", "peft"])
def test_a_folder_killed_while_written_loads_as_before_as_after_or_is_refused(tmp_path, monkeypatch, kind):
    """kill -9 at random points of save_pretrained / export_peft rewriting one folder with two fine-tunes in turn."""
    import multiprocessing
    import random

    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])]))
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["kill_child"])
    import kill_child

    from surgery.files.peft_format import read_peft_folder

    finetunes = kill_child.two_finetunes()
    expected = [{k: v.detach().clone() for k, v in own_state(ft).items()} for ft in finetunes]
    folder, rng, outcomes = tmp_path / "folder", random.Random(kind), []
    for _ in range(10):
        ready = context.Event()
        child = context.Process(target=kill_child.write_folders, args=(str(folder), kind, ready))
        child.start()
        assert ready.wait(300), "the writing child did not start"
        _wait_for_progress(folder.exists, child, "the folder's first writing")  # then rewritten until killed
        time.sleep(rng.uniform(0.05, 0.4))
        child.kill()
        child.join()
        try:
            if kind == "adapter":
                got = surgery.read_adapter(folder).tensors
                outcomes.append(
                    next(
                        i
                        for i, e in enumerate(expected)
                        if e.keys() == got.keys() and all(torch.equal(e[k], got[k]) for k in e)
                    )
                )
            else:
                got = read_peft_folder(folder).tensors
                exports = [
                    len(t) == len(got) and all(torch.equal(got[k], t[k]) for k in got)
                    for t in (kill_child_peft_tensors(ft) for ft in finetunes)
                ]
                outcomes.append(exports.index(True))
        except AdapterStateError as exc:  # the only other acceptable state: refused, saying why
            assert "interrupted" in str(exc), exc
            outcomes.append("refused")
    assert len(outcomes) == 10 and set(outcomes) <= {0, 1, "refused"}, outcomes  # never a mix, never a crash


@pytest.mark.parametrize("kind", ["adapter", "peft"])
def test_a_crash_between_two_files_of_a_folder_is_refused_not_mixed(tmp_path, monkeypatch, kind):
    """The window the kill loop may miss, made certain: the process dies after the first file is renamed."""
    import kill_child

    from surgery.files.peft_format import read_peft_folder

    first, second = kill_child.two_finetunes()
    write = (
        (lambda ft: ft.save_pretrained(tmp_path))
        if kind == "adapter"
        else (lambda ft: surgery.export_peft(ft, tmp_path))
    )
    read = surgery.read_adapter if kind == "adapter" else read_peft_folder
    write(first)
    real, calls = os.replace, []

    def dies_on_the_second_file(src, dst):
        if not str(dst).endswith(".surgery-files.json"):
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt("killed")  # no cleanup code of surgery's runs past this point
        return real(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        write(second)
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(AdapterStateError, match="interrupted.*save the folder again"):
        read(tmp_path)
    write(second)  # saving again mends it
    assert read(tmp_path) is not None


def kill_child_peft_tensors(ft) -> dict:
    from surgery.files.peft_format import peft_adapter

    return peft_adapter(ft)[1]


# ============================================================================ 3. no hang, no exhaustion


def _special_files(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, links to endless devices, and a sparse file larger than any reader's limit."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    files = {"fifo": fifo}
    for device in ("/dev/zero", "/dev/urandom"):
        link = tmp_path / f"link-to-{Path(device).name}"
        link.symlink_to(device)
        files[link.name] = link
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(65 << 30)  # 65 GiB of holes: no disk used
    files["huge"] = huge
    return files


READERS = {
    "rule file": (lambda p: load_rules(p), RuleFileError),
    "adapter file": (lambda p: surgery.read_adapter(p), AdapterStateError),
    "data file": (lambda p: read_examples(p.rename(p.with_suffix(".jsonl")) if p.suffix != ".jsonl" else p), DataError),
}


def test_the_hang_guard_fails_the_test_it_guards_and_nothing_else(no_hang, monkeypatch):
    """What guards the tests below: a call stuck for good fails its test as an ordinary failure (no signal, no
    exception raised into whatever frame runs when a clock expires), and the stuck call is left behind."""
    import threading

    import conftest

    assert no_hang(lambda: 42) == 42  # a result comes back, an exception is raised in the test as it was
    with pytest.raises(ZeroDivisionError):
        no_hang(lambda: 1 / 0)
    stuck = threading.Event()
    monkeypatch.setattr(conftest, "HANG_SECONDS", 0.1)  # a wait that never ends fails at any limit; a short one here
    with pytest.raises(pytest.fail.Exception, match="no_hang wait.*still runs after 0.1 s: it hangs"):
        no_hang(stuck.wait)
    stuck.set()  # let the abandoned worker end


@pytest.mark.parametrize("reader", READERS)
def test_special_and_oversized_files_are_refused_at_once(tmp_path, reader, no_hang):
    read, error = READERS[reader]
    for name, path in _special_files(tmp_path).items():
        with pytest.raises(error, match="regular file|at most|is a device|is a FIFO") as info:
            no_hang(read, path)
        assert "Traceback" not in str(info.value), name


def test_special_files_inside_peft_and_model_folders_are_refused(tmp_path, no_hang):
    for name, path in _special_files(tmp_path).items():
        folder = tmp_path / f"peft-{name}"
        folder.mkdir()
        (folder / "adapter_config.json").symlink_to(path)
        with pytest.raises(AdapterStateError, match="regular file|at most|outside its folder"):
            no_hang(surgery.import_peft, tiny_model("tiny-opt"), folder)  # a link out of the folder: refused
        model = tmp_path / f"model-{name}"
        model.mkdir()
        (model / "config.json").symlink_to(path)
        with pytest.raises(ModelConfigError, match="regular file|at most|outside its folder"):
            no_hang(surgery.load_model, str(model))


BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
    + "rules: []\n"
)


@pytest.mark.parametrize(
    "case,text,message",
    [
        ("alias bomb", BOMB, "anchors and aliases are expanded"),
        (
            "merge-key bomb",
            "a: &a {x: 1, y: 2}\n"
            + "".join(
                f"m{i}: &m{i} {{<<: [{', '.join(['*a'] + [f'*m{j}' for j in range(max(0, i - 3), i)])}], k{i}: 1}}\n"
                for i in range(60)
            )
            + "rules: []\n",
            "anchors and aliases are expanded|nested deeper",
        ),
        ("deep flow nesting", "rules: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
        ("deep block nesting", "rules:\n" + "".join("  " * i + "- \n" for i in range(1, 60)), "nested deeper"),
        ("unhashable key", "rules:\n  - ? [a, b]\n    : 1\n", ":2: a mapping key must be a plain value"),
        ("oversize repeat", "rules:\n  - match: 're:a{99999999999}'\n    action: adapt\n", ":2: rule 1: bad regex"),
    ],
)
def test_hostile_yaml_is_refused_quickly_with_file_and_line(write_rules, case, text, message, no_hang):
    path = write_rules(text)
    with pytest.raises(RuleFileError, match=message) as info:
        no_hang(load_rules, path)
    assert str(info.value).startswith(str(path))


def test_a_backtracking_pattern_cannot_hang_plan_or_load_adapter(write_rules, tmp_path, tiny_graphs, digest, no_hang):
    path = write_rules(f"rules:\n  - match: '{SLOW_PATTERN}'\n    action: adapt\n")
    with pytest.raises(RuleFileError, match=r"rules.yaml:2: .*catastrophic backtracking"):
        no_hang(surgery.plan, tiny_graphs["tiny-opt"], path)
    good, base = _saved_adapter(tmp_path)
    crafted = _with_metadata(
        good,
        tmp_path / "slow.safetensors",
        rules=json.dumps(
            {
                "version": 1,
                "quantize": {"scheme": "none"},
                "default": "freeze",
                "rules": [{"match": SLOW_PATTERN, "action": "adapt"}],
            }
        ),
    )
    before = digest(base)
    with pytest.raises(AdapterStateError, match="catastrophic backtracking"):
        no_hang(surgery.load_adapter, base, crafted)
    assert digest(base) == before


def _saved_adapter(tmp_path: Path):
    base = tiny_model("tiny-opt")
    ft = surgery.rewrite(
        base, {"quantize": "none", "default": "freeze", "rules": [{"match": "q_proj", "action": "adapt"}]}
    )
    return surgery.save_adapter(ft, tmp_path / "good.safetensors"), base


def _with_metadata(good: Path, out: Path, raw_header: dict | None = None, **changes) -> Path:
    """A copy of ``good`` with metadata fields replaced and the metadata checksum re-sealed (a crafted file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(good), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    rest = {k: v for k, v in meta.items() if k not in ("metadata_sha256", "tensors_sha256")}
    meta["metadata_sha256"] = surgery.files.adapter_file._metadata_digest(rest)
    save_file(tensors, str(out), metadata=meta)
    return out


def _fingerprint_json(good: Path, change) -> str:
    data = json.loads(surgery.read_adapter(good).metadata["base_fingerprint"])
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    "case,field,value,message",
    [
        (
            "100k rules",
            "rules",
            lambda good: json.dumps({"rules": [{"match": f"m{i}", "action": "freeze"} for i in range(100_000)]}),
            "rule file|at most",
        ),
        ("deep rules JSON", "rules", lambda good: "[" * 100_000 + "]" * 100_000, "rule|nested|JSON"),
        (
            "no probes",
            "base_fingerprint",
            lambda good: _fingerprint_json(good, lambda d: (d["probes"].clear(), d["bounds"].clear())),
            "probed weights",
        ),
        (
            "NaN probe",
            "base_fingerprint",
            lambda good: _fingerprint_json(
                good, lambda d: d["probes"][next(iter(d["probes"]))].__setitem__(0, float("nan"))
            ),
            "not a finite number",
        ),
        (
            "huge bound",
            "base_fingerprint",
            lambda good: _fingerprint_json(
                good, lambda d: d["bounds"][next(iter(d["bounds"]))].__setitem__(0, float("inf"))
            ),
            "not a finite number",
        ),
        (
            "probe list too long",
            "base_fingerprint",
            lambda good: _fingerprint_json(
                good, lambda d: [d[k][next(iter(d[k]))].extend([0.0] * 1000) for k in ("probes", "bounds")]
            ),
            "equal length up to",
        ),
        (
            "probes of another weight",
            "base_fingerprint",
            lambda good: _fingerprint_json(
                good,
                lambda d: [
                    d[k].__setitem__("model.nothing.weight", d[k].pop(next(iter(d[k])))) for k in ("probes", "bounds")
                ],
            ),
            "does not probe alike",
        ),
        (
            "digest not hex",
            "base_fingerprint",
            lambda good: _fingerprint_json(good, lambda d: d.__setitem__("architecture", "x" * 64)),
            "sha256",
        ),
    ],
)
def test_crafted_adapter_metadata_is_refused_quickly(tmp_path, case, field, value, message, digest, no_hang):
    good, base = _saved_adapter(tmp_path)
    crafted = _with_metadata(good, tmp_path / "crafted.safetensors", **{field: value(good)})
    before = digest(base)
    with pytest.raises(AdapterStateError, match=message):
        no_hang(surgery.load_adapter, base, crafted)
    assert digest(base) == before


def test_a_data_section_with_a_gap_is_refused(tmp_path):
    import struct

    good, _ = _saved_adapter(tmp_path)
    raw = good.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    for name in names[1:]:  # shift every tensor after the first by 4 bytes: a gap
        header[name]["data_offsets"] = [o + 4 for o in header[name]["data_offsets"]]
    first_end = header[names[0]]["data_offsets"][1]
    body = raw[8 + length :]
    text = json.dumps(header).encode()
    crafted = tmp_path / "gap.safetensors"
    crafted.write_bytes(struct.pack("<Q", len(text)) + text + body[:first_end] + b"\0" * 4 + body[first_end:])
    with pytest.raises(AdapterStateError, match="unused bytes between tensors"):
        surgery.read_adapter(crafted)


def test_deeply_nested_jsonl_is_a_data_error_with_its_line(tmp_path, no_hang):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "fine"}\n' + '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match="deep.jsonl:2: JSON nested too deeply"):
        no_hang(read_examples, path)


# ============================================================================ 4. offline


def test_a_cached_hub_model_without_a_tokenizer_fails_at_once_even_with_the_network_allowed(tmp_path):
    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc"
    tiny_model("tiny-llama").save_pretrained(snapshot)
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("abc")
    # "at once" is "without asking the network": a child process of ours records every socket it would open
    code = (
        "import sys\nasked = []\n"
        "sys.addaudithook(lambda event, args: event.startswith(('socket.connect', 'socket.getaddrinfo')) "
        "and asked.append((event, str(args)[:80])))\n"
        "import surgery.base.loading as m\n"
        "try:\n    m.load_tokenizer('someone/tiny')\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
        "print('network', asked)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_ETAG_TIMEOUT": "20"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "ModelConfigError" in result.stdout and "holds no tokenizer" in result.stdout, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("network []"), result.stdout


# ============================================================================ 5. CLI: one line, exit 2

runner = CliRunner()


def _cli_cases(tmp_path: Path) -> dict[str, list[str]]:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    adapter = tmp_path / "ok.safetensors"
    assert runner.invoke(app, ["apply", "qv_lora", "--model", "tiny-opt", "--out", str(adapter)]).exit_code == 0
    adapter = tmp_path / "ok-1.safetensors" if not adapter.exists() else adapter
    bad_sizes = tmp_path / "bad-sizes"
    config = tiny_model("tiny-llama").config.to_dict() | {"num_attention_heads": 5}
    bad_sizes.mkdir()
    (bad_sizes / "config.json").write_text(json.dumps(config))
    not_causal = tmp_path / "vit"
    not_causal.mkdir()
    (not_causal / "config.json").write_text(
        json.dumps(
            {
                "model_type": "vit",
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
            }
        )
    )
    no_tokenizer = tmp_path / "no-tok"
    tiny_model("tiny-llama").save_pretrained(no_tokenizer)
    under_file = str(blocker / "out")
    return {
        "apply --out under a file": ["apply", "qv_lora", "--model", "tiny-opt", "--out", f"{under_file}/a.safetensors"],
        "merge --out under a file": ["merge", str(adapter), "--out", under_file],
        "export-peft --out under a file": ["export-peft", str(adapter), "--out", under_file],
        "import-peft from a missing folder": ["import-peft", str(tmp_path / "nope"), "--out", str(tmp_path / "x")],
        "train --out under a file": [
            "train",
            "qv_lora_head",
            "--model",
            "tiny-llama",
            "--data",
            "upper",
            "--out",
            under_file,
            "--max-steps",
            "1",
        ],
        "config with bad sizes": ["plan", "qv_lora", "--model", str(bad_sizes)],
        "not a causal LM": ["inspect", str(not_causal)],
        "folder without tokenizer": [
            "train",
            "qv_lora_head",
            "--model",
            str(no_tokenizer),
            "--data",
            "upper",
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "1",
        ],
        "lr nan": [
            "train",
            "qv_lora_head",
            "--model",
            "tiny-llama",
            "--data",
            "upper",
            "--out",
            str(tmp_path / "r2"),
            "--lr",
            "nan",
        ],
    }


def test_every_cli_user_error_is_one_line_and_exit_2(tmp_path):
    for case, args in _cli_cases(tmp_path).items():
        before = folder_digest(tmp_path)
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (case, result.output, result.exception)
        assert "Traceback" not in result.output and result.output.count("error:") == 1, (case, result.output)
        assert folder_digest(tmp_path) == before, case


# ============================================================================ 6. data as users mean it


def test_csv_quoted_fields_bom_and_bad_bytes(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes('\ufeffid,text\n1,"line one\nline two, with ""quotes"""\n2,plain\n'.encode())
    assert [e.completion for e in read_examples(path)] == ['line one\nline two, with "quotes"', "plain"]
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="b.jsonl:2: not UTF-8"):
        read_examples(bad)


def test_a_txt_corpus_is_one_running_text(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("It was a dark\nand stormy night.\n\nThe end.\n")
    assert [e.completion for e in read_examples(path, "corpus")] == [path.read_text()]
    assert [e.completion for e in read_examples(path, "entries")] == ["It was a dark", "and stormy night.", "The end."]
    blocks = surgery.training.data.tokenize(read_examples(path, "corpus"), TOK, block_size=8, mode="corpus")
    assert int((blocks.input_ids == TOK.eos_token_id).sum()) <= 1  # no EOS at every line break


# ============================================================================ 7. distributed


def test_a_finetune_wrapped_by_fsdp1_refuses_to_run(tmp_path):
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ft = surgery.rewrite(tiny_model("tiny-llama"), FP32_RULES)
        wrapped = FullyShardedDataParallel(ft, use_orig_params=True, device_id=torch.device("cpu"))
        with pytest.raises(RewriteError, match="wrapped by FSDP1.*not supported on fine-tunes"):
            wrapped(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        dist.destroy_process_group()
