"""Training data: read text files into examples, tokenize them into fixed-size blocks with labels.

Formats: CSV with a ``text`` column (quoted fields may span lines); JSONL with ``text``, with
``prompt`` and ``completion`` (loss only on the completion), or with ``messages`` (a conversation
that the tokenizer's chat template renders; loss only on the last assistant turn; ``chat_examples``
also wraps prompt/completion rows in the template); plain ``.txt`` (one example per
non-empty line, or in corpus mode one running text with its newlines); .parquet, .arrow, datasets
folders and cached dataset names through ``stored_data``; column names from ``rows.Fields``. Two modes:
``corpus`` concatenates every example with EOS and cuts the stream into ``block_size`` chunks;
``entries`` keeps one example per row (EOS appended), truncated to ``block_size`` and padded on the
right, with padding masked out of the loss and the attention; a micro-batch is cut to its longest row. Every
problem is a DataError naming the file (and line) before any training starts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..disk import read_user_text
from ..errors import DataError, TruncationWarning, first_line
from .rows import DEFAULT_FIELDS, MAX_DATA_BYTES, WHOLE, DatasetParts, Example, Fields, Split, example_of

IGNORE = -100  # label of positions that carry no loss (prompt, padding), as in transformers
Mode = Literal["entries", "corpus"]


# How packed rows keep their examples apart: restarting position ids alone (transformers builds the block-diagonal
# mask from them, row by row); the micro-batch flattened into one row with those position ids (flash attention:
# transformers runs its variable-length kernels only on a batch of one row); or a 4D block-diagonal causal mask
# passed as the attention mask, boolean (SDPA) or additive (eager attention), for models whose mask ignores
# position ids (OPT)
PackedMask = Literal["positions", "flattened", "bool", "additive"]
TOKENS = "_tokens"  # a micro-batch's real token count, counted on the host (no device sync per micro-batch)


@dataclass
class Blocks:
    """Tokenized training data: equal-length rows of input ids, labels and attention mask; packed rows
    (``pack``) also carry position ids that restart with each example."""

    input_ids: torch.Tensor  # (rows, block_size) int64
    labels: torch.Tensor  # IGNORE where there is no loss
    attention_mask: torch.Tensor  # 1 on real tokens
    source: str = ""
    position_ids: torch.Tensor | None = None  # packed rows: 0, 1, ... again at every example's first token
    packed_mask: PackedMask = "positions"  # packed rows: how attention is kept within each example

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows as a micro-batch padded only to its longest row (dynamic padding): rows are padded on
        the right, so the columns cut hold padding alone (no attention, no loss)."""
        mask = self.attention_mask[rows]
        width = int(mask.sum(dim=1).max()) if len(mask) else 0
        out = {"input_ids": self.input_ids[rows, :width], "labels": self.labels[rows, :width]}
        if self.position_ids is None:
            return {**out, "attention_mask": mask[:, :width]}
        # packed: no attention mask, so transformers builds the block-diagonal one from the restarting position
        # ids (flash attention: from the rows flattened into one, the only shape it reads them in), or the 4D mask
        # itself for models that ignore position ids there; the token count rides along
        positions = self.position_ids[rows, :width]
        out = {**out, "position_ids": positions, TOKENS: int(mask.sum())}
        if self.packed_mask == "flattened":  # each row's tail restarts at 0 too: a segment of its own, no loss
            out.update({key: out[key].reshape(1, -1) for key in ("input_ids", "labels", "position_ids")})
        elif self.packed_mask != "positions":
            out["attention_mask"] = block_mask(positions, self.packed_mask)
        return out

    def __repr__(self) -> str:
        rows, width = self.input_ids.shape
        return f"Blocks({rows} rows x {width} tokens, {self.source or 'unnamed'})"

    def split(self, fraction: float, seed: int) -> tuple[Blocks, Blocks]:
        """(train, eval): a seeded random ``fraction`` of the rows for evaluation (at least one row)."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_eval = max(1, round(len(self) * fraction))
        if n_eval >= len(self):
            raise DataError(
                f"{self.source}: {len(self)} rows cannot give {fraction:.0%} for evaluation and keep "
                "some for training; give more data or a separate --eval file"
            )
        ev, tr = order[:n_eval].sort().values, order[n_eval:].sort().values
        if self.position_ids is not None:
            raise DataError(f"{self.source}: split the rows before packing them (the eval split stays unpacked)")
        return (
            Blocks(self.input_ids[tr], self.labels[tr], self.attention_mask[tr], self.source),
            Blocks(self.input_ids[ev], self.labels[ev], self.attention_mask[ev], f"{self.source} (eval split)"),
        )


def bundled_data() -> dict[str, Path]:
    """Bundled toy data sets by name (``capitals``, ``upper``, ``reverse``): installed or in a checkout."""
    package = Path(__file__).resolve().parent.parent
    folder = package / "bundled_data" if (package / "bundled_data").is_dir() else package.parent / "data"
    return {p.stem: p for p in sorted(folder.glob("*.jsonl"))}


def data_path(spec: str | Path) -> Path:
    """A data file path, or the path of a bundled data set named ``spec``."""
    path = Path(spec).expanduser()
    if not path.exists() and str(spec) in bundled_data():
        return bundled_data()[str(spec)]
    return path


def read_examples(
    path: str | Path,
    mode: Mode = "entries",
    fields: Fields = DEFAULT_FIELDS,
    split: Split = "train",
    parts: DatasetParts = WHOLE,
) -> list[Example]:
    """Read a .csv / .jsonl / .txt file, a stored dataset (``stored_data``: a ``save_to_disk`` folder,
    .parquet, .arrow, a dataset in the local datasets cache) or a bundled data set into examples.

    A ``.txt`` is one example per non-empty line in ``entries`` mode, and one running text (newlines
    kept) in ``corpus`` mode. ``split``: which split of a dataset with several (train, or for ``eval``
    validation/test), unless ``parts`` names it (and a cached dataset's configuration). DataError with
    file and line (or row) on any problem.
    """
    from . import stored_data

    path = data_path(path)
    if stored_data.is_stored(path):
        return stored_data.read_stored(path, fields, split, parts)
    if parts.given():
        raise DataError(
            f"{path}: {parts.given()[0]} chooses a part of a stored dataset (a datasets folder or a "
            "cached dataset name); this is a plain data file: drop the option"
        )
    if not path.exists():
        raise DataError(f"{path}: no such data file (bundled data sets: {', '.join(bundled_data())})")
    if path.is_dir():
        raise DataError(
            f"{path}: is a directory but no saved dataset (no dataset_info.json or dataset_dict.json); "
            "give a .csv, .jsonl, .txt, .parquet or .arrow file, or a datasets save_to_disk folder"
        )
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json", ".txt", ".text", ""):
        raise DataError(
            f"{path}: unknown data format '{suffix}'; use .csv (text column), .jsonl (text, or "
            "prompt + completion), .txt (lines, or one running text with --group-texts), .parquet, "
            ".arrow or a datasets folder"
        )
    text = read_user_text(path, what="data file", limit=MAX_DATA_BYTES, error=DataError)
    if not text.strip():
        raise DataError(f"{path}: is empty; it holds no examples")
    if suffix == ".csv":
        examples = _csv(path, text, fields)
    elif suffix in (".jsonl", ".json"):
        examples = _jsonl(path, text, fields)
    elif mode == "corpus":
        examples = [Example(text)]
    else:
        examples = [Example(line) for line in text.splitlines() if line.strip()]
    if not examples:
        raise DataError(f"{path}: holds no examples")
    return examples


def _csv(path: Path, text: str, fields: Fields) -> list[Example]:
    """CSV with the csv module's full dialect: quoted fields may hold commas, quotes and newlines; a text
    column, or prompt and completion columns."""
    rows = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fieldnames = rows.fieldnames
    except csv.Error as exc:
        raise DataError(f"{path}:1: not valid CSV ({exc})") from None
    columns = set(fieldnames or [])
    if fields.text not in columns and not {fields.prompt, fields.completion} <= columns:
        found = ", ".join(fieldnames or []) or "none"
        raise DataError(
            f"{path}:1: a CSV needs a `{fields.text}` column (found columns: {found}), or `{fields.prompt}` "
            f"and `{fields.completion}` columns; name others with --text-field, --prompt-field, "
            "--completion-field"
        )
    out = []
    while True:
        start = rows.line_num + 1
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"{path}:{start}: not valid CSV ({exc})") from None
        if None in row.values():
            raise DataError(f"{path}:{start}: row has fewer fields than the header")
        if fields.text in columns and not row[fields.text].strip():
            continue  # blank text rows are skipped, as blank lines are
        out.append(example_of(row, f"{path}:{start}", fields))
    return out


def _jsonl(path: Path, text: str, fields: Fields) -> list[Example]:
    out = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as exc:
            raise DataError(f"{path}:{line}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{line}: JSON nested too deeply; each line is one flat object") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: each line must be a JSON object, not {type(row).__name__}")
        out.append(example_of(row, f"{path}:{line}", fields))
    return out


@dataclass(frozen=True)
class DataSource:
    """A job's data, read and checked (files, columns, splits) before any model loads: its training examples and,
    with ``--eval``, its evaluation examples."""

    path: Path
    examples: list[Example]
    eval_path: Path | None = None
    eval_examples: list[Example] | None = None


def read_data(data: str | Path, config) -> DataSource:
    """Read a job's training data (and the evaluation data ``config.eval_data`` names) as ``config`` (a
    ``DataConfig``) says: fields, splits, corpus or entries. Needs no tokenizer, so every data error comes first."""
    fields = Fields(config.text_field, config.prompt_field, config.completion_field, config.messages_field)
    parts = DatasetParts(config.dataset_config, config.dataset_train_split, config.dataset_test_split)
    path = data_path(data)
    examples = _checked_rows(read_examples(path, config.mode, fields, "train", parts), config, path)
    if config.eval_data is None:
        return DataSource(path, examples)
    eval_path = data_path(config.eval_data)
    held_out = _checked_rows(read_examples(eval_path, config.mode, fields, "eval", parts), config, eval_path)
    return DataSource(path, examples, eval_path, held_out)


def _checked_rows(examples: list[Example], config, path: Path) -> list[Example]:
    """Rows a chat template will render (``--chat-template``, or rows with messages) checked for their turns now,
    before any model or tokenizer loads."""
    if config.chat_template or any(ex.messages for ex in examples):
        for ex in examples:
            chat_turns(ex, ex.where or str(path))
    return examples


def render(examples: list[Example], tokenizer, chat_template: bool, source: str) -> tuple[list[Example], bool]:
    """The examples as the model sees them, and whether the tokenizer's chat template rendered them (when
    ``chat_template`` is asked for, or when rows hold messages)."""
    if chat_template or any(ex.messages for ex in examples):
        return chat_examples(examples, tokenizer, source), True
    return examples, False


def chat_examples(examples: list[Example], tokenizer, source: str) -> list[Example]:
    """Examples rendered by the tokenizer's chat template: the prompt is the conversation up to the last
    assistant turn (with the template's generation prompt), the completion that turn as the template
    writes it (its end-of-turn marker included). Prompt/completion rows are one user and one assistant turn."""
    _require_template(tokenizer, source)
    out = []
    for ex in examples:
        where = ex.where or source
        messages = chat_turns(ex, where)
        prompt = render_chat(tokenizer, messages[:-1], where, generation_prompt=True)
        whole = render_chat(tokenizer, messages, where, generation_prompt=False)
        if not whole.startswith(prompt):
            raise DataError(
                f"{where}: the chat template writes the conversation differently once the last answer "
                "is added, so the answer's tokens cannot be told apart; use prompt/completion rows "
                "without --chat-template"
            )
        out.append(Example(whole[len(prompt) :], prompt, where=ex.where))
    return out


def chat_turns(example: Example, where: str) -> tuple[tuple[str, str], ...]:
    """The conversation a training row is under a chat template: its messages, or its prompt and completion as one
    user and one assistant turn.

    Raises:
        DataError: a `text` row (no roles), or a conversation that does not end with the assistant's answer.
    """
    if example.messages:
        messages = tuple(example.messages)
    elif example.prompt:
        messages = (("user", example.prompt), ("assistant", example.completion))
    else:
        raise DataError(
            f"{where}: a `text` row has no roles for a chat template; write `prompt` + `completion` "
            "or `messages` rows, or drop --chat-template"
        )
    if messages[-1][0] != "assistant":
        raise DataError(
            f"{where}: the conversation ends with a {messages[-1][0]!r} turn; training needs it "
            "to end with the assistant's answer (the loss is on that turn)"
        )
    return messages


def chat_prompt(example: Example, tokenizer, source: str) -> str:
    """A prompt for generation in the tokenizer's chat template: the conversation up to its last user turn
    (a trailing assistant answer is left out), or the row's prompt (or text) as one user turn."""
    _require_template(tokenizer, source)
    messages = example.messages or (("user", example.prompt or example.completion),)
    if messages[-1][0] == "assistant" and len(messages) > 1:
        messages = messages[:-1]
    return render_chat(tokenizer, messages, example.where or source, generation_prompt=True)


def _require_template(tokenizer, source: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source}: the tokenizer has no chat template; drop --chat-template (and `messages` rows), "
            "or pass --tokenizer with one that has a template"
        )


def render_chat(tokenizer, messages: tuple[tuple[str, str], ...], where: str, *, generation_prompt: bool) -> str:
    """The tokenizer's chat template applied to ``messages`` as text (its errors as DataErrors)."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages],
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    except Exception as exc:  # jinja's TemplateError, the template's own raise_exception, ...
        raise DataError(
            f"{where}: the tokenizer's chat template refused this conversation "
            f"({type(exc).__name__}: {first_line(exc)})"
        ) from None
    if not isinstance(text, str):
        raise DataError(f"{where}: the tokenizer's chat template returned {type(text).__name__}, not text")
    return text


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx")


def model_max_length(model) -> int | None:
    """The longest sequence the model's positions allow, if its config says."""
    config = getattr(model, "config", None)
    for attr in POSITION_FIELDS:
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def config_max_length(config: dict) -> int | None:
    """``model_max_length`` of a config read as JSON (a ``config.json``, a bundled spec), before any model loads."""
    for attr in POSITION_FIELDS:
        value = config.get(attr)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_block_size(block_size: int, limit: int | None, model_name: str) -> None:
    """Refuse a block size above the model's positions.

    Raises:
        DataError: naming the model, its limit and the option.
    """
    if limit is not None and block_size > limit:
        raise DataError(
            f"--block-size {block_size} is above {model_name}'s maximum sequence length ({limit}); use at most {limit}"
        )


def tokenize(
    examples: list[Example],
    tokenizer,
    *,
    block_size: int,
    mode: str = "entries",
    pad_token_id: int | None = None,
    source: str = "",
) -> Blocks:
    """Token blocks for training: ``corpus`` (concatenate + cut) or ``entries`` (one row each)."""
    if mode not in ("corpus", "entries"):
        raise DataError(f"unknown data mode '{mode}'; use corpus (--group-texts) or entries")
    if block_size < 2:
        raise DataError(f"--block-size must be at least 2, got {block_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; examples cannot be separated")
    if any(ex.messages for ex in examples):
        raise DataError(f"{source}: `messages` rows need the tokenizer's chat template (data.chat_examples) first")
    pieces = [(_ids(tokenizer, ex.prompt), _ids(tokenizer, ex.completion)) for ex in examples]
    pieces = [
        (prompt, completion[:-1] if completion[-1:] == [eos] else completion)  # EOS is appended once
        for prompt, completion in pieces
    ]
    if mode == "corpus":
        ids, labels = [], []
        for prompt, completion in pieces:
            ids += prompt + completion + [eos]
            labels += [IGNORE] * len(prompt) + completion + [eos]
        rows = len(ids) // block_size
        if rows == 0:
            raise DataError(
                f"{source}: {len(ids)} tokens in all, fewer than one block of {block_size}; "
                "lower --block-size or give more data"
            )
        ids_t = torch.tensor(ids[: rows * block_size]).view(rows, block_size)
        labels_t = torch.tensor(labels[: rows * block_size]).view(rows, block_size)
        return Blocks(ids_t, labels_t, torch.ones_like(ids_t), source)
    pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        raise DataError(f"the tokenizer has no pad token; pass --pad-token-id (often the EOS id, {eos}) to pad entries")
    ids_t = torch.full((len(pieces), block_size), pad, dtype=torch.long)
    labels_t = torch.full((len(pieces), block_size), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(pieces), block_size), dtype=torch.long)
    for row, (prompt, completion) in enumerate(pieces):
        seq = (prompt + completion + [eos])[:block_size]
        lab = ([IGNORE] * len(prompt) + completion + [eos])[:block_size]
        ids_t[row, : len(seq)] = torch.tensor(seq)
        labels_t[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(seq)] = 1
    _check_truncation(labels_t, pieces, block_size, source)
    return Blocks(ids_t, labels_t, mask, source)


def block_mask(positions: torch.Tensor, form: PackedMask) -> torch.Tensor:
    """The (rows, 1, L, L) attention mask of packed rows: each token sees the earlier tokens of its own example
    (a new example wherever the position restarts at 0); ``bool`` (True: attend) or ``additive`` (0 or the
    float32 minimum, added to the attention scores)."""
    example = torch.cumsum((positions == 0).long(), dim=1)
    causal = torch.ones(positions.shape[1], positions.shape[1], dtype=torch.bool, device=positions.device).tril()
    allowed = ((example[:, :, None] == example[:, None, :]) & causal)[:, None]
    if form == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=torch.float32, device=positions.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min
    )


def pack(blocks: Blocks, keep_apart: PackedMask = "positions") -> Blocks:
    """Rows filled with several whole examples each (in order, a new row when the next does not fit), for
    ``entries`` data: no padding between examples, positions restarting with each, attention that never
    crosses them (``Blocks.batch``, kept apart as ``keep_apart`` says), and each example's first token kept out of
    the loss (unpacked, nothing predicts it), so every example's loss is its unpacked loss."""
    if blocks.position_ids is not None:
        return blocks
    lengths = blocks.attention_mask.sum(dim=1).tolist()
    rows: list[list[int]] = []
    for index, length in enumerate(lengths):
        if rows and sum(lengths[i] for i in rows[-1]) + length <= blocks.input_ids.shape[1]:
            rows[-1].append(index)
        else:
            rows.append([index])
    shape = (len(rows), blocks.input_ids.shape[1])
    ids = torch.zeros(shape, dtype=blocks.input_ids.dtype)
    labels = torch.full(shape, IGNORE, dtype=blocks.labels.dtype)
    mask = torch.zeros(shape, dtype=blocks.attention_mask.dtype)
    positions = torch.zeros(shape, dtype=torch.long)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            n = int(lengths[index])
            ids[row, start : start + n] = blocks.input_ids[index, :n]
            labels[row, start + 1 : start + n] = blocks.labels[index, 1:n]  # the first token stays IGNORE
            mask[row, start : start + n] = 1
            positions[row, start : start + n] = torch.arange(n)
            start += n
        positions[row, start:] = torch.arange(shape[1] - start)  # the padded tail: a sequence of its own
    return Blocks(ids, labels, mask, f"{blocks.source} (packed)", positions, keep_apart)


def _check_truncation(
    labels: torch.Tensor, pieces: list[tuple[list[int], list[int]]], block_size: int, source: str
) -> None:
    """Refuse data whose rows all lost their loss tokens to the block size; warn when some did."""
    empty = int((labels[:, 1:] == IGNORE).all(dim=1).sum())  # the first token is never predicted
    if empty == 0:
        return
    longest = max(len(prompt) for prompt, _ in pieces)
    fits = max(len(prompt) + len(completion) + 1 for prompt, completion in pieces)
    blank = sum(1 for _, completion in pieces if not completion)
    if blank == len(pieces):
        raise DataError(
            f"{source}: no example has a token to learn (every completion or text is empty): training would learn "
            "nothing; give examples with text"
        )
    if empty == len(pieces):
        raise DataError(
            f"{source}: every example's completion lies beyond --block-size {block_size} (the longest "
            f"prompt has {longest} tokens): training would learn nothing. Use --block-size {fits} "
            "(fits every example whole) or shorter prompts"
        )
    if blank:
        warnings.warn(
            f"{source}: {blank} of {len(pieces)} examples are empty (no completion or text) and teach nothing",
            TruncationWarning,
            stacklevel=3,
        )
    if empty > blank:
        warnings.warn(
            f"{source}: {empty - blank} of {len(pieces)} examples have no completion token within --block-size "
            f"{block_size} and teach nothing (the longest prompt has {longest} tokens); --block-size {fits} "
            "fits every example whole",
            TruncationWarning,
            stacklevel=3,
        )


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def data_digest(path: Path, examples: list[Example]) -> str:
    """What a resumed run must see again: a data file's sha256, or for a stored dataset the sha256 of its rows."""
    if path.is_file():
        return file_digest(path)
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.prompt, ex.completion, ex.messages]).encode())
    return "rows:" + digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (a resumed run must see the same data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
