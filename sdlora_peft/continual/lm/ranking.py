"""Accuracy of a causal LM on a generative task: rank the task's answers by log-likelihood, or generate greedily.

The ranking is exact and cheap: `choice_log_likelihoods` runs each prompt once, keeps its key/value cache, and
scores every answer in one batched forward over the answers' tokens alone, attending to that cache. An answer's
score is the sum of the log-probabilities of its tokens, end-of-sequence token included, given the prompt.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import fields

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .encode import CausalLMCollator, positions

# transformers 5.24 renamed the key/value cache, argument and output, from `past_key_values` to `cache`
_CACHE = "cache" if "cache" in {field.name for field in fields(CausalLMOutputWithPast)} else "past_key_values"


@torch.no_grad()
def choice_log_likelihoods(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[int]],
    pad_token_id: int,
    max_rows: int = 256,
) -> torch.Tensor:
    """``scores[i, c] = log p(choices[c] | prompts[i])``, summed over the tokens of choice c (token ids; each choice
    ends with the end-of-sequence token). At most `max_rows` answer rows are scored in one forward."""
    model.eval()
    device = next(model.parameters()).device
    per_batch = max(1, max_rows // len(choices))
    collate = CausalLMCollator(pad_token_id)
    scores = []
    for start in range(0, len(prompts), per_batch):
        batch = collate([{"input_ids": p} for p in prompts[start : start + per_batch]])
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        out = model(**batch, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # the first answer token follows the prompt
        rows = [
            _continuations(model, getattr(out, _CACHE), batch["attention_mask"], first, part, pad_token_id, several)
            for part, several in _chunks(choices, max_rows)
        ]
        scores.append(torch.cat(rows, dim=1))
    return torch.cat(scores).cpu()


def _chunks(choices: Sequence[Sequence[int]], max_rows: int) -> Iterator[tuple[Sequence[Sequence[int]], bool]]:
    """The choices in parts of at most `max_rows`, and whether there are several parts (each then needs its own
    copy of the prompts' cache, which a forward extends in place)."""
    several = len(choices) > max_rows
    for start in range(0, len(choices), max_rows):
        yield choices[start : start + max_rows], several


def _continuations(
    model: nn.Module,
    cache,
    prompt_mask: torch.Tensor,
    first: torch.Tensor,
    choices: Sequence[Sequence[int]],
    pad_token_id: int,
    copy_cache: bool,
) -> torch.Tensor:
    """Scores ``[prompts, choices]`` of `choices` after the cached prompts: the first token's log-probability from
    the prompt's last position, the others from one forward of every (prompt, choice) row over the choice's tokens."""
    count, length = len(choices), max(len(choice) for choice in choices)
    device = prompt_mask.device
    tokens = torch.full((count, length), pad_token_id, dtype=torch.long, device=device)
    real = torch.zeros((count, length), dtype=torch.bool, device=device)
    for c, choice in enumerate(choices):
        tokens[c, : len(choice)] = torch.tensor(choice, device=device)
        real[c, : len(choice)] = True
    score = first[:, tokens[:, 0]]  # [prompts, choices]
    if length == 1:
        return score
    cache = copy.deepcopy(cache) if copy_cache else cache
    cache.batch_repeat_interleave(count)
    prompts = len(prompt_mask)
    inputs = tokens[:, :-1].repeat(prompts, 1)  # row p * count + c: prompt p, choice c
    mask = torch.cat([prompt_mask.repeat_interleave(count, dim=0), torch.ones_like(inputs)], dim=1)
    position_ids = positions(mask)[:, -inputs.shape[1] :]
    cached = {_CACHE: cache}
    logits = model(input_ids=inputs, attention_mask=mask, position_ids=position_ids, use_cache=True, **cached).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, 1:].repeat(prompts, 1).unsqueeze(-1))
    later = (log_probs.squeeze(-1) * real[:, 1:].repeat(prompts, 1)).sum(dim=1)
    return score + later.view(prompts, count)


@torch.no_grad()
def greedy_answers(
    model: nn.Module, prompts: Sequence[Sequence[int]], tokenizer, max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """The text each prompt's greedy continuation gives, up to the end-of-sequence token or `max_new_tokens`."""
    model.eval()
    device = next(model.parameters()).device
    collate = CausalLMCollator(tokenizer.pad_token_id)
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = collate([{"input_ids": p} for p in prompts[start : start + batch_size]])
        generated = model.generate(  # type: ignore[operator]
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        new = generated[:, batch["input_ids"].shape[1] :]
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return answers
