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

Every byte is computed before the first write; each file is written atomically.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn

from .bnb import quantized_storage
from .adapter_file import ADAPTER_FILE, adapter_bytes, base_fingerprint, base_name
from .errors import AdapterStateError, SurgeryError, SurgeryWarning
from .files import atomic_write, fsync_folder
from .finetune import add_method, own_state, require_finetune
from .peft_format import CONFIG_FILE, peft_adapter, peft_files
from .sharding import refuse_sharded

TRAINER_FILE = "model.safetensors"  # the file name transformers.Trainer loads a checkpoint's weights from
CARD_FILE = "README.md"
IGNORED_KEYWORDS = {  # transformers' save_pretrained keywords that mean nothing for an adapter folder
    "max_shard_size": "adapter files are written whole",
    "safe_serialization": "surgery writes safetensors only",
    "save_peft_format": "the PEFT layout is always written when PEFT can represent the fine-tune",
    "save_original_format": "adapter keys are the model's own",
    "distributed_checkpoint": "adapters are small and replicated",
    "token": "used by push_to_hub only",
}


def save_pretrained(finetune: nn.Module, save_directory: str | os.PathLike, *, is_main_process: bool = True,
                    state_dict: dict[str, torch.Tensor] | None = None, push_to_hub: bool = False,
                    **kwargs) -> Path:
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
    for name, data in files.items():
        atomic_write(folder / name, data, error=AdapterStateError)
        if name == ADAPTER_FILE:
            _link_for_trainer(folder)
    return folder


def adapter_folder_files(finetune: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """Every file of the adapter folder except the Trainer link, by name, as bytes (nothing written)."""
    files = {ADAPTER_FILE: adapter_bytes(finetune, values)}
    peft, why_not = _peft_layout(finetune)
    files.update(peft)
    files[CARD_FILE] = model_card(finetune, values, why_not).encode()
    return files


def _own_values(finetune: nn.Module, state_dict: dict | None) -> dict[str, torch.Tensor]:
    own = own_state(finetune)
    if state_dict is None:
        return own
    missing = [name for name in own if name not in state_dict]
    if missing:
        raise AdapterStateError(f"save_pretrained: state_dict lacks '{missing[0]}'"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                + " of the fine-tune's own tensors; pass the fine-tune's state_dict() or none")
    for name, p in own.items():
        if tuple(state_dict[name].shape) != tuple(p.shape):
            raise AdapterStateError(f"save_pretrained: state_dict['{name}'] has shape "
                                    f"{tuple(state_dict[name].shape)}, the fine-tune holds {tuple(p.shape)}")
    return {name: state_dict[name] for name in own}


def _check_keywords(push_to_hub: bool, kwargs: dict) -> None:
    if push_to_hub:
        raise AdapterStateError("save_pretrained(push_to_hub=True) is not supported on a fine-tune; save the folder, "
                                "then call ft.push_to_hub(repo_id), which uploads the adapter folder")
    if kwargs.get("safe_serialization", True) is False:
        raise AdapterStateError("save_pretrained(safe_serialization=False): surgery writes safetensors only "
                                "(pickled weights can run code when loaded); drop the argument")
    if kwargs.get("variant"):
        raise AdapterStateError(f"save_pretrained(variant={kwargs['variant']!r}): adapter folders have no weight "
                                "variants; drop the argument")
    unknown = sorted(set(kwargs) - set(IGNORED_KEYWORDS) - {"variant"})
    if unknown:
        raise AdapterStateError(f"save_pretrained: unknown argument {unknown[0]!r} for a fine-tune's adapter folder "
                                f"(it takes is_main_process, state_dict and {', '.join(sorted(IGNORED_KEYWORDS))})")


def _peft_layout(finetune: nn.Module) -> tuple[dict[str, bytes], str]:
    """PEFT's two files, or no files and the reason PEFT cannot represent this fine-tune."""
    try:
        refuse_sharded(finetune, "the PEFT layout", "")
        return peft_files(*peft_adapter(finetune)), ""
    except SurgeryError as exc:
        why = str(exc).split(";")[0]
        warnings.warn(f"save_pretrained: no PEFT layout ({CONFIG_FILE}) for this fine-tune: {why}; the folder "
                      f"holds surgery's {ADAPTER_FILE} only", SurgeryWarning, stacklevel=4)
        return {}, why


def _link_for_trainer(folder: Path) -> None:
    """``model.safetensors`` as a hard link to the adapter file (a copy where links are not possible)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{TRAINER_FILE}.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(folder / ADAPTER_FILE, tmp)
        except OSError:
            atomic_write(Path(tmp), (folder / ADAPTER_FILE).read_bytes(), error=AdapterStateError)
        os.replace(tmp, folder / TRAINER_FILE)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise AdapterStateError(f"{folder / TRAINER_FILE}: could not be written ({exc.strerror or exc})") from None
    fsync_folder(folder)


def model_card(finetune: nn.Module, values: dict[str, torch.Tensor], no_peft: str = "") -> str:
    """README.md of an adapter folder: what it is, what it needs, and how to load it three ways."""
    info = require_finetune(finetune, "described")
    base = base_name(info.base) or type(info.base).__name__
    adapted = len(info.plan.by_action("adapt"))
    plain = [d.path for d in info.plan.by_action("plain")]
    count = sum(t.numel() for t in values.values())
    size = sum(t.numel() * t.element_size() for t in values.values())
    rules = yaml.safe_dump(info.rules.to_dict(), sort_keys=False).rstrip()
    header = ["---", "library_name: surgery" if no_peft else "library_name: peft"]
    header += [f"base_model: {base}"] if base_name(info.base) else []
    header += ["tags: [surgery, lora]", "---"]
    peft_lines = ([f"PEFT cannot represent this fine-tune ({no_peft}), so the folder holds no PEFT layout."]
                  if no_peft else [
                      "With PEFT (the same outputs on the same base; see the quantization note below):", "",
                      "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                      f"base = AutoModelForCausalLM.from_pretrained({base!r})",
                      "model = PeftModel.from_pretrained(base, \"THIS_FOLDER\")", "```"])
    storage = _storage_note(info.base)
    return "\n".join([
        *header, "",
        f"# A surgery fine-tune of {base}", "",
        f"LoRA on {adapted} module{'s' if adapted != 1 else ''}"
        + (f", {len(plain)} module{'s' if len(plain) != 1 else ''} trained in full ({', '.join(plain)})" if plain else "")
        + f": {count:,} trainable parameters ({size:,} bytes). The base is not in this folder.", "",
        f"Base: `{base}` ({type(info.base).__name__}), fingerprint `{base_fingerprint(info.base).short}` "
        "(loading checks it).", storage, "",
        "## Load", "",
        "```python", "import surgery", "",
        f"base = surgery.load_model({base!r}).model",
        "ft = surgery.load_adapter(base, \"THIS_FOLDER\")", "```", "",
        "From the command line: `surgery generate \"...\" --adapter THIS_FOLDER`.", "",
        *peft_lines, "",
        "## Rules", "", "```yaml", rules, "```", "",
        "Files: `adapter.safetensors` (surgery's adapter file), `model.safetensors` (the same file, the name "
        "transformers.Trainer resumes from), `adapter_config.json` + `adapter_model.safetensors` (PEFT).", ""])


def _storage_note(base: nn.Module) -> str:
    forms = sorted({s for _, m in base.named_modules() if (s := quantized_storage(m))})
    if not forms:
        return "It was trained on the base unquantized."
    how = {"int8": "BitsAndBytesConfig(load_in_8bit=True)",
           "nf4": "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\")",
           "fp4": "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"fp4\")"}
    return (f"It was trained on the base stored as {' and '.join(forms)} (bitsandbytes); for the same outputs load "
            f"the base the same way, e.g. `quantization_config={how[forms[0]]}`.")


add_method("save_pretrained", save_pretrained)
