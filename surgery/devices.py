"""Where a model computes: ``--device auto|cpu|cuda|cuda:N``, each rank's GPU under torchrun, ``--max-memory``.

One resolution for the CLI and the library: ``auto`` is CUDA when there is a GPU, else the CPU;
under torchrun / accelerate every rank computes on ``cuda:$LOCAL_RANK``. A 4-bit base computes in
bf16 on CUDA unless its rule file says otherwise (QLoRA's setting; fp16 where the GPU has no bf16).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .combinations import check
from .errors import DeviceError
from .options import flags_of, option, set_options

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (CUDA when there is a GPU, else the CPU), cpu, cuda or cuda:N"
_SPEC = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def local_rank() -> int | None:
    """This process's LOCAL_RANK under torchrun / accelerate, None when launched alone."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None and value.isdigit() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def cuda_available() -> bool:
    """``torch.cuda.is_available()``, answered without importing torch on a Linux machine with no NVIDIA driver
    (neither ``/proc/driver/nvidia`` nor a ``/dev/nvidia*`` device, which containers may expose alone): CUDA
    cannot be there, and planning need not pay torch's start-up."""
    import glob
    import sys

    if sys.platform.startswith("linux") and not (os.path.exists("/proc/driver/nvidia") or glob.glob("/dev/nvidia*")):
        return False
    import torch

    return torch.cuda.is_available()


def parse_device(spec: str) -> tuple[str, str | None]:
    """``--device`` as written: (auto|cpu|cuda, the index or None); a DeviceError for anything else (empty too)."""
    found = _SPEC.fullmatch(spec.strip().lower()) if isinstance(spec, str) else None
    if found is None or (found.group(2) is not None and found.group(1) != "cuda"):
        raise DeviceError(f"--device {spec!r}: write {DEVICE_HELP}")
    return found.group(1), found.group(2)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device ``spec`` names, checked: one DeviceError (what is wrong, what to pass) when it is not there."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    kind, index = parse_device(spec if spec is not None else "auto")
    rank = local_rank()
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {spec}: this machine has no CUDA GPU that torch can use (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); pass --device cpu, or "
            "install a CUDA build of torch on a machine with a GPU"
        )
    count = torch.cuda.device_count()
    if index is not None and rank is not None and int(index) != rank:
        raise DeviceError(
            f"--device {spec}: under torchrun each process computes on its own GPU (this one is "
            f"LOCAL_RANK {rank}, cuda:{rank}); pass --device cuda"
        )
    number = int(index) if index is not None else (rank or 0)
    if number >= count:
        raise DeviceError(
            f"--device cuda:{number}: this machine has {count} GPU{'s' if count != 1 else ''} "
            f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); pass one of them"
        )
    return torch.device("cuda", number)


def input_device(model) -> torch.device:
    """Where a model's token ids go: the device of its input embedding (the first layer of a split base)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    first = next(embedding.parameters(), None) if embedding is not None else None
    return (first if first is not None else next(model.parameters())).device


def use_device(device: torch.device) -> None:
    """Make ``device`` the current CUDA device (collectives and ``current_device()`` follow it) and allow TF32
    matmuls there, as PyTorch training scripts do; nothing on the CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def default_compute_dtype(device: torch.device) -> str | None:
    """The compute dtype of a 4-bit base whose rule file names none: bf16 on CUDA (fp16 without bf16), else
    None (the input's dtype, as bitsandbytes does)."""
    import torch

    if device.type != "cuda":
        return None
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def parse_size(text: str, what: str) -> int:
    """Bytes of a size written as transformers writes them (``20GiB``, ``500MB``, ``1e9`` is not accepted)."""
    found = _SIZE.fullmatch(text.strip())
    if found is None:
        raise DeviceError(f"{what} {text!r}: write a size such as 20GiB, 500MiB or 24GB")
    return int(float(found.group(1)) * _UNITS[(found.group(2) or "B").upper()])


def parse_max_memory(text: str) -> dict[int | str, int]:
    """``0=20GiB,1=20GiB,cpu=64GiB`` -> ``{0: ..., 1: ..., "cpu": ...}`` in bytes, as accelerate takes it."""
    out: dict[int | str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, size = part.partition("=")
        device = device.strip().lower().removeprefix("cuda:")
        if not sep or not (device.isdigit() or device in ("cpu", "disk")):
            raise DeviceError(
                f"--max-memory {part!r}: write DEVICE=SIZE pairs, e.g. 0=20GiB,1=20GiB,cpu=64GiB "
                "(DEVICE a GPU index, cpu or disk)"
            )
        key: int | str = int(device) if device.isdigit() else device
        if key in out:
            raise DeviceError(f"--max-memory: {device} is given twice")
        out[key] = parse_size(size, f"--max-memory {device}=")
    if not out:
        raise DeviceError("--max-memory is empty: write DEVICE=SIZE pairs, e.g. 0=20GiB,1=20GiB")
    return out


def check_attn_implementation(name: str | None, device: torch.device) -> None:
    """Refuse an attention implementation this machine cannot run, for every model source alike (transformers
    refuses it only for a checkpoint it loads).

    Raises:
        DeviceError: flash_attention_2 without the flash-attn package, or on a device other than a CUDA GPU.
    """
    import importlib.util

    if name != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise DeviceError(
            "--attn-implementation flash_attention_2: the flash-attn package is not installed; install it "
            "(pip install flash-attn, on a machine with a CUDA GPU) or pass --attn-implementation sdpa"
        )
    if device.type != "cuda":
        raise DeviceError(
            f"--attn-implementation flash_attention_2 runs on CUDA GPUs only, and the model computes on {device}; "
            "pass --attn-implementation sdpa"
        )


def check_max_memory(memory: dict[int | str, int] | None) -> None:
    """Refuse a --max-memory that names a GPU this machine does not have, for every model source alike.

    Raises:
        DeviceError: a GPU index at or past the number of CUDA GPUs.
    """
    gpus = sorted(k for k in (memory or {}) if isinstance(k, int))
    if not gpus:
        return
    count = 0
    if cuda_available():
        import torch

        count = torch.cuda.device_count()
    if gpus[-1] >= count:
        have = f"{count} GPU{'s' if count != 1 else ''}" if count else "no CUDA GPU"
        raise DeviceError(
            f"--max-memory {gpus[-1]}=...: this machine has {have}; name only "
            f"{f'GPUs 0 to {count - 1}, ' if count else ''}cpu and disk, or leave --max-memory out"
        )


DEVICE_PANEL = "Device & distributed"
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
DeviceMap = Literal["auto", "balanced"]


@dataclass(frozen=True, kw_only=True)
class DeviceConfig:
    """Where a model computes and how its base is placed: one device, or accelerate's placement over several GPUs.

    Checked as written here (the spelling of each value); whether the device is there is checked by ``resolve``,
    before any model loads.
    """

    device: str = option(
        "auto",
        help=f"Where the model computes: {DEVICE_HELP}; under torchrun each process takes cuda:$LOCAL_RANK.",
        panel=DEVICE_PANEL,
    )
    device_map: DeviceMap | None = option(
        None,
        help="auto or balanced: place the base's layers over every GPU (accelerate's placement, no FSDP); adapters "
        "sit on their layer's GPU.",
        panel=DEVICE_PANEL,
    )
    max_memory: str | None = option(
        None, help="With --device-map: the most each device holds, e.g. 0=20GiB,1=20GiB,cpu=64GiB.", panel=DEVICE_PANEL
    )
    attn_implementation: AttnImplementation | None = option(
        None,
        help="sdpa, eager or flash_attention_2 (where installed); default: transformers' choice for the model.",
        panel=DEVICE_PANEL,
    )

    def __post_init__(self) -> None:
        parse_device(self.device)
        if self.device_map not in (None, "auto", "balanced"):
            raise DeviceError(f"--device-map must be auto or balanced, not {self.device_map!r}")
        if self.attn_implementation not in (None, "sdpa", "eager", "flash_attention_2"):
            raise DeviceError(
                f"--attn-implementation must be sdpa, eager or flash_attention_2, not {self.attn_implementation!r}"
            )
        check(set_options(self), only=flags_of(type(self)))
        if self.max_memory is not None:
            parse_max_memory(self.max_memory)

    @property
    def memory_map(self) -> dict[int | str, int] | None:
        """--max-memory in bytes per device, as accelerate takes it."""
        return parse_max_memory(self.max_memory) if self.max_memory is not None else None

    def placement(self) -> dict:
        """``load_model``'s keywords for this placement, the device resolved (a DeviceError when it is not there) and
        made current."""
        target = resolve_device(self.device)
        check_attn_implementation(self.attn_implementation, target)
        check_max_memory(self.memory_map)
        use_device(target)
        return {
            "device": target,
            "device_map": self.device_map,
            "max_memory": self.memory_map,
            "attn_implementation": self.attn_implementation,
        }

    def describe(self) -> str:
        """The device part of a command's first line: 'device cuda:0', or the device map asked for."""
        if self.device_map:
            import torch

            count = torch.cuda.device_count()
            return f"device map {self.device_map} over {f'{count} GPUs' if count else 'the CPU'}"
        return f"device {resolve_device(self.device)}"
