"""``ft.save_pretrained(dir)``: a fine-tune saved as an adapter folder, never as the whole model.

The folder holds what PEFT users and tools expect next to surgery's own file:

* ``adapter_config.json`` + ``adapter_model.safetensors``: PEFT's layout (``PeftModel.from_pretrained``
  on the plain base loads it; vLLM and LoRAX read it), when PEFT can represent the fine-tune;
* ``adapter.safetensors``: surgery's adapter file (rules, base fingerprint, checksums), what
  ``surgery.load_adapter(base, dir)`` and the CLI read;
* ``model.safetensors``: a hard link to (else a copy of) ``adapter.safetensors``: the name
  ``transformers.Trainer`` loads on ``resume_from_checkpoint`` and ``load_best_model_at_end``,
  through the fine-tune's own ``load_state_dict``, which loads its own tensors only;
* ``README.md``: a model card (base, rules, trainable parameters, how to load).

Every byte is computed before the first write, and the files are written as one set (``files.write_folder_files``):
a reader sees the folder as it was or as it is now, never a mix.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..base.ownership import own_state, require_finetune
from ..base.shared_base import refuse_sharded
from ..disk import write_folder_files
from ..errors import AdapterStateError, SurgeryError, SurgeryWarning
from .adapter_file import ADAPTER_FILE, adapter_bytes
from .model_card import CARD_FILE, adapter_card
from .peft_format import CONFIG_FILE, peft_adapter, peft_files, read_peft_folder

TRAINER_FILE = "model.safetensors"  # the file name transformers.Trainer loads a checkpoint's weights from
IGNORED_KEYWORDS = {  # transformers' save_pretrained keywords that mean nothing for an adapter folder
    "max_shard_size": "adapter files are written whole",
    "safe_serialization": "surgery writes safetensors only",
    "save_peft_format": "the PEFT layout is always written when PEFT can represent the fine-tune",
    "save_original_format": "adapter keys are the model's own",
    "distributed_checkpoint": "adapters are small and replicated",
    "token": "used by push_to_hub only",
}


def write_adapter_folder(
    finetune: nn.Module,
    save_directory: str | os.PathLike,
    *,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    push_to_hub: bool = False,
    **kwargs,
) -> Path:
    """Write the fine-tune's adapter folder (see module docstring); the base is never written.

    ``state_dict`` (as Trainer passes it) supplies the values of the fine-tune's own tensors; its base
    tensors are ignored. ``is_main_process=False`` writes nothing. transformers keywords that mean
    nothing here are accepted (``max_shard_size``, ...); ``safe_serialization=False``, ``variant`` and
    ``push_to_hub=True`` are refused (use ``ft.push_to_hub(repo)``, which saves through this method).
    """
    require_finetune(finetune, "saved with save_pretrained")
    _check_keywords(push_to_hub, kwargs)
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise AdapterStateError(f"{folder}: exists and is not a folder; save_pretrained writes a folder")
    files = adapter_folder_files(finetune, _own_values(finetune, state_dict))
    if not is_main_process:
        return folder
    write_folder_files(folder, files, error=AdapterStateError, links={TRAINER_FILE: ADAPTER_FILE})
    return folder


def adapter_folder_files(finetune: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """Every file of the adapter folder except the Trainer link, by name, as bytes (nothing written)."""
    files = {ADAPTER_FILE: adapter_bytes(finetune, values)}
    peft, why_not = _peft_layout(finetune, values)
    files.update(peft)
    files[CARD_FILE] = adapter_card(finetune, values, "adapter_folder", why_not).encode()
    return files


def _own_values(finetune: nn.Module, state_dict: dict | None) -> dict[str, torch.Tensor]:
    own = own_state(finetune)
    if state_dict is None:
        return own
    missing = [name for name in own if name not in state_dict]
    if missing:
        raise AdapterStateError(
            f"save_pretrained: state_dict lacks '{missing[0]}'"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + " of the fine-tune's own tensors; pass the fine-tune's state_dict() or none"
        )
    for name, p in own.items():
        if tuple(state_dict[name].shape) != tuple(p.shape):
            raise AdapterStateError(
                f"save_pretrained: state_dict['{name}'] has shape "
                f"{tuple(state_dict[name].shape)}, the fine-tune holds {tuple(p.shape)}"
            )
    return {name: state_dict[name] for name in own}


def _check_keywords(push_to_hub: bool, kwargs: dict) -> None:
    if push_to_hub:
        raise AdapterStateError(
            "save_pretrained(push_to_hub=True) is not supported on a fine-tune; save the folder, "
            "then call ft.push_to_hub(repo_id), which uploads the adapter folder"
        )
    if kwargs.get("safe_serialization", True) is False:
        raise AdapterStateError(
            "save_pretrained(safe_serialization=False): surgery writes safetensors only "
            "(pickled weights can run code when loaded); drop the argument"
        )
    if kwargs.get("variant"):
        raise AdapterStateError(
            f"save_pretrained(variant={kwargs['variant']!r}): adapter folders have no weight "
            "variants; drop the argument"
        )
    unknown = sorted(set(kwargs) - set(IGNORED_KEYWORDS) - {"variant"})
    if unknown:
        raise AdapterStateError(
            f"save_pretrained: unknown argument {unknown[0]!r} for a fine-tune's adapter folder "
            f"(it takes is_main_process, state_dict and {', '.join(sorted(IGNORED_KEYWORDS))})"
        )


def _peft_layout(finetune: nn.Module, values: dict[str, torch.Tensor]) -> tuple[dict[str, bytes], str]:
    """PEFT's two files, or no files and the reason PEFT cannot represent this fine-tune."""
    try:
        refuse_sharded(finetune, "the PEFT layout", "")
        return peft_files(*peft_adapter(finetune, values)), ""
    except SurgeryError as exc:
        why = str(exc).split(";")[0]
        warnings.warn(
            f"save_pretrained: no PEFT layout ({CONFIG_FILE}) for this fine-tune: {why}; the folder "
            f"holds surgery's {ADAPTER_FILE} only",
            SurgeryWarning,
            stacklevel=4,
        )
        return {}, why


def check_peft_layout(finetune: nn.Module, adapter) -> None:
    """A folder that also holds PEFT's layout: that layout must be the fine-tune just loaded from its adapter file
    (a folder from the internet may pair one adapter's config or weights with another's)."""
    folder = adapter.path.parent
    if not (folder / CONFIG_FILE).is_file():
        return
    theirs = read_peft_folder(folder)
    config, tensors, _ = peft_adapter(finetune)
    fields = (
        "r",
        "lora_alpha",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "trainable_token_indices",
    )
    differ = [f for f in fields if _canonical(config.get(f)) != _canonical(theirs.config.get(f))]
    if not differ and (
        tensors.keys() != theirs.tensors.keys()
        or not all(torch.equal(tensors[k], theirs.tensors[k].to(tensors[k].dtype)) for k in tensors)
    ):
        differ = ["adapter_model.safetensors' tensors"]
    if differ:
        raise AdapterStateError(
            f"{folder}: its PEFT layout ({CONFIG_FILE}, adapter_model.safetensors) is not the "
            f"fine-tune in {ADAPTER_FILE} (they differ in {', '.join(differ)}); the folder mixes "
            "two adapters: save it again, or keep one of the two layouts"
        )


def _canonical(value):
    """A config value compared without regard to list order (PEFT writes target_modules as a set)."""
    return sorted(map(str, value)) if isinstance(value, (list, tuple)) else value
