"""Model cards (``README.md``) for the folders surgery writes: adapter folders, PEFT exports, merged models.

Each card says what the folder holds, which base it needs and how that base must be loaded for the
same outputs (``bnb.base_loading``: the ``BitsAndBytesConfig`` settings of a quantized base), how to
load the folder, and the rules that made the fine-tune.
"""

from __future__ import annotations

from typing import Literal

import torch
import yaml
from torch import nn

from ..base.fingerprints import base_fingerprint
from ..base.ownership import require_finetune
from ..layers.bnb import base_loading
from ..layers.extra_tokens import extra_token_layers
from .adapter_file import base_name

CARD_FILE = "README.md"
Layout = Literal["adapter_folder", "peft"]  # save_pretrained's folder, or export-peft's PEFT-only folder


def adapter_card(finetune: nn.Module, values: dict[str, torch.Tensor], layout: Layout, no_peft: str = "") -> str:
    """README.md of an adapter folder (``layout`` "adapter_folder") or a PEFT export ("peft").

    ``values``: the fine-tune's own tensors as saved; ``no_peft``: why an adapter folder has no PEFT files.
    """
    info = require_finetune(finetune, "described")
    name, base = _base_names(info)
    loading = base_loading(info.base)
    header = ["---", "library_name: surgery" if no_peft else "library_name: peft"]
    header += [f"base_model: {name}"] if name else []
    header += ["tags: [surgery, lora]", "---"]
    title = (
        f"# A surgery fine-tune of {base}"
        if layout == "adapter_folder"
        else f"# A LoRA adapter for {base} (PEFT format, exported by surgery)"
    )
    with_surgery = (
        'surgery.load_adapter(base, "THIS_FOLDER")'
        if layout == "adapter_folder"
        else 'surgery.import_peft(base, "THIS_FOLDER")'
    )
    return "\n".join(
        [
            *header,
            "",
            title,
            "",
            _summary(info, values),
            "",
            f"Base: `{base}` ({type(info.base).__name__}), fingerprint `{base_fingerprint(info.base).short}` "
            "(surgery checks it when loading).",
            "",
            "## Load the base the way it was trained",
            "",
            loading.note(base),
            "",
            "## Load",
            "",
            "```python",
            "import surgery",
            "",
            f"base = surgery.load_model({base!r}).model",
            f"ft = {with_surgery}",
            "```",
            "",
            *(
                ['From the command line: `surgery generate "..." --adapter THIS_FOLDER`.', ""]
                if layout == "adapter_folder"
                else []
            ),
            *_peft_lines(loading.from_pretrained(base), no_peft, _vocabulary(finetune)),
            "",
            *_rules_section(info),
            _files_line(layout, no_peft),
            "",
        ]
    )


def merged_card(finetune: nn.Module, source: str, dtype: torch.dtype, error: dict[str, float]) -> str:
    """README.md of a merged model: a plain transformers model made from an adapter ``source`` and its base."""
    info = require_finetune(finetune, "described")
    name, base = _base_names(info)
    loading = base_loading(info.base)
    dtype_name = str(dtype).removeprefix("torch.")
    stored = (
        f"its base stored as {' and '.join(loading.schemes)} (bitsandbytes), dequantized to {dtype_name} here"
        if loading.schemes
        else f"its {base} base"
    )
    header = ["---", "library_name: transformers"] + ([f"base_model: {name}"] if name else [])
    return "\n".join(
        [
            *header,
            "tags: [surgery, merged]",
            "---",
            "",
            f"# {base} with a surgery fine-tune merged in",
            "",
            f"The adapter `{source}` folded into {stored}: every weight is {dtype_name}, no adapter and no "
            "surgery are needed to load it.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER", dtype="{dtype_name}")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
            "```",
            "",
            "## How close it is to the fine-tune",
            "",
            f"Measured when merging: the logits differ from the fine-tune's on its base by at most "
            f"{error['max_abs']:.3g} ({error['max_rel']:.3g} of the largest). Load this folder as it is (no "
            "quantization_config): quantizing the merged weights again re-rounds every weight and adds error "
            "(`surgery merge --report-requantized` measures it); to serve the fine-tune on a quantized base, "
            "export the adapter (`surgery export-peft`) instead.",
            "",
            "## The fine-tune's base",
            "",
            loading.note(base),
            "",
            *_rules_section(info),
        ]
    )


def _base_names(info) -> tuple[str, str]:
    """The base's model name ('' when unknown) and the name to show (its class when unknown)."""
    name = base_name(info.base)
    return name, name or type(info.base).__name__


def _rules_section(info) -> list[str]:
    return ["## Rules", "", "```yaml", yaml.safe_dump(info.rules.to_dict(), sort_keys=False).rstrip(), "```", ""]


def _summary(info, values: dict[str, torch.Tensor]) -> str:
    adapted = len(info.plan.by_action("adapt"))
    plain = [d.path for d in info.plan.by_action("plain")]
    count = sum(t.numel() for t in values.values())
    size = sum(t.numel() * t.element_size() for t in values.values())
    trained = (
        f", {len(plain)} module{'s' if len(plain) != 1 else ''} trained in full ({', '.join(plain)})" if plain else ""
    )
    return (
        f"LoRA on {adapted} module{'s' if adapted != 1 else ''}{trained}: {count:,} trainable parameters "
        f"({size:,} bytes). The base is not in this folder."
    )


def _vocabulary(finetune: nn.Module) -> int | None:
    """The vocabulary of a fine-tune with its own tokens (None without): PEFT needs the base resized to it."""
    layers = extra_token_layers(finetune)
    return layers[0][1].width if layers else None


def _peft_lines(from_pretrained: str, no_peft: str, vocabulary: int | None = None) -> list[str]:
    if no_peft:
        return [f"PEFT cannot represent this fine-tune ({no_peft}), so the folder holds no PEFT layout."]
    load = from_pretrained or "AutoModelForCausalLM.from_pretrained(...)  # see the base's loading above"
    imports = "from transformers import AutoModelForCausalLM" + (
        ", BitsAndBytesConfig" if "BitsAndBytes" in load else ""
    )
    return [
        "With PEFT (the same outputs on the base loaded this way):",
        "",
        "```python",
        *(["import torch"] if "torch." in load else []),
        "from peft import PeftModel",
        imports,
        "",
        f"base = {load}",
        *([CPU_KERNEL_LINE] if "load_in_4bit" in load else []),
        *(
            [
                f"base.resize_token_embeddings({vocabulary})  # the fine-tune's own tokens: rows PEFT then fills "
                "(trainable_token_indices); tokenizer: the base's plus the tokens in this folder's rules"
            ]
            if vocabulary
            else []
        ),
        'model = PeftModel.from_pretrained(base, "THIS_FOLDER")',
        "```",
    ]


# bitsandbytes repacks 4-bit weights in place for its AVX512-BF16 CPU kernel on the first eval-mode forward (other
# rounding, and a weight no longer in the standard layout); surgery keeps it off, so the card says how to match.
CPU_KERNEL_LINE = (
    "for m in base.modules(): m.support_avx512bf16_for_cpu = False  # on a CPU: the 4-bit kernel surgery trains with"
)


def _files_line(layout: Layout, no_peft: str) -> str:
    peft = "`adapter_config.json` + `adapter_model.safetensors` (PEFT's LoRA format)"
    if layout == "peft":
        return f"Files: {peft}."
    return (
        "Files: `adapter.safetensors` (surgery's adapter file), `model.safetensors` (the same file, the name "
        f"transformers.Trainer resumes from){'' if no_peft else ', ' + peft}."
    )
