"""Packed instruction-SFT data: Alpaca-template documents concatenated into one token stream and cut into rows.

This reproduces the reference instruction-SFT setup (issue 6): every `{"prompt", "response"}` record becomes one
document, `template` filled in with no trailing newline, tokenized with the tokenizer's default special tokens (so
Llama-3 documents start with BOS) and followed by EOS. All documents form one stream, cut into non-overlapping rows of
`seq_length` tokens; the labels of a row are the next `seq_length` tokens of the stream.

For `--packing doc` each row also carries `position_ids` and `document_ids` that restart at every document start
inside the row, so attention can be kept inside documents (`utils.packing.document_causal_mask` on CPU).

Tokenization (the slow part for ~200k records) is done in batches with the fast tokenizer, whose Rust batch encoder
uses all cores unless TOKENIZERS_PARALLELISM=false (20k records, 5.6M Llama-3 tokens: 10 s on 2 busy cores), and is
cached to disk keyed by the file's sha256, the tokenizer's identity and the template. Rows, shuffling and prompt
masking are rebuilt from the cached tokens (0.2 s for those 5.6M tokens), so changing `seq_length`, `shuffle`, `seed`
or `mask_prompt` reuses the cache.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import Dataset

from utils.data_sources import is_hub_id, load_records
from utils.helper_fns import file_sha256, load_prompt
from utils.packing import row_positions_and_documents

IGNORE_INDEX = -100  # label value that the loss skips (the value torch's cross_entropy ignores by default)
CACHE_VERSION = 2  # bump when the cached payload or its meaning changes
TOKENIZE_CHUNK = 2048  # records per batched tokenizer call: large enough for Rust parallelism, small for memory
# Texts whose encodings identify a tokenizer beyond its name (a converted tokenizer has an empty name_or_path).
_PROBE_TEXTS = [
    "Below is an instruction.\n\n### Response:\n",
    "  Numbers 1234567 and 3.14159, code `x += 1`, unicode: naïve café 東京 🙂",
    "<|endoftext|><|end_of_text|></s>",
]


def fill_template(template: str, prompt: str, response: str) -> tuple[str, str]:
    """The full document and its prompt part (the template up to `{response}`, e.g. ending in `### Response:\\n`).

    Placeholders are `{instruction}` and `{response}`; braces inside the record's text are left alone.
    """
    cut = template.index("{response}")
    prompt_part = template[:cut].replace("{instruction}", prompt)
    suffix = template[cut + len("{response}") :].replace("{instruction}", prompt)
    return prompt_part + response + suffix, prompt_part




def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer for caching: class, name, vocab size, BOS/EOS ids and a hash of a few encodings."""
    probe = tokenizer(_PROBE_TEXTS)["input_ids"]
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "probe_sha256": hashlib.sha256(json.dumps(probe).encode()).hexdigest(),
    }


def _tokenize_documents(tokenizer, records: list[tuple[str, dict]], template: str) -> dict[str, torch.Tensor]:
    """Tokenize every record's document and find which of its tokens are prompt (never trained with `mask_prompt`).

    A `{prompt, response}` record is the template filled in; its prompt is the template up to the response. A chat
    record (`messages`) is rendered by `utils.chat_format.render_chat`; its prompt is everything but the assistant
    turns. Every document ends in EOS, which is trained unless a chat record ends on a non-assistant turn.

    Returns:
        `tokens` int32 (N,) all documents back to back, each ending in EOS; `offsets` int64 (D+1,) document d is
        tokens[offsets[d]:offsets[d+1]]; `prompt_mask` bool (N,) True on prompt tokens; `prompt_lengths` int32 (D,)
        leading prompt tokens of each document; `boundary_merged` bool (D,) True where BPE merged across a
        prompt/response cut, so the prompt's own tokens are not a prefix of the document's and only the common
        prefix counts as prompt.
    """
    from tqdm import tqdm

    from utils.chat_format import render_chat

    eos = tokenizer.eos_token_id
    token_chunks, mask_chunks, lengths, prompt_lengths, merged = [], [], [], [], []
    starts = range(0, len(records), TOKENIZE_CHUNK)
    for start in tqdm(starts, desc="tokenizing documents", unit="chunk", disable=len(starts) < 4):
        docs, prompt_parts = [], []
        chunk = records[start : start + TOKENIZE_CHUNK]
        chats = {j: render_chat(tokenizer, rec["messages"], template) for j, (_, rec) in enumerate(chunk)
                 if "messages" in rec}  # fmt: skip
        for _, rec in chunk:
            if "messages" in rec:
                continue
            doc, prompt_part = fill_template(template, rec["prompt"], rec["response"])
            docs.append(doc)
            prompt_parts.append(prompt_part)
        doc_ids = tokenizer(docs, verbose=False)["input_ids"] if docs else []
        prompt_ids = tokenizer(prompt_parts, verbose=False)["input_ids"] if docs else []
        plain = iter(zip(doc_ids, prompt_ids))
        flat: list[int] = []
        flat_mask: list[bool] = []
        for j in range(len(chunk)):
            if j in chats:
                d, assistant, was_merged = chats[j]
                in_prompt = [not a for a in assistant] + [not assistant[-1]]  # EOS trained after an assistant turn
                n_prompt = next((k for k, x in enumerate(in_prompt) if not x), len(in_prompt))
            else:
                d, p = next(plain)
                if d[: len(p)] == p:
                    n_prompt, was_merged = len(p), False
                else:
                    n_prompt = 0
                    while n_prompt < min(len(p), len(d)) and d[n_prompt] == p[n_prompt]:
                        n_prompt += 1
                    was_merged = True
                in_prompt = [True] * n_prompt + [False] * (len(d) + 1 - n_prompt)
            flat.extend(d)
            flat.append(eos)
            flat_mask.extend(in_prompt)
            lengths.append(len(d) + 1)
            prompt_lengths.append(n_prompt)
            merged.append(was_merged)
        token_chunks.append(torch.tensor(flat, dtype=torch.int32))
        mask_chunks.append(torch.tensor(flat_mask, dtype=torch.bool))
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    return {
        "tokens": torch.cat(token_chunks),
        "prompt_mask": torch.cat(mask_chunks),
        "offsets": offsets,
        "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.int32),
        "chat_documents": sum(1 for _, rec in records if "messages" in rec),
        "boundary_merged": torch.tensor(merged, dtype=torch.bool),
    }


def _records_sha256(records: list[tuple[str, dict]]) -> str:
    """A content hash of loaded records (hub datasets have no single file to hash)."""
    h = hashlib.sha256()
    for _, rec in records:
        h.update(json.dumps(rec, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def validated_records(records: list[tuple[str, dict]], source: str) -> list[tuple[str, dict]]:
    """The `(location, record)` pairs of `source` checked: each a chat record (`messages`, see
    `utils.chat_format`) or one with string `prompt` and `response` (ValueError naming its location otherwise)."""
    if not records:
        raise ValueError(f"{source}: no records")
    from utils.chat_format import validate_messages

    for loc, rec in records:
        if "messages" in rec:
            validate_messages(loc, rec["messages"])
            continue
        for key in ("prompt", "response"):
            if key not in rec:
                raise ValueError(f"{loc}: record has no {key!r} field (keys: {sorted(rec)}; or a chat record: "
                                 f"'messages')")
            if not isinstance(rec[key], str):
                raise ValueError(f"{loc}: {key!r} must be a string, got {type(rec[key]).__name__}")
    return records


class PackedSFTDataset(Dataset):
    """Instruction-SFT documents packed into non-overlapping `seq_length`-token rows of one token stream.

    Item i (after dropping all-masked rows, the i-th kept row r; r = i when nothing is dropped) is a dict of int64
    `(seq_length,)` tensors:
    - `input_ids` = stream[r*L : r*L+L];
    - `labels` = stream[r*L+1 : r*L+L+1], the next tokens, across document boundaries as in the reference (the label
      at a document's EOS is the next document's first token); with `mask_prompt`, labels that are prompt tokens
      (BOS and the template up to `### Response:\\n`) are -100, so the EOS -> next-BOS label is masked too;
    - `position_ids`: 0, 1, ... from the row start and again from each document start inside the row. A row that
      begins mid-document restarts that fragment at 0 as well: rotary attention only sees position differences, and
      varlen kernels split sequences where positions restart;
    - `document_ids`: 0, 1, ... per document (fragment) within the row.

    The stream has N tokens and floor((N-1)/L) full rows (the label of a row's last token must exist); the tail of
    fewer tokens is dropped and counted in `tail_tokens_dropped`.

    Attributes (counts, for the run log): `documents`, `tokens` (N), `rows` (= len), `rows_dropped_all_masked`,
    `boundary_merges` (documents whose prompt tokens are not a token prefix of the document; counted whatever
    `mask_prompt` is, they only matter with it), `tail_tokens_dropped`, `loss_tokens` (labels != -100 over kept rows),
    `cache_hit`, `cache_path`, `chat_documents` (records given as `messages`).

    Args:
        tokenizer: a transformers tokenizer with `eos_token_id` (fast tokenizers make the ~200k-record build fast).
        dataset_path: JSON Lines (or JSON array) of `{"prompt": str, "response": str}`, optionally .gz; or a
            Parquet file or hub dataset id of the same records (`utils.data_sources`). A record may instead be a
            conversation `{"messages": [{"role", "content"}, ...]}` (`utils.chat_format`): with `mask_prompt`, only
            its assistant turns are trained.
        seq_length: tokens per row L (>= 1).
        shuffle: shuffle documents (seeded by `seed`) before concatenation.
        mask_prompt: set prompt-token labels to -100 and drop rows whose labels are all -100.
        seed: document-shuffle seed.
        template: template text with `{instruction}` and `{response}`; None = data/alpaca_sft.prompt byte-exact.
        cache_dir: folder for the tokenization cache; None = `.cache/` next to the data file.
        use_cache: False = neither read nor write the cache.
        split, config: the split and configuration of a hub dataset (unused for local files).

    Raises:
        ValueError: a record that is not a JSON object or lacks a string "prompt"/"response" (naming file:line); an
            empty file; a stream too short for one row; a tokenizer without EOS; a template without `{response}`.
    """

    def __init__(
        self,
        tokenizer,
        dataset_path: str | os.PathLike,
        seq_length: int,
        shuffle: bool,
        mask_prompt: bool = False,
        seed: int = 0,
        template: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        split: str = "train",
        config: str | None = None,
    ):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; documents must end in EOS")
        template = load_prompt("alpaca_sft") if template is None else template
        if "{response}" not in template:
            raise ValueError("template has no {response} placeholder: the prompt/response boundary is undefined")
        if "{instruction}" not in template:
            raise ValueError("template has no {instruction} placeholder: every document would lack its prompt")
        path = Path(dataset_path)
        self.hub = is_hub_id(dataset_path)
        if not self.hub and not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        self.dataset_path, self.seq_length, self.mask_prompt = path, seq_length, mask_prompt
        self.shuffle, self.seed = shuffle, seed
        self.source = f"{dataset_path}[{config + '/' if config else ''}{split}]" if self.hub else path.name

        self.chat_template = bool(getattr(tokenizer, "chat_template", None))
        docs = self._load_or_tokenize(tokenizer, path, template, cache_dir, use_cache, split, config)
        self._build_stream(docs)

    # -- tokenization and cache -------------------------------------------------------------------------------------

    def _load_or_tokenize(self, tokenizer, path: Path, template: str, cache_dir, use_cache: bool, split: str,
                          config: str | None) -> dict:
        records = None
        if self.hub:  # no file to hash: load the records (the `datasets` cache makes this cheap) and hash them
            records = load_records(str(path), split, config)
            content = _records_sha256(records)
        else:
            content = file_sha256(path)
        key_fields = {
            "version": CACHE_VERSION,
            "file_sha256": content,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "chat_template_sha256": hashlib.sha256(str(getattr(tokenizer, "chat_template", None)).encode()).hexdigest(),
        }
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
        self.cache_key, self.cache_hit, self.cache_path = key, False, None
        if use_cache:
            local = path.parent / ".cache"
            folder = Path(cache_dir) if cache_dir is not None else (Path(".cache") if self.hub else local)
            name = f"{path.name}.{config or 'default'}.{split}" if self.hub else path.name
            self.cache_path = folder / f"{name}.{key[:20]}.pt"
            if self.cache_path.exists():
                payload = torch.load(self.cache_path, weights_only=True)
                if payload.get("key") == key:
                    self.cache_hit = True
                    return payload
        # local files: raises ValueError with file:line on malformed JSON / non-object lines
        records = records if records is not None else load_records(path, split, config)
        docs = _tokenize_documents(tokenizer, validated_records(records, self.source), template)
        if use_cache:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_name(self.cache_path.name + f".tmp{os.getpid()}")
            torch.save({**docs, "key": key, "key_fields": json.dumps(key_fields)}, tmp)
            os.replace(tmp, self.cache_path)  # atomic: a concurrent reader never sees half a file
        return docs

    # -- stream, rows and masks -------------------------------------------------------------------------------------

    def _build_stream(self, docs: dict) -> None:
        tokens, offsets = docs["tokens"], docs["offsets"]
        D = len(offsets) - 1
        if self.shuffle:
            order = torch.randperm(D, generator=torch.Generator().manual_seed(self.seed))
        else:
            order = torch.arange(D)
        off = offsets.tolist()
        stream = torch.cat([tokens[off[d] : off[d + 1]] for d in order.tolist()])  # (N,) int32
        doc_lengths = (offsets[1:] - offsets[:-1])[order]
        self._doc_starts = doc_lengths.cumsum(0) - doc_lengths  # (D,) stream offset of each document, ascending
        N, L = len(stream), self.seq_length
        self.documents, self.tokens = D, N
        self.boundary_merges = int(docs["boundary_merged"].sum())
        self.chat_documents = int(docs["chat_documents"])
        n_full = (N - 1) // L
        if n_full == 0:
            raise ValueError(f"{self.dataset_path}: {N} tokens are too few for one row of seq_length {L} (+1 label)")
        self.tail_tokens_dropped = N - n_full * L

        self._stream = stream
        self._label_stream = stream
        self.rows_dropped_all_masked = 0
        self._row_index = torch.arange(n_full)
        if self.mask_prompt:
            # each document's own prompt mask, in the shuffled document order (chat records: all but assistant turns)
            mask = docs["prompt_mask"]
            in_prompt = torch.cat([mask[off[d] : off[d + 1]] for d in order.tolist()])
            self._label_stream = stream.masked_fill(in_prompt, IGNORE_INDEX)
            row_labels = self._label_stream[1 : 1 + n_full * L].view(n_full, L)
            all_masked = (row_labels == IGNORE_INDEX).all(dim=1)
            self.rows_dropped_all_masked = int(all_masked.sum())
            self._row_index = torch.nonzero(~all_masked).squeeze(1)
            self.loss_tokens = int((row_labels[~all_masked] != IGNORE_INDEX).sum())
        else:
            self.loss_tokens = n_full * L
        self.rows = len(self._row_index)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = operator.index(i)
        if not -self.rows <= i < self.rows:
            raise IndexError(f"row {i} out of range: the dataset has {self.rows} rows")
        L = self.seq_length
        a = int(self._row_index[i]) * L
        position_ids, document_ids = row_positions_and_documents(self._doc_starts, a, L)
        return {
            "input_ids": self._stream[a : a + L].long(),
            "labels": self._label_stream[a + 1 : a + L + 1].long(),
            "position_ids": position_ids,
            "document_ids": document_ids,
        }

    def summary(self) -> str:
        """One line for the run log: sizes, what was dropped, and where the tokens came from."""
        masked = (
            f"; prompt masking: {self.rows_dropped_all_masked} all-masked rows dropped, "
            f"{self.boundary_merges} BPE merges at the prompt/response cut"
            if self.mask_prompt
            else ""
        )
        source = f"cache hit {self.cache_path}" if self.cache_hit else f"tokenized (cache: {self.cache_path})"
        if self.chat_documents:
            masked += (f"; {self.chat_documents:,} chat records rendered with "
                       + ("the tokenizer's chat template" if self.chat_template else
                          "the Alpaca template, one block per exchange (the tokenizer has no chat template)"))
        return (
            f"{self.source}: {self.documents:,} documents, {self.tokens:,} tokens -> {self.rows:,} rows x "
            f"{self.seq_length} (tail {self.tail_tokens_dropped} tokens dropped{masked}; "
            f"{self.loss_tokens:,} loss tokens); {source}"
        )


class _Batches:
    """One epoch of stacked batches, re-iterable and sized like a `torch.utils.data.DataLoader` (`iterate_batches`)."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self._pending: Iterator[dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)  # ceil(N / B)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.dataset)
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            items = [self.dataset[int(j)] for j in order[start : start + self.batch_size]]
            yield {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def __next__(self) -> dict[str, torch.Tensor]:
        # Callers written against the earlier generator version call next() on the result directly.
        if self._pending is None:
            self._pending = iter(self)
        return next(self._pending)


def iterate_batches(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> _Batches:
    """Batches of stacked dataset items covering one epoch, as a sized iterable (the CS336 contract, like a DataLoader).

    `len()` is the number of batches of one epoch, ceil(len(dataset) / batch_size); each `iter()` runs one full epoch
    in the same order (the order depends only on `shuffle` and `seed`); `next()` on the result itself also works and
    walks one epoch once.

    Args:
        dataset: a map-style dataset whose items are dicts of equal-shape tensors (e.g. `PackedSFTDataset`).
        batch_size: rows per batch B (>= 1); the last batch holds the remaining len(dataset) % B rows if any.
        shuffle: visit rows in a seeded random order (pass seed + epoch for a new order each epoch).
        seed: row-order seed.

    Returns:
        A sized iterable of dicts of (B, seq_length) tensors, int64 for `PackedSFTDataset` (`input_ids`, `labels`,
        `position_ids`, `document_ids`).

    Raises:
        ValueError: batch_size < 1 (at the call, before any batch is built).
    """
    return _Batches(dataset, batch_size, shuffle, seed)
