"""Chat-format instruction records: `{"messages": [{"role", "content"}, ...]}` rendered to tokens and an assistant mask.

A conversation is rendered with the tokenizer's chat template (`apply_chat_template`), or, for a base model whose
tokenizer has none, as one Alpaca block per user/assistant exchange (the instruction trainer's template). The tokens
the loss may count are the assistant turns: for turn i, the text from the end of the conversation so far rendered
with the generation prompt up to the end of the conversation through turn i, so the template's end-of-turn marker
(Llama-3's `<|eot_id|>`) is learned with the content, and the header that opens the turn is not.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")


def validate_messages(location: str, messages) -> None:
    """Raise ValueError naming `location` unless `messages` is a conversation the trainer can learn from: a list of
    `{role, content}` with string content, roles in `ROLES`, system only first, and at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{location}: 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ValueError(f"{location}: messages[{j}] must be {{role: one of {list(ROLES)}, content: string}}, "
                             f"got {m!r:.200}")
        if m["role"] == "system" and j > 0:
            raise ValueError(f"{location}: messages[{j}] is a system message after the first turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{location}: the conversation has no assistant turn (nothing to learn)")


def _template_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's text of the conversation and the character spans of its assistant turns."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(through)) or len(through) < len(before):
            raise ValueError("the chat template renders a conversation's beginning differently from the whole "
                             "conversation, so assistant turns cannot be located; use {prompt, response} records")
        spans.append((len(before), len(through)))
    return full, spans


def _alpaca_spans(messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """One Alpaca block per user/assistant exchange (a system message opens the first instruction); spans of the
    responses."""
    from utils.instruct_dataset import fill_template

    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    text, spans, pending = "", [], None
    for m in messages[1 if system else 0 :]:
        if m["role"] == "user":
            pending = m["content"] if pending is None else pending + "\n\n" + m["content"]
            continue
        instruction = pending or ""
        if system and not spans:
            instruction = system + "\n\n" + instruction
        doc, prompt_part = fill_template(template, instruction, m["content"])
        start = len(text) + len(prompt_part)
        text += doc
        spans.append((start, len(text)))
        pending = None
        text += "\n\n"  # between exchanges; trailing separators of the last one are cut below
    return text.removesuffix("\n\n"), spans


def render_chat(tokenizer, messages: list[dict], template: str) -> tuple[list[int], list[bool], bool]:
    """Token ids of one conversation and, per token, whether it belongs to an assistant turn.

    With a chat template the text is tokenized without adding special tokens (the template writes its own BOS and
    markers); without one, as Alpaca documents are (the tokenizer's default special tokens, e.g. Llama-3's BOS). A
    token counts as assistant when any of its characters does: a BPE token merged across the start of a turn is
    trained, as the {prompt, response} path treats a merge at its prompt/response cut.

    Returns:
        (ids, assistant_mask, merged): `merged` is True when some token straddles an assistant turn's edge.
    """
    if getattr(tokenizer, "chat_template", None):
        text, spans = _template_spans(tokenizer, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    else:
        text, spans = _alpaca_spans(messages, template)
        enc = tokenizer(text, return_offsets_mapping=True, verbose=False)
    mask, merged = [], False
    for a, b in enc["offset_mapping"]:
        inside = b > a and any(a < e and b > s for s, e in spans)
        merged |= inside and any(a < s < b or a < e < b for s, e in spans)
        mask.append(inside)
    return list(enc["input_ids"]), mask, merged
