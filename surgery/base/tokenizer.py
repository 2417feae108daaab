"""Tokenizers: the tiny models' byte-level one (built in code, no download) and a MODEL's own, read from its local
directory or its snapshot in the local HF cache; never online."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelConfigError, ModelNotFoundError, first_line
from ..model.architectures import TINY_MODELS
from .folder import TOKENIZER_FILES, gate_tokenizer_folder
from .sources import hub_snapshot


def _byte_to_char() -> dict[int, str]:
    """A printable character for every byte (the byte-level BPE convention), so ids equal byte values."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def tiny_tokenizer():
    """The tiny models' tokenizer: one token per byte plus <pad> <bos> <eos> <unk>; needs no download.

    Returns:
        A ``PreTrainedTokenizerFast`` whose ids 0-255 are the bytes of the text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _byte_to_char().items()}
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab.update({tok: 256 + i for i, tok in enumerate(specials)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def load_tokenizer(name: str):
    """The tokenizer of MODEL: a tiny model's byte-level one, or a local directory's / HF-cache snapshot's.

    Args:
        name: a bundled tiny model, a local folder, or a hub id in the local HF cache.

    Returns:
        The tokenizer ``AutoTokenizer`` reads from the folder, offline.

    Raises:
        ModelNotFoundError: ``name`` is neither a folder nor cached.
        ModelConfigError: the folder holds no tokenizer, one transformers cannot load, or a file that fails the
            gate (``folder.gate_tokenizer_folder``: a FIFO, a link out of the folder, an oversized file).
    """
    if name in TINY_MODELS:
        return tiny_tokenizer()
    path = Path(name).expanduser()
    source = path if path.is_dir() else hub_snapshot(name)
    if source is None:
        raise ModelNotFoundError(
            f"no tokenizer for '{name}': not a local directory or a model in the local HF cache "
            "(no network is used); pass --tokenizer with a folder that holds one"
        )
    if not any((source / f).is_file() for f in TOKENIZER_FILES):
        raise ModelConfigError(
            f"{source}: holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}, ...); put the "
            "tokenizer's files in that folder, or pass --tokenizer with a folder or model that has "
            "one"
        )
    gate_tokenizer_folder(source, error=ModelConfigError)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as exc:  # transformers reports missing/broken tokenizer files in many ways
        raise ModelConfigError(
            f"{source}: its tokenizer could not be loaded ({type(exc).__name__}: "
            f"{first_line(exc)}); pass --tokenizer with a folder that holds a working one"
        ) from None
