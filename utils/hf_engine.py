"""The HF transformers backend of `utils.inference`: batched generation with a causal LM (a model folder, or the live
training policy without a copy), following vLLM's conventions for stop strings, EOS and decoding (utils/inference.py
lists them).
"""

from __future__ import annotations

import torch

from utils.engine_base import (Completion, InferenceEngine, SamplingConfig, _unwrap_compiled, policy_state_dict,
                               request_seed)  # fmt: skip


def find_stop(text: str, stop: list[str], include_stop_str_in_output: bool) -> int | None:
    """Where to cut `text` for the stop string that completes earliest (ties: earlier in `stop`), or None.

    Mirrors vLLM's detokenizer: with `include_stop_str_in_output` the cut is at the end of the stop string, otherwise
    at its start.
    """
    best_start, best_end = None, None
    for s in stop:
        i = text.find(s)
        if i != -1 and (best_end is None or i + len(s) < best_end):
            best_start, best_end = i, i + len(s)
    if best_end is None:
        return None
    return best_end if include_stop_str_in_output else best_start


def _decode(tokenizer, ids: list[int]) -> str:
    # vLLM's incremental detokenizer holds back bytes of an unfinished UTF-8 character; a full decode renders them as
    # U+FFFD. Dropping trailing U+FFFD gives vLLM's text (a real trailing U+FFFD is vanishingly rare in model output).
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def _eos_ids(tokenizer, model) -> set[int]:
    """EOS ids as vLLM uses them: the tokenizer's EOS plus the generation config's `eos_token_id` (int or list)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return ids


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_p: float,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:  # fmt: skip
    """Pick the next token per row: argmax when temperature == 0, else a draw from softmax(logits / T) restricted to
    the smallest set of tokens whose probability reaches `top_p` (nucleus sampling).

    Args:
        logits: (B, V) float32 next-token logits.
        generator: one generator for the batch, or one per row (each row's draws then depend on that row alone).

    Returns:
        (B,) int64 token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, sorted_ids, sorted_probs)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p[None], num_samples=1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


class HFEngine(InferenceEngine):
    """Batched generation with a transformers causal LM: left padding, KV cache, one forward per new token.

    `model` may be the live training policy: generation runs under `torch.no_grad()` in eval mode and restores the
    module's training mode afterwards; its weights are shared, never copied.
    """

    backend = "hf"

    def __init__(self, model, tokenizer, seed: int = 0, max_num_seqs: int = 256, max_model_len: int | None = None,
                 model_name: str = "", eos_token_ids: set[int] | None = None):  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_num_seqs = max_num_seqs
        module = _unwrap_compiled(model)
        self.max_model_len = max_model_len or getattr(module.config, "max_position_embeddings", None)
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else _eos_ids(tokenizer, module)
        # Pads only fill masked positions, so any id works; Llama-3 has no pad token and uses its EOS.
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids, default=0)
        self.device = next(module.parameters()).device
        self._generator = torch.Generator(device=self.device).manual_seed(seed)

    def load_weights(self, policy) -> None:
        """No-op when the engine wraps `policy` itself; otherwise copies `policy`'s weights in (strict)."""
        if _unwrap_compiled(policy) is _unwrap_compiled(self.model):
            return
        target = _unwrap_compiled(self.model)
        names = set(target.state_dict())
        target.load_state_dict({k: v for k, v in policy_state_dict(policy).items() if k in names}, strict=True)

    def generate(self, prompts: list[str], sampling: SamplingConfig, use_tqdm: bool = True,
                 request_keys: list[int] | None = None) -> list[list[Completion]]:  # fmt: skip
        from tqdm.auto import tqdm

        prompt_ids = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        for i, ids in enumerate(prompt_ids):
            if self.max_model_len is not None and len(ids) >= self.max_model_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens, no room to generate within max_model_len "
                                 f"{self.max_model_len}")  # fmt: skip
        if request_keys is not None and len(request_keys) != len(prompts):
            raise ValueError(f"{len(request_keys)} request keys for {len(prompts)} prompts")
        seeded = request_keys is not None and sampling.seed is not None and sampling.temperature > 0
        generator = self._generator
        if sampling.seed is not None and not seeded:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)

        def row_generator(i: int, j: int):
            if not seeded:
                return generator
            return torch.Generator(device=self.device).manual_seed(request_seed(sampling.seed, request_keys[i], j))
        # One request per (prompt, sample); longest prompts first so each batch pads little.
        requests = [(i, j) for i in range(len(prompts)) for j in range(sampling.n)]
        requests.sort(key=lambda r: -len(prompt_ids[r[0]]))
        results: list[list[Completion | None]] = [[None] * sampling.n for _ in prompts]
        module = _unwrap_compiled(self.model)
        was_training = module.training
        module.eval()
        try:
            bar = tqdm(total=len(requests), desc="generate (hf)", disable=not use_tqdm, leave=False)
            for start in range(0, len(requests), self.max_num_seqs):
                batch = requests[start : start + self.max_num_seqs]
                gens = [row_generator(i, j) for i, j in batch] if seeded else generator
                outs = self._generate_batch(module, [prompt_ids[i] for i, _ in batch], sampling, gens)
                for (i, j), completion in zip(batch, outs):
                    results[i][j] = completion
                bar.update(len(batch))
            bar.close()
        finally:
            module.train(was_training)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_batch(self, model, prompt_ids: list[list[int]], sampling: SamplingConfig,
                        generator: torch.Generator | list[torch.Generator]) -> list[Completion]:  # fmt: skip
        B, L = len(prompt_ids), max(len(p) for p in prompt_ids)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        for b, ids in enumerate(prompt_ids):  # left padding: every row's next token lands in the last column
            input_ids[b, L - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, L - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # positions restart after the padding
        budgets = [
            sampling.max_tokens if self.max_model_len is None else min(sampling.max_tokens, self.max_model_len - len(p))
            for p in prompt_ids
        ]
        generated: list[list[int]] = [[] for _ in range(B)]
        done: list[Completion | None] = [None] * B
        past, step_ids, step_pos = None, input_ids, position_ids
        for _ in range(max(budgets)):
            out = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=step_pos,
                        past_key_values=past, use_cache=True, logits_to_keep=1)  # fmt: skip
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()  # (B, V)
            next_ids = sample_next_token(logits, sampling.temperature, sampling.top_p, generator)
            next_list = next_ids.tolist()
            for b in range(B):
                if done[b] is not None:
                    continue
                generated[b].append(next_list[b])
                done[b] = self._finished(generated[b], next_list[b], budgets[b], sampling)
            if all(d is not None for d in done):
                break
            finished = torch.tensor([d is not None for d in done], device=self.device)
            step_ids = next_ids.masked_fill(finished, self.pad_token_id)[:, None]  # (B, 1); finished rows idle
            step_pos = step_pos[:, -1:] + 1
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
        # Rows still running after max(budgets) steps are at their budget.
        return [d or Completion(_decode(self.tokenizer, g), g, "length") for d, g in zip(done, generated)]

    def _finished(self, ids: list[int], last: int, budget: int, sampling: SamplingConfig) -> Completion | None:
        """The Completion if the sample ended with its latest token (EOS, stop string, budget), else None."""
        if last in self.eos_token_ids:
            return Completion(_decode(self.tokenizer, ids), list(ids), "stop")
        if sampling.stop:
            text = _decode(self.tokenizer, ids)
            cut = find_stop(text, sampling.stop, sampling.include_stop_str_in_output)
            if cut is not None:
                return Completion(text[:cut], list(ids), "stop")
        if len(ids) >= budget:
            return Completion(_decode(self.tokenizer, ids), list(ids), "length")
        return None
