"""Chat-format records (utils/chat_format.py) in the instruction trainer: the assistant mask on the real Llama-3
tokenizer, equivalence with {prompt, response} records when the templates agree, validation."""

import copy
import json
from pathlib import Path

import pytest
import torch

from utils.chat_format import render_chat
from utils.helper_fns import load_prompt
from utils.instruct_dataset import IGNORE_INDEX, PackedSFTDataset

REPO = Path(__file__).resolve().parent.parent
# Written here (not read from a model): the Llama-3 instruct layout of headers and end-of-turn markers.
LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# The Alpaca document of data/alpaca_sft.prompt as a chat template: single-turn chats render as {prompt, response}.
ALPACA_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Below is an instruction that "
               "describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n"
               "{{ m['content'] }}\n\n### Response:\n{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]


def _with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_assistant_mask_is_exactly_the_assistant_turns_on_llama3(llama3_tokenizer):
    tok = _with_template(llama3_tokenizer, LLAMA3_STYLE)
    ids, mask, merged = render_chat(tok, CONVERSATION, load_prompt("alpaca_sft"))
    special = tok.convert_tokens_to_ids
    bos, sh, eh, eot = (special(t) for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                             "<|eot_id|>"))  # fmt: skip
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    # (tokens, trained) by hand: headers, the "\n\n" after them, system and user turns are prompt; each assistant
    # reply and its <|eot_id|> are trained.
    segments = [([bos], False)]
    for m in CONVERSATION:
        trained = m["role"] == "assistant"
        segments += [([sh], False), (enc(m["role"]), False), ([eh], False), (enc("\n\n"), False),
                     (enc(m["content"]), trained), ([eot], trained)]  # fmt: skip
    expected_ids = [t for seg, _ in segments for t in seg]
    expected_mask = [flag for seg, flag in segments for _ in seg]
    assert ids == expected_ids
    assert mask == expected_mask and not merged
    assert sum(mask) == len(enc("4.")) + len(enc("It is 6.")) + 2  # two replies, two <|eot_id|>


def test_packed_chat_labels_train_only_assistant_tokens(llama3_tokenizer, tmp_path):
    tok = _with_template(llama3_tokenizer, LLAMA3_STYLE)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    ids, mask, _ = render_chat(tok, CONVERSATION, load_prompt("alpaca_sft"))
    stream = ids + [tok.eos_token_id]
    trained = mask + [True]  # the conversation ends on an assistant turn: its EOS is trained
    L = len(stream) - 1  # one row: inputs stream[:-1], labels stream[1:]
    ds = PackedSFTDataset(tok, data, seq_length=L, shuffle=False, mask_prompt=True, use_cache=False)
    assert len(ds) == 1 and ds.chat_documents == 1
    labels = ds[0]["labels"].tolist()
    assert labels == [t if m else IGNORE_INDEX for t, m in zip(stream[1:], trained[1:])]
    assert "chat template" in ds.summary()


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_single_turn_chat_equals_prompt_response_when_templates_agree(llama3_tokenizer, tmp_path, mask_prompt):
    tok = _with_template(llama3_tokenizer, ALPACA_CHAT)
    src = REPO / "data" / "sft-instruct" / "sample_train.jsonl"
    records = [json.loads(line) for line in src.read_text().splitlines()]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["response"]}]}) + "\n"
                            for r in records))  # fmt: skip
    kw = dict(seq_length=64, shuffle=True, seed=3, mask_prompt=mask_prompt, use_cache=False)
    a, b = PackedSFTDataset(tok, src, **kw), PackedSFTDataset(tok, chat, **kw)
    assert len(a) == len(b) > 3 and a.loss_tokens == b.loss_tokens
    for i in range(len(a)):
        for key in ("input_ids", "labels", "position_ids", "document_ids"):
            assert torch.equal(a[i][key], b[i][key]), (i, key)


def test_instruct_trainer_chat_records_train_like_prompt_response_without_a_chat_template(tmp_path, capsys):
    """The tiny model's tokenizer has no chat template: chats become Alpaca documents (said in the log), and a
    single-turn chat file trains exactly like the {prompt, response} file."""
    import train_sft_instruct as T

    src = REPO / "data" / "sft-instruct" / "sample_train.jsonl"
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["response"]}]}) + "\n"
                            for r in map(json.loads, src.read_text().splitlines())))  # fmt: skip
    losses = {}
    for name, train in (("plain", src), ("chat", chat)):
        args = T.parse_args(["--preset", "demo", "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / name),
                             "--run-name", name, "--train-file", str(train), "--max-steps", "3", "--eval-every", "-1",
                             "--mask-prompt", "--packing", "doc"])
        run = Path(T.main(args)["run_dir"])
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses["plain"]) == 3 and losses["plain"] == losses["chat"]
    assert "the Alpaca template, one block per exchange (the tokenizer has no chat template)" in capsys.readouterr().out


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "bot", "content": "hi"}], r"messages\[0\] must be"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}],
     r"messages\[1\] is a system message"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], r"messages\[0\] must be"),
])  # fmt: skip
def test_bad_conversations_name_the_line(tmp_path, tiny_llama_tokenizer, messages, message):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ValueError, match=rf"chat.jsonl:2: .*{message}"):
        PackedSFTDataset(tiny_llama_tokenizer, data, seq_length=8, shuffle=False, use_cache=False)
