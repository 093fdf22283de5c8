"""PackedSFTDataset vs a naive re-implementation, prompt masking, the tokenization cache, and doc-packed forward."""

import gzip
import json
import shutil

import pytest
import torch

from utils.helper_fns import DATA_DIR, load_prompt, read_jsonl
from utils.instruct_dataset import PackedSFTDataset, fill_template, iterate_batches
from utils.packing import document_causal_mask
from utils.post_train import get_response_log_probs
from utils.tiny_models import build_tiny_model, train_tiny_tokenizer

SAMPLE = DATA_DIR / "sft-instruct" / "sample_train.jsonl"
TEMPLATE = load_prompt("alpaca_sft")


def test_fill_template_is_byte_exact_and_literal():
    doc, prompt_part = fill_template(TEMPLATE, "Echo {response} and {x}.", "Sure: {instruction} {0}")
    assert doc == TEMPLATE.format(instruction="Echo {response} and {x}.", response="Sure: {instruction} {0}")
    assert prompt_part.endswith("Echo {response} and {x}.\n\n### Response:\n") and doc.startswith(prompt_part)
    assert not doc.endswith("\n")  # the alpaca template ends without a newline


def naive_documents(tokenizer, records, mask_prompt=False):
    """One token list per record (template via str.format, default special tokens, EOS appended) and its labels mask.

    Returns (docs, in_prompt): in_prompt[d][j] is True where token j of document d is a prompt token. The prompt part
    is assumed to tokenize to a prefix of the document (true for the bundled sample; checked here).
    """
    docs, in_prompt = [], []
    for rec in records:
        text = TEMPLATE.format(instruction=rec["prompt"], response=rec["response"])
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        prompt_text = text[: len(text) - len(rec["response"])]
        assert prompt_text.endswith("### Response:\n")
        p = tokenizer(prompt_text)["input_ids"]
        assert ids[: len(p)] == p
        docs.append(ids)
        in_prompt.append([mask_prompt and j < len(p) for j in range(len(ids))])
    return docs, in_prompt


def naive_rows(docs, in_prompt, L):
    """Rows of the concatenated stream, labels = next tokens (-100 on prompt tokens), all-masked rows dropped."""
    stream = [t for d in docs for t in d]
    label_stream = [-100 if m else t for d, ms in zip(docs, in_prompt) for t, m in zip(d, ms)]
    starts = {sum(len(d) for d in docs[:k]) for k in range(len(docs))}
    rows, dropped = [], 0
    for r in range((len(stream) - 1) // L):
        a = r * L
        labels = label_stream[a + 1 : a + L + 1]
        if all(x == -100 for x in labels):
            dropped += 1
            continue
        doc_ids, pos_ids, doc, pos = [], [], -1, 0
        for j in range(a, a + L):
            if j == a or j in starts:
                doc, pos = doc + 1, 0
            doc_ids.append(doc)
            pos_ids.append(pos)
            pos += 1
        row = {"input_ids": stream[a : a + L], "labels": labels, "document_ids": doc_ids, "position_ids": pos_ids}
        rows.append(row)
    return rows, dropped


def as_lists(item):
    return {k: v.tolist() for k, v in item.items()}


@pytest.mark.parametrize("tok_name", ["tiny_llama_tokenizer", "tiny_qwen_tokenizer", "llama3_tokenizer"])
def test_rows_match_naive_reference(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    L = 48
    ds = PackedSFTDataset(tok, SAMPLE, seq_length=L, shuffle=False, use_cache=False)
    records = read_jsonl(SAMPLE)
    docs, in_prompt = naive_documents(tok, records)
    expected, dropped = naive_rows(docs, in_prompt, L)
    N = sum(len(d) for d in docs)
    assert (ds.documents, ds.tokens, len(ds), ds.rows) == (len(records), N, (N - 1) // L, (N - 1) // L)
    assert dropped == ds.rows_dropped_all_masked == 0 and ds.tail_tokens_dropped == N - len(ds) * L
    for i in range(len(ds)):
        item = ds[i]
        assert all(v.dtype == torch.long and v.shape == (L,) for v in item.values())
        assert as_lists(item) == expected[i]
        assert torch.equal(item["labels"][:-1], item["input_ids"][1:])  # labels are the next tokens
    assert as_lists(ds[-1]) == expected[-1]
    for bad in (len(ds), len(ds) + 7, -len(ds) - 1):
        with pytest.raises(IndexError):
            ds[bad]

    # BOS opens every document (Llama-3 family), EOS closes every document, and they meet between documents.
    rows = next(iterate_batches(ds, batch_size=len(ds), shuffle=False))
    stream = torch.cat([rows["input_ids"].flatten(), rows["labels"][-1, -1:]]).tolist()
    eos_at = [j for j, t in enumerate(stream) if t == tok.eos_token_id]
    doc_ends = [sum(len(d) for d in docs[: k + 1]) - 1 for k in range(len(docs))]
    assert eos_at == [e for e in doc_ends if e < len(stream)]
    if tok.bos_token_id is not None:
        bos_at = [j for j, t in enumerate(stream) if t == tok.bos_token_id]
        assert bos_at == [0] + [e + 1 for e in eos_at if e + 1 < len(stream)]
        assert len(bos_at) == len(records)


def test_shuffle_changes_order_keeps_documents(tiny_llama_tokenizer):
    tok = tiny_llama_tokenizer

    def stream_and_docs(shuffle, seed):
        # seq_length 1: the rows' inputs plus the last label are the whole stream, nothing dropped.
        ds = PackedSFTDataset(tok, SAMPLE, seq_length=1, shuffle=shuffle, seed=seed, use_cache=False)
        rows = next(iterate_batches(ds, batch_size=len(ds), shuffle=False))
        stream = torch.cat([rows["input_ids"].flatten(), rows["labels"][-1, -1:]]).tolist()
        bos_at = [j for j, t in enumerate(stream) if t == tok.bos_token_id] + [len(stream)]
        return stream, [tuple(stream[a:b]) for a, b in zip(bos_at, bos_at[1:])]

    plain, plain_docs = stream_and_docs(False, 0)
    shuffled, shuffled_docs = stream_and_docs(True, 0)
    again, _ = stream_and_docs(True, 0)
    other, _ = stream_and_docs(True, 1)
    assert shuffled != plain and other != shuffled and again == shuffled
    assert sorted(shuffled) == sorted(plain)  # the multiset of tokens
    assert sorted(shuffled_docs) == sorted(plain_docs) and len(plain_docs) == 42  # whole documents move
    assert plain_docs == [tuple(d) for d in naive_documents(tok, read_jsonl(SAMPLE))[0]] and shuffled_docs != plain_docs


@pytest.mark.parametrize("tok_name", ["tiny_llama_tokenizer", "llama3_tokenizer"])
def test_mask_prompt_labels_and_dropped_rows(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    L = 12  # shorter than every prompt part, so some rows lie entirely inside a prompt
    ds = PackedSFTDataset(tok, SAMPLE, seq_length=L, shuffle=False, mask_prompt=True, use_cache=False)
    docs, in_prompt = naive_documents(tok, read_jsonl(SAMPLE), mask_prompt=True)
    expected, dropped = naive_rows(docs, in_prompt, L)
    assert dropped > 0 and ds.rows_dropped_all_masked == dropped and ds.boundary_merges == 0
    assert len(ds) == len(expected) == (ds.tokens - 1) // L - dropped
    assert [as_lists(ds[i]) for i in range(len(ds))] == expected
    assert ds.loss_tokens == sum(sum(x != -100 for x in r["labels"]) for r in expected)
    unmasked = PackedSFTDataset(tok, SAMPLE, seq_length=L, shuffle=False, use_cache=False)
    assert len(unmasked) == len(ds) + dropped


def test_boundary_merge_is_counted_and_masks_common_prefix(tmp_path, llama3_tokenizer):
    tok = llama3_tokenizer
    path = tmp_path / "merge.jsonl"
    records = [
        {"prompt": "Say hi.", "response": "Hi."},
        {"prompt": "Say hi on a new line.", "response": "\nHi."},  # ':\n' + '\n' becomes the single token ':\n\n'
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    docs = [tok(TEMPLATE.format(instruction=r["prompt"], response=r["response"]))["input_ids"] for r in records]
    prompts = [tok(TEMPLATE.split("{response}")[0].format(instruction=r["prompt"]))["input_ids"] for r in records]
    assert docs[0][: len(prompts[0])] == prompts[0]
    assert docs[1][: len(prompts[1])] != prompts[1]
    common = len(prompts[1]) - 1  # everything but the final ':\n' token is shared
    assert docs[1][:common] == prompts[1][:common] and docs[1][common] != prompts[1][common]

    stream = docs[0] + [tok.eos_token_id] + docs[1] + [tok.eos_token_id]
    ds = PackedSFTDataset(tok, path, seq_length=len(stream) - 1, shuffle=False, mask_prompt=True, use_cache=False)
    assert ds.boundary_merges == 1 and len(ds) == 1
    masked = [True] * len(prompts[0]) + [False] * (len(docs[0]) + 1 - len(prompts[0]))
    masked += [True] * common + [False] * (len(docs[1]) + 1 - common)
    assert ds[0]["labels"].tolist() == [-100 if m else t for t, m in zip(stream, masked)][1:]
    assert ds[0]["input_ids"].tolist() == stream[:-1]


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt": "Hello"}', "no 'response' field"),
        ('{"response": "Hello"}', "no 'prompt' field"),
        ('["prompt", "response"]', "expected a JSON object"),
        ('{"prompt": 3, "response": "x"}', "'prompt' must be a string"),
        ('{"prompt": "a", "response": null}', "'response' must be a string"),
        ('{"prompt": "a", "response": "b"', "malformed JSON"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, tiny_llama_tokenizer, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine", "response": "also fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{message}"):
        PackedSFTDataset(tiny_llama_tokenizer, path, seq_length=8, shuffle=False, use_cache=False)


def test_cache_hit_identical_and_changed_settings_miss(tmp_path, tiny_llama_tokenizer, tiny_qwen_tokenizer):
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    shutil.copy(SAMPLE, data)

    def build(**kw):
        args = dict(tokenizer=tiny_llama_tokenizer, dataset_path=data, seq_length=32, shuffle=True, mask_prompt=True)
        return PackedSFTDataset(**{**args, **kw})

    first = build()
    assert not first.cache_hit and first.cache_path.parent == data.parent / ".cache" and first.cache_path.exists()
    second = build()
    assert second.cache_hit and second.cache_path == first.cache_path
    assert len(second) == len(first) and all(
        as_lists(second[i]) == as_lists(first[i]) for i in range(len(first))
    )
    # Settings applied after tokenization reuse the cache and still give the uncached rows.
    reused = build(seq_length=20, shuffle=False, mask_prompt=False)
    fresh = build(seq_length=20, shuffle=False, mask_prompt=False, use_cache=False)
    assert reused.cache_hit and [as_lists(reused[i]) for i in range(len(reused))] == [
        as_lists(fresh[i]) for i in range(len(fresh))
    ]
    # What changes the tokens misses: the template, the tokenizer, the file's bytes.
    assert not build(template=TEMPLATE.replace("### Response:", "### Answer:")).cache_hit
    assert not build(tokenizer=tiny_qwen_tokenizer).cache_hit
    # Same class, name, size and special-token ids, different merges: only the probe encodings tell them apart.
    retrained = train_tiny_tokenizer([r["response"] for r in read_jsonl(SAMPLE)], family="llama", vocab_size=600)
    assert len(retrained) == len(tiny_llama_tokenizer) and retrained.eos_token_id == tiny_llama_tokenizer.eos_token_id
    assert not build(tokenizer=retrained).cache_hit
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "One more.", "response": "Added."}) + "\n")
    changed = build()
    assert not changed.cache_hit and changed.documents == first.documents + 1
    assert len(list((data.parent / ".cache").glob("*.pt"))) == 5
    elsewhere = build(cache_dir=tmp_path / "elsewhere")
    assert not elsewhere.cache_hit and elsewhere.cache_path.parent == tmp_path / "elsewhere"


def test_gzip_input_gives_same_rows(tmp_path, tiny_qwen_tokenizer):
    gz = tmp_path / "train.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(SAMPLE.read_bytes())
    a = PackedSFTDataset(tiny_qwen_tokenizer, gz, seq_length=40, shuffle=False, use_cache=False)
    b = PackedSFTDataset(tiny_qwen_tokenizer, SAMPLE, seq_length=40, shuffle=False, use_cache=False)
    assert len(a) == len(b) and all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(len(a)))


def test_iterate_batches(tiny_llama_tokenizer):
    ds = PackedSFTDataset(tiny_llama_tokenizer, SAMPLE, seq_length=64, shuffle=False, use_cache=False)
    n, B = len(ds), 10
    assert n % B != 0
    batches = list(iterate_batches(ds, B, shuffle=False))
    assert [b["input_ids"].shape for b in batches] == [(B, 64)] * (n // B) + [(n % B, 64)]
    assert set(batches[0]) == {"input_ids", "labels", "position_ids", "document_ids"}
    assert all(v.dtype == torch.long for b in batches for v in b.values())
    in_order = torch.cat([b["input_ids"] for b in batches])
    assert torch.equal(in_order, torch.stack([ds[i]["input_ids"] for i in range(n)]))

    shuffled = torch.cat([b["input_ids"] for b in iterate_batches(ds, B, shuffle=True, seed=3)])
    assert not torch.equal(shuffled, in_order)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, in_order.tolist()))  # each row once
    again = torch.cat([b["input_ids"] for b in iterate_batches(ds, B, shuffle=True, seed=3)])
    assert torch.equal(again, shuffled)
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(ds, 0, shuffle=False))


@pytest.mark.parametrize("mask_form", ["bool", "position_ids_only"])
def test_doc_packing_matches_each_document_alone(tiny_llama_tokenizer, mask_form):
    tok = tiny_llama_tokenizer
    model = build_tiny_model(
        "llama", len(tok), hidden_size=64, num_heads=2, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id
    ).eval()
    ds = PackedSFTDataset(tok, SAMPLE, seq_length=96, shuffle=True, seed=1, mask_prompt=True, use_cache=False)
    batch = next(iterate_batches(ds, batch_size=6, shuffle=False))
    assert (batch["document_ids"].max(dim=1).values >= 1).sum() >= 3  # several rows hold more than one document
    kwargs = {"position_ids": batch["position_ids"], "use_cache": False}
    if mask_form == "bool":
        kwargs["attention_mask"] = document_causal_mask(batch["document_ids"])
    with torch.no_grad():
        packed = get_response_log_probs(model, batch["input_ids"], batch["labels"], **kwargs)["log_probs"]
        plain = get_response_log_probs(model, batch["input_ids"], batch["labels"], use_cache=False)["log_probs"]

    leaked, segments = 0.0, 0
    for b in range(batch["input_ids"].shape[0]):
        for d in batch["document_ids"][b].unique().tolist():
            sel = batch["document_ids"][b] == d
            ids, labels = batch["input_ids"][b, sel][None], batch["labels"][b, sel][None]
            # segments are whole documents: BOS first (unless cut by the row start), EOS last (unless cut by its end)
            assert d == 0 or ids[0, 0] == tok.bos_token_id
            assert sel[-1] or ids[0, -1] == tok.eos_token_id
            with torch.no_grad():
                alone = get_response_log_probs(model, ids, labels, use_cache=False)["log_probs"][0]
            torch.testing.assert_close(packed[b, sel], alone, atol=1e-5, rtol=0)
            leaked = max(leaked, (plain[b, sel] - alone).abs().max().item())
            segments += 1
    assert segments > 6 and leaked > 1e-3  # plain causal attention over the row mixes documents


def test_bundled_samples_are_disjoint_and_varied(tiny_llama_tokenizer):
    train, test = read_jsonl(SAMPLE), read_jsonl(SAMPLE.with_name("sample_test.jsonl"))
    assert (len(train), len(test)) == (42, 10)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}  # no test prompt leaks into train
    for path, records in ((SAMPLE, train), (SAMPLE.with_name("sample_test.jsonl"), test)):
        docs, _ = naive_documents(tiny_llama_tokenizer, records)
        lengths = sorted(len(d) for d in docs)
        assert lengths[-1] >= 2 * lengths[0]  # short and long documents, so rows mix several and split some
        ds = PackedSFTDataset(tiny_llama_tokenizer, path, seq_length=64, shuffle=False, use_cache=False)
        assert ds.documents == len(records) and ds.tokens == sum(lengths)
