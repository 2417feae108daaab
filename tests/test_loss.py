"""The chunked causal LM loss (``surgery.training.loss``) against transformers' own full-logits loss: the same loss and
gradients (every trainable parameter and the hidden states) for every kind of output layer, padding, packing, new
token rows, soft-capped and scaled architectures, head dropout and mixed precision; no (tokens x vocabulary) tensor
saved for backward, and the live logits bounded by one chunk."""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import noop_context_fn
from transformers.loss.loss_utils import ForCausalLMLoss

import surgery
from surgery.base.tiny import tiny_model
from surgery.errors import TrainError
from surgery.finetune.batched import batched, route
from surgery.random_state import new_rng
from surgery.training.data import IGNORE, TOKENS, Blocks, pack
from surgery.training.job import checkpoint_activations
from surgery.training.loss import (
    DEFAULT_CHUNK_TOKENS,
    LogitStep,
    causal_lm_loss,
    causal_lm_parts,
    chunked_lm_loss,
    replaying,
)
from surgery.training.offload import ActivationOffload, offloaded_activations

ADAPT = {"tiny-llama": "re:.*(q_proj|v_proj)", "tiny-opt": "re:.*(q_proj|v_proj)", "tiny-gpt2": "c_attn"}
EMBEDDING = {"tiny-llama": "embed_tokens", "tiny-opt": "embed_tokens", "tiny-gpt2": "wte"}
TIED = ("tiny-opt", "tiny-gpt2")
HEADS = ["frozen", "int8", "nf4", "lora", "lora-int8", "lora-nf4", "plain"]
FP32 = 1e-6  # relative error (2-norm) allowed in fp32: summation order only
BF16 = torch.finfo(torch.bfloat16).eps  # 2^-7: under bf16 autocast each chunk's head gradients are rounded to bf16


def rules(model: str, head: str, dropout: float = 0.0, **more) -> dict:
    """LoRA on the attention of ``model`` and its output layer as ``head`` says: frozen, quantized, LoRA over a
    full-precision or quantized layer, or trained plain (with the embedding where the base ties them: one tensor)."""
    storage = {"int8": "int8", "nf4": "nf4", "lora-int8": "int8", "lora-nf4": "nf4"}.get(head, "none")
    lora = {"r": 4, "alpha": 8, "dropout": dropout, "init": "gaussian"}
    out_layer = {
        "frozen": [{"match": "lm_head", "action": "freeze"}],
        "int8": [{"match": "lm_head", "action": "quantize"}],
        "nf4": [{"match": "lm_head", "action": "quantize"}],
        "plain": [{"match": "lm_head", "action": "plain"}]
        + ([{"match": EMBEDDING[model], "action": "plain"}] if model in TIED else []),
    }.get(head, [{"match": "lm_head", "action": "adapt", "lora": lora}])
    attention = {"match": ADAPT[model], "action": "adapt", "lora": {"r": 4, "alpha": 8}}
    return {"version": 1, "quantize": storage, "default": "freeze", **more, "rules": [*out_layer, attention]}


def finetune(model: str, head: str, dropout: float = 0.0, **more) -> torch.nn.Module:
    """A fine-tune of the bundled ``model`` whose trainable tensors are nudged off their start (B = 0 gives zero
    gradients to A), in training mode."""
    ft = surgery.rewrite(tiny_model(model), rules(model, head, dropout, **more))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable(ft):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return ft.train()


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error in the 2-norm."""
    return float((got.double() - expected.double()).norm() / expected.double().norm())


def loss_and_grads(compute, wrt: list[torch.Tensor], seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``compute()``'s loss and its gradients, from a fixed random state (dropout draws alike in both losses)."""
    torch.manual_seed(seed)
    loss = compute()
    return loss.detach(), list(torch.autograd.grad(loss, wrt))


def assert_same(ours, full, tolerance: float = FP32) -> None:
    (loss, grads), (expected_loss, expected_grads) = ours, full
    assert rel(loss, expected_loss) <= tolerance, (float(loss), float(expected_loss))
    errors = [rel(g, e) for g, e in zip(grads, expected_grads)]
    assert max(errors) <= tolerance, errors
    assert all(e.abs().sum() > 0 for e in expected_grads)  # every gradient compared is a real one


def padded_batch(vocab: int = 260) -> dict[str, torch.Tensor]:
    """Two rows, the second right-padded (mask 0, label -100), with prompt tokens out of the loss."""
    ids = torch.randint(0, vocab, (2, 23), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :4] = IGNORE  # a prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("model", list(ADAPT))
def test_equals_the_model_s_own_loss_and_gradients_for_every_kind_of_output_layer(model, head):
    ft = finetune(model, head)
    parts = causal_lm_parts(ft)
    kinds = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}
    expected_kind = kinds.get(head, "LoraLinear" if "lora" in head else "Linear")
    assert type(parts.head).__name__ == expected_kind
    if head == "plain" and model in TIED:  # the trained head is the trained embedding: one tensor, two uses
        assert ft.get_output_embeddings().weight is ft.get_input_embeddings().weight
    batch, params = padded_batch(), trainable(ft)
    full = loss_and_grads(lambda: ft(**batch, use_cache=False).loss, params)
    ours = loss_and_grads(lambda: causal_lm_loss(parts, **batch, chunk_tokens=7), params)
    assert_same(ours, full)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("model", list(ADAPT))
def test_gradients_with_respect_to_the_hidden_states_equal_those_of_the_full_logits(model, head):
    ft = finetune(model, head)
    head_layer = ft.get_output_embeddings()
    hidden = torch.randn(2, 19, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    labels = torch.randint(0, 260, (2, 19), generator=torch.Generator().manual_seed(3))
    labels[0, :5] = IGNORE
    wrt = [hidden, *[p for p in trainable(head_layer)]]
    full = loss_and_grads(lambda: ForCausalLMLoss(head_layer(hidden), labels, 260), wrt)
    ours = loss_and_grads(lambda: chunked_lm_loss(hidden, head_layer, labels, chunk_tokens=6), wrt)
    assert_same(ours, full)


@pytest.mark.parametrize("chunk", [1, 5, 16, 45, 46, 1000, DEFAULT_CHUNK_TOKENS])
def test_any_chunk_size_gives_the_same_loss_and_gradients(chunk):
    """2 x 23 tokens: chunks that do not divide 46, that equal it, and one larger than it."""
    ft = finetune("tiny-llama", "lora-nf4")
    parts, batch, params = causal_lm_parts(ft), padded_batch(), trainable(ft)
    full = loss_and_grads(lambda: ft(**batch, use_cache=False).loss, params)
    ours = loss_and_grads(lambda: causal_lm_loss(parts, **batch, chunk_tokens=chunk), params)
    assert_same(ours, full)


@pytest.mark.parametrize(("model", "keep_apart"), [("tiny-llama", "positions"), ("tiny-opt", "bool")])
def test_packed_rows_with_restarting_positions_give_the_model_s_own_loss(model, keep_apart):
    lengths = [9, 5, 12, 7, 3]
    ids = torch.randint(1, 260, (len(lengths), 16), generator=torch.Generator().manual_seed(4))
    mask = (torch.arange(16) < torch.tensor(lengths)[:, None]).long()
    blocks = Blocks(ids * mask, (ids * mask).masked_fill(mask == 0, IGNORE), mask, "made here")
    packed = pack(blocks, keep_apart)
    batch = {k: v for k, v in packed.batch(torch.arange(len(packed))).items() if k != TOKENS}
    assert (batch["position_ids"] == 0).sum() > len(packed)  # examples restart inside rows
    ft = finetune(model, "lora")
    parts, params = causal_lm_parts(ft), trainable(ft)
    full = loss_and_grads(lambda: ft(**batch, use_cache=False).loss, params)
    ours = loss_and_grads(lambda: causal_lm_loss(parts, **batch, chunk_tokens=5), params)
    assert_same(ours, full)


@pytest.mark.parametrize("head", ["lora", "lora-nf4", "plain"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_under_bf16_autocast_the_loss_and_gradients_agree_to_bf16_rounding(model, head):
    ft = finetune(model, head)
    parts, batch, params = causal_lm_parts(ft), padded_batch(), trainable(ft)

    def under_bf16(compute):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return compute()

        return run

    full = loss_and_grads(under_bf16(lambda: ft(**batch, use_cache=False).loss), params)
    ours = loss_and_grads(under_bf16(lambda: causal_lm_loss(parts, **batch, chunk_tokens=7)), params)
    assert full[0].dtype == ours[0].dtype == torch.float32
    assert_same(ours, full, tolerance=2 * BF16)
    whole = loss_and_grads(under_bf16(lambda: causal_lm_loss(parts, **batch, chunk_tokens=1000)), params)
    assert_same(whole, full, tolerance=FP32)  # one chunk: the very operations of the full loss


@pytest.mark.parametrize("model", list(ADAPT))
def test_new_token_rows_get_their_gradients(model):
    ft = finetune(model, "frozen", extra_tokens=["<tool>", "</tool>"])
    parts = causal_lm_parts(ft)
    assert type(parts.head).__name__ == "ExtraTokenHead"
    batch = padded_batch()
    batch["input_ids"][:, 6:8] = torch.tensor([260, 261])  # the new ids, as inputs and as targets
    batch["labels"][:, 6:8] = torch.tensor([260, 261])
    params = trainable(ft)
    assert sum(p.shape[0] == 2 for p in params) == (1 if model in TIED else 2)  # the new rows, tied where the base is
    full = loss_and_grads(lambda: ft(**batch, use_cache=False).loss, params)
    ours = loss_and_grads(lambda: causal_lm_loss(parts, **batch, chunk_tokens=7), params)
    assert_same(ours, full)


SMALL = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
ARCHITECTURES = {
    "gemma2": (dict(final_logit_softcapping=0.02), LogitStep("softcap", 0.02)),
    "cohere": (dict(logit_scale=4.0), LogitStep("multiply", 4.0)),
    "granite": (dict(logits_scaling=0.25), LogitStep("divide", 0.25)),
}


def small_model(kind: str, **fields) -> torch.nn.Module:
    """A randomly initialised model of ``kind`` with small widths, built from its transformers config."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(kind, **SMALL, **fields)
    return transformers.AutoModelForCausalLM.from_config(config).train()


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_soft_capped_and_scaled_architectures_give_their_own_loss_and_gradients(kind):
    fields, step = ARCHITECTURES[kind]
    model = small_model(kind, **fields)
    parts = causal_lm_parts(model)
    assert parts.steps == (step,)
    batch, params = padded_batch(300), trainable(model)
    full = loss_and_grads(lambda: model(**batch, use_cache=False).loss, params)
    ours = loss_and_grads(lambda: causal_lm_loss(parts, **batch, chunk_tokens=7), params)
    assert_same(ours, full)
    with torch.no_grad():  # the step matters: the head alone gives other logits
        logits = model(input_ids=batch["input_ids"]).logits
        assert rel(parts.head(parts.hidden_states(input_ids=batch["input_ids"])), logits) > 1e-2


def test_a_model_that_computes_more_than_its_output_layer_is_refused_by_name():
    class DoubledLogits(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = DoubledLogits(tiny_model("tiny-llama").config)
    with pytest.raises(TrainError, match="DoubledLogits computes more than its output layer"):
        causal_lm_parts(model)


def test_a_model_whose_loss_does_not_shift_the_labels_is_refused_by_name():
    config = transformers.BartConfig(
        vocab_size=300, d_model=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, is_decoder=True
    )
    with pytest.raises(TrainError, match="BartForCausalLM.*does not shift the labels"):
        causal_lm_parts(transformers.BartForCausalLM(config))


def test_a_logit_field_set_on_an_architecture_surgery_does_not_know_is_refused():
    model = tiny_model("tiny-llama")
    model.config.final_logit_softcapping = 30.0  # LlamaForCausalLM ignores it: a custom class might not
    with pytest.raises(TrainError, match="LlamaForCausalLM: its config sets final_logit_softcapping=30.0"):
        causal_lm_parts(model)


def test_the_probe_leaves_training_modes_and_the_random_state_as_they_were():
    ft = finetune("tiny-gpt2", "lora", dropout=0.1)
    ft.transformer.h[0].eval()
    modes = [m.training for m in ft.modules()]
    state = torch.get_rng_state()
    causal_lm_parts(ft)
    assert [m.training for m in ft.modules()] == modes
    assert torch.equal(torch.get_rng_state(), state)


def test_dropout_in_a_lora_output_layer_draws_the_same_masks_in_backward():
    """The reference draws the head's masks chunk by chunk from the same random state and keeps the full logits: a
    recomputation in backward with other masks would give other gradients."""
    ft = finetune("tiny-llama", "lora", dropout=0.5)
    head = ft.get_output_embeddings()
    hidden = torch.randn(2, 19, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    labels = torch.randint(0, 260, (2, 19), generator=torch.Generator().manual_seed(3))
    wrt = [hidden, *trainable(head)]

    def same_draws():
        rows = hidden.reshape(-1, 64)
        logits = torch.cat([head(rows[i : i + 6]) for i in range(0, len(rows), 6)])
        return ForCausalLMLoss(logits.reshape(2, 19, 260), labels, 260)

    full = loss_and_grads(same_draws, wrt, seed=5)
    ours = loss_and_grads(lambda: chunked_lm_loss(hidden, head, labels, chunk_tokens=6), wrt, seed=5)
    assert_same(ours, full)
    other = loss_and_grads(same_draws, wrt, seed=6)
    assert rel(other[1][0], full[1][0]) > 1e-2  # the masks do matter


@pytest.mark.parametrize("replay", [True, False])
def test_a_batched_view_s_output_layer_replays_each_job_s_own_random_state(replay):
    """The batched path: a job's rows through the view's routed output layer, whose LoRA dropout draws from the job's
    own state (swapped in by the layer); ``replaying`` makes the recomputation draw the forward's masks again and
    leaves the job's stream where the forward left it. Without it the gradients are other ones."""
    base = tiny_model("tiny-llama")
    fts = [surgery.rewrite(base, rules("tiny-llama", "lora", dropout=0.5)).train() for _ in range(2)]
    for k, ft in enumerate(fts):
        with torch.no_grad():
            for p in trainable(ft):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) * 0.05)
    view = batched(base, fts).train()
    view_head = view.get_output_embeddings()
    hidden = torch.randn(2, 19, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    labels = torch.randint(0, 260, (2, 19), generator=torch.Generator().manual_seed(3))
    wrt = [hidden, *trainable(fts[1].get_output_embeddings())]

    def run(states, chunked):
        def head(rows):  # job 1's rows only: routed per call, as many rows as the chunk has
            route(view, [0, rows.shape[0]], states)
            return view_head(rows)

        if chunked:
            context_fn = replaying(states, 1) if replay else noop_context_fn
            return chunked_lm_loss(hidden, head, labels, chunk_tokens=6, context_fn=context_fn)
        rows = hidden.reshape(-1, 64)
        logits = torch.cat([head(rows[i : i + 6]) for i in range(0, len(rows), 6)])
        return ForCausalLMLoss(logits.reshape(2, 19, 260), labels, 260)

    alone, together = [None, new_rng(7, hidden.device)], [None, new_rng(7, hidden.device)]
    full = loss_and_grads(lambda: run(alone, chunked=False), wrt)
    ours = loss_and_grads(lambda: run(together, chunked=True), wrt)
    if replay:
        assert_same(ours, full)
        assert torch.equal(together[1], alone[1])  # the job's stream goes on as after one draw of each mask
    else:
        assert rel(ours[1][0], full[1][0]) > 1e-2


def test_the_body_s_checkpointing_and_the_chunks_combine():
    ft = finetune("tiny-opt", "lora-int8")
    checkpoint_activations(ft)
    parts, batch, params = causal_lm_parts(ft), padded_batch(), trainable(ft)
    full = loss_and_grads(lambda: ft(**batch, use_cache=False).loss, params)
    ours = loss_and_grads(lambda: causal_lm_loss(parts, **batch, chunk_tokens=7), params)
    assert_same(ours, full)


def test_num_items_in_batch_and_a_batch_without_targets_are_as_transformers_has_them():
    ft = finetune("tiny-llama", "lora")
    parts, batch = causal_lm_parts(ft), padded_batch()
    full = ft(**batch, num_items_in_batch=torch.tensor(100), use_cache=False).loss
    ours = causal_lm_loss(parts, **batch, num_items_in_batch=torch.tensor(100), chunk_tokens=7)
    assert rel(ours, full) <= FP32
    nothing = {**batch, "labels": torch.full_like(batch["labels"], IGNORE)}
    assert torch.isnan(ft(**nothing, use_cache=False).loss) and torch.isnan(causal_lm_loss(parts, **nothing))
    empty = chunked_lm_loss(torch.zeros(0, 64, requires_grad=True), parts.head, torch.zeros(0, dtype=torch.long))
    empty.backward()  # no tokens at all: a loss that still reaches the head
    assert torch.isnan(empty)


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True, "512"])
def test_a_chunk_size_that_is_not_a_whole_number_of_tokens_is_refused(chunk):
    parts = causal_lm_parts(tiny_model("tiny-llama"))
    with pytest.raises(TrainError, match="chunk_tokens must be a whole number of tokens >= 1"):
        causal_lm_loss(parts, **padded_batch(), chunk_tokens=chunk)


def test_labels_of_another_shape_are_refused():
    parts = causal_lm_parts(tiny_model("tiny-llama"))
    batch = padded_batch()
    with pytest.raises(TrainError, match=r"labels have shape \(2, 22\) but input_ids \(2, 23\)"):
        causal_lm_loss(parts, **{**batch, "labels": batch["labels"][:, 1:]})
    with pytest.raises(TrainError, match="labels have shape"):
        chunked_lm_loss(torch.zeros(2, 23, 64), parts.head, batch["labels"][:, 1:])


# Structure: what is saved for backward and what lives at once, with a vocabulary large enough that the full
# logits (2 x 300 tokens x 4099 x 4 bytes = 9.8 MB) dwarf everything else.
VOCAB, TOKENS_PER_ROW, CHUNK = 4099, 300, 64


class WideTensors(TorchDispatchMode):
    """Every tensor an operation makes whose last dimension is the vocabulary (2 or more dimensions), tracked by
    storage until it dies: the peak bytes alive at once and the largest one."""

    def __init__(self, width: int):
        super().__init__()
        self.width, self.live, self.now, self.peak, self.largest = width, {}, 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.width:
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        self.largest = max(self.largest, t.numel())
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]


def wide_head() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A LoRA-adapted output layer over a 4099-token vocabulary (one-layer Llama), hidden states and labels."""
    config = transformers.LlamaConfig(**{**SMALL, "vocab_size": VOCAB, "num_hidden_layers": 1})
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    rule = {"match": "lm_head", "action": "adapt", "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "init": "gaussian"}}
    ft = surgery.rewrite(base, {"version": 1, "quantize": "none", "default": "freeze", "rules": [rule]}).train()
    hidden = torch.randn(2, TOKENS_PER_ROW, 32, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, TOKENS_PER_ROW))
    return ft.get_output_embeddings(), hidden, labels


def test_no_tensor_as_wide_as_the_vocabulary_is_saved_for_backward():
    head, hidden, labels = wide_head()
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full = ForCausalLMLoss(head(hidden), labels, VOCAB)
    assert any(s[-1:] == (VOCAB,) for s in saved)  # the full loss saves its logits: the hook sees them
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_lm_loss(hidden, head, labels, chunk_tokens=CHUNK)
    assert saved and not [s for s in saved if s[-1:] == (VOCAB,)]
    assert rel(loss.detach(), full.detach()) < 1e-2  # the same loss, up to the head's dropout masks
    loss.backward()


def test_the_logits_alive_at_once_are_one_chunk_s_in_forward_and_backward():
    head, hidden, labels = wide_head()
    chunk_bytes = CHUNK * VOCAB * 4
    with WideTensors(VOCAB) as full:
        ForCausalLMLoss(head(hidden), labels, VOCAB).backward()
    assert full.largest == 2 * TOKENS_PER_ROW * VOCAB and full.peak >= 2 * TOKENS_PER_ROW * VOCAB * 4
    with WideTensors(VOCAB) as chunked:
        chunked_lm_loss(hidden, head, labels, chunk_tokens=CHUNK).backward()
    assert chunked.largest == CHUNK * VOCAB
    assert chunked.peak <= 4 * chunk_bytes < full.peak / 4  # head output, fp32 copy, log-softmax, gradient


# Checkpoints off the device (surgery.training.offload): a no-op on the CPU; the hooks' bookkeeping (which tensors move,
# in which order they come back, the copy back of the next one started early) run here through host copies that
# speak the CUDA copies' protocol. The CUDA path itself is tested in test_cuda.py.
class HostCopies:
    """Copies to a host buffer and back on the CPU, logging each copy back and each wait by the buffer's number."""

    device = torch.device("cpu")

    def __init__(self):
        self.log: list[tuple[str, int]] = []
        self.numbers: dict[int, int] = {}

    def to_host(self, tensor):
        host = tensor.clone()
        self.numbers[id(host)] = len(self.numbers)
        return host

    def to_device(self, host):
        number = self.numbers[id(host)]
        self.log.append(("fetch", number))
        return host.clone(), number

    def wait(self, number):
        self.log.append(("wait", number))


def checkpointed_step(ft, batch, hooks=contextlib.nullcontext(), retain: bool = False):
    """Loss and gradients of one step of a checkpointed fine-tune, its forward under ``hooks``."""
    torch.manual_seed(0)
    with hooks:
        loss = causal_lm_loss(causal_lm_parts(ft), **batch, chunk_tokens=16)
    params = trainable(ft)
    grads = torch.autograd.grad(loss, params, retain_graph=retain)
    if retain:
        again = torch.autograd.grad(loss, params)
        assert all(torch.equal(a, b) for a, b in zip(again, grads))  # the host buffers serve a second backward
    return loss.detach(), grads


def long_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 260, (2, 96), generator=torch.Generator().manual_seed(8))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("checkpointing", [True, False])
def test_offloaded_checkpoints_give_bit_identical_gradients(checkpointing):
    ft = finetune("tiny-opt", "lora-nf4")
    if checkpointing:
        checkpoint_activations(ft)
    copies = HostCopies()
    plain = checkpointed_step(ft, long_batch())
    moved = checkpointed_step(ft, long_batch(), ActivationOffload(copies, min_bytes=4096), retain=True)
    assert torch.equal(moved[0], plain[0]) and all(torch.equal(a, b) for a, b in zip(moved[1], plain[1]))
    fetched = {n for kind, n in copies.log if kind == "fetch"}
    assert len(copies.numbers) >= (2 if checkpointing else 10) and fetched == set(copies.numbers.values())


def test_each_tensor_brought_back_starts_the_copy_of_the_one_saved_before_it():
    ft = finetune("tiny-llama", "lora")
    checkpoint_activations(ft)
    copies = HostCopies()
    checkpointed_step(ft, long_batch(), ActivationOffload(copies, min_bytes=4096))
    waits = [(i, n) for i, (kind, n) in enumerate(copies.log) if kind == "wait"]
    assert [n for _, n in waits] == sorted((n for _, n in waits), reverse=True)  # the reverse of the saving order
    for (previous, _), (_, number) in zip(waits, waits[1:]):
        assert copies.log.index(("fetch", number)) < previous  # under way before the wait before its own


def test_on_the_cpu_offloading_installs_nothing_and_changes_nothing():
    assert isinstance(offloaded_activations("cpu"), contextlib.nullcontext)
    x = torch.randn(4096, requires_grad=True)
    with offloaded_activations(torch.device("cpu"), min_bytes=0):
        y = x * x
    assert y.grad_fn._saved_self.data_ptr() == x.data_ptr()  # saved in place, not copied
    ft = finetune("tiny-llama", "lora")
    checkpoint_activations(ft)
    plain = checkpointed_step(ft, long_batch())
    again = checkpointed_step(ft, long_batch(), offloaded_activations("cpu"))
    assert torch.equal(again[0], plain[0]) and all(torch.equal(a, b) for a, b in zip(again[1], plain[1]))


def test_parameters_small_and_strided_tensors_stay_where_they_are():
    copies = HostCopies()
    weight = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(64, 64, requires_grad=True)
    with ActivationOffload(copies, min_bytes=1024):
        y = (x @ weight).t() * torch.randn(4, requires_grad=True).sum()  # weight: a parameter; t(): strided
        z = torch.randn(8, requires_grad=True) * torch.randn(8)  # 32 bytes: too small
    assert len(copies.numbers) == 1  # x alone
    y.sum().backward()
    z.sum().backward()


# ------------------------------------------------------------------ in training: surgery train's default loss


def _training_runs(model: str, head: str, batched: bool = False, **config) -> list:
    """Two jobs trained 3 steps (turn by turn or batched) from the same start, with the given loss settings."""
    from surgery.base.tokenizer import tiny_tokenizer
    from surgery.training.config import DataConfig, TrainConfig
    from surgery.training.job import make_job
    from surgery.training.loop import train_jobs

    base = tiny_model(model)
    settings = {"batch_size": 4, "lr": 1e-2, "max_steps": 3, "seed": 0, **config}
    jobs = [
        make_job(
            base,
            name=data,
            rules=rules(model, head),
            data=data,
            tokenizer=tiny_tokenizer(),
            config=TrainConfig(**settings),
            data_config=DataConfig(block_size=40, eval_split=0.2),
            model_name=model,
        )
        for data in ("upper", "capitals")
    ]
    return train_jobs(jobs, batched=batched)


@pytest.mark.parametrize("batched_pass", [False, True], ids=["turns", "batched"])
@pytest.mark.parametrize("model,head", [("tiny-llama", "lora"), ("tiny-opt", "plain"), ("tiny-gpt2", "lora-int8")])
def test_training_with_the_chunked_loss_takes_the_steps_of_the_model_s_own_loss(model, head, batched_pass):
    """surgery train's default (the chunked loss, here 7 tokens a chunk so that every batch spans many) against
    transformers' own loss over the full logits: the same losses, evaluation losses and trained tensors."""
    options = {"gradient_checkpointing": not batched_pass, "eval_steps": 3}
    chunked = _training_runs(model, head, batched_pass, loss_chunk_tokens=7, **options)
    full = _training_runs(model, head, batched_pass, loss_chunk_tokens=0, **options)
    assert chunked[0].job.loss_parts is not None and full[0].job.loss_parts is None
    for a, b in zip(chunked, full):
        assert [r["loss"] for r in a.history] == pytest.approx([r["loss"] for r in b.history], rel=1e-5)
        evals = [[r["eval_loss"] for r in run.history if "eval_loss" in r] for run in (a, b)]
        assert evals[0] and evals[0] == pytest.approx(evals[1], rel=1e-5)
        mine, theirs = a.job.finetune.own_state(), b.job.finetune.own_state()
        assert mine.keys() == theirs.keys() and mine
        for k in mine:  # AdamW's first steps magnify fp32 rounding of gradient elements near 0 (test_batched.py)
            assert (mine[k] - theirs[k]).norm() <= 1e-3 * theirs[k].norm(), k


def test_the_chunked_loss_is_off_under_fsdp_and_an_explicit_chunk_size_there_is_refused():
    from surgery.training.config import TrainConfig

    assert TrainConfig().chunked_loss == TrainConfig().loss_chunk_tokens > 0
    assert TrainConfig(fsdp=True).chunked_loss == 0
    with pytest.raises(TrainError, match="--loss-chunk-tokens.*--fsdp"):
        TrainConfig(fsdp=True, loss_chunk_tokens=256)


# ------------------------------------------------------------------ the MLP in chunks over the tokens


def _loss_and_grads_of_a_finetune(ft, batch, chunk: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from surgery.training.mlp_chunks import chunked_mlps

    params = trainable(ft)
    with chunked_mlps(ft, chunk):
        return loss_and_grads(lambda: ft(**batch, use_cache=False).loss, params)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_the_mlp_in_chunks_gives_the_same_loss_and_gradients(model, checkpointing):
    """LoRA on every MLP projection (over an int8 base for llama): chunks of 3 tokens over rows of 23 against the
    MLP over the whole rows; the classes come back after, the base's modules are never touched."""
    mlp = {"tiny-llama": "re:.*mlp\\.(gate|up|down)_proj", "tiny-gpt2": "re:.*mlp\\.c_(fc|proj)"}[model]
    spec = rules(model, "frozen", quantize="int8" if model == "tiny-llama" else "none")
    spec["rules"].append({"match": mlp, "action": "adapt", "lora": {"r": 4, "alpha": 8, "init": "gaussian"}})
    base = tiny_model(model)
    ft = surgery.rewrite(base, spec)
    with torch.no_grad():  # off the start (B = 0 gives A no gradient)
        g = torch.Generator().manual_seed(0)
        for p in trainable(ft):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    if checkpointing:
        checkpoint_activations(ft)
    batch = padded_batch()
    before = {m: type(m) for m in ft.modules()}
    base_classes = {m: type(m) for m in base.modules()}
    calls = []
    first_mlp = next(m for name, m in ft.named_modules() if name.endswith(".mlp"))
    first_projection = next(iter(first_mlp.children()))
    first_projection.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[-2]))
    full = _loss_and_grads_of_a_finetune(ft, batch, 0)
    whole_calls, calls[:] = list(calls), []
    chunked = _loss_and_grads_of_a_finetune(ft, batch, 3)
    assert set(whole_calls) == {23} and set(calls) == {3, 2}  # 23 tokens: seven chunks of 3 and one of 2
    assert_same(chunked, full, tolerance=1e-5)  # weight gradients summed chunk by chunk: another summation order
    assert {m: type(m) for m in ft.modules()} == before and {m: type(m) for m in base.modules()} == base_classes


def test_training_with_the_mlp_in_chunks_takes_the_steps_of_the_whole_mlp():
    chunked = _training_runs("tiny-llama", "lora", loss_chunk_tokens=7, mlp_chunk_tokens=5)
    whole = _training_runs("tiny-llama", "lora", loss_chunk_tokens=7)
    for a, b in zip(chunked, whole):
        assert [r["loss"] for r in a.history] == pytest.approx([r["loss"] for r in b.history], rel=1e-5)
        assert type(a.job.finetune.model.layers[0].mlp) is type(b.job.finetune.model.layers[0].mlp)  # restored


def test_the_mlp_in_chunks_is_refused_where_it_cannot_apply():
    from surgery.training.config import TrainConfig
    from surgery.training.mlp_chunks import chunked_mlps

    with pytest.raises(TrainError, match="--mlp-chunk-tokens.*--batched"):
        TrainConfig(mlp_chunk_tokens=512, batched=True)
    with pytest.raises(TrainError, match="--mlp-chunk-tokens must be >= 0"):
        TrainConfig(mlp_chunk_tokens=-1)
    opt = surgery.rewrite(tiny_model("tiny-opt"), "qv_lora")  # OPT's layers hold fc1/fc2 themselves
    with pytest.raises(TrainError, match="OPTForCausalLM.*no `mlp` block"), chunked_mlps(opt, 8):
        pass
