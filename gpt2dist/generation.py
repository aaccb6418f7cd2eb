"""Text generation for `predict`, samples and the export's sample: batched, greedy or sampled.

Each row's output depends only on its prompt, the model, the settings and its own seed, never on which
other prompts share its batch or which rank runs it: prompts are left-padded (masked, with the positions
Hugging Face's `generate` derives from the mask), the repetition penalty skips the padding, and sampling
draws from a generator per row (`RowSampler`) instead of the one global RNG `generate(do_sample=True)` uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, StopStringCriteria,
                          SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from gpt2dist.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy (do_sample false) or sampled from the tempered, top-k/top-p cut softmax;
    and where a row stops early (EOS, or the token that completes one of `stop_strings`)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()

    def check(self, where: str = "model") -> None:
        bad = [(f"{where}.temperature={self.temperature}", "must be > 0", self.temperature > 0),
               (f"{where}.top_k={self.top_k}", "must be >= 0 (0: no cut)", self.top_k >= 0),
               (f"{where}.top_p={self.top_p}", "must be in (0, 1] (1: no cut)", 0 < self.top_p <= 1),
               (f"{where}.repetition_penalty={self.repetition_penalty}", "must be > 0 (1: none)", self.repetition_penalty > 0)]
        bad.append((f"{where}.stop_strings", "must not hold an empty string", all(self.stop_strings)))
        # Greedy decoding reads none of them: set without do_sample, they would change nothing, silently.
        unused = [f"{k}={v}" for k, v, off in (("temperature", self.temperature, 1.0), ("top_k", self.top_k, 0),
                                               ("top_p", self.top_p, 1.0)) if v != off]
        bad.append((f"{where}." + f", {where}.".join(unused), ("only apply" if len(unused) > 1 else "only applies") +
                    f" when sampling: set {where}.do_sample=true, "
                    f"or drop them for greedy decoding", self.do_sample or not unused))
        for what, rule, ok in bad:
            if not ok:
                raise ConfigError(f"{what} {rule}")


GREEDY = Sampling()


def prompt_ids(tokenizer, prompt: str, n_positions: int, what: str = "prompt") -> list[int]:
    """The token ids generation starts from, encoded as packing encodes documents: without the tokenizer's
    special tokens (a Llama-style tokenizer's <s>, which training never showed the model, conditioned every
    prompt on it). An empty prompt starts from EOS, which precedes every packed document (an empty input
    cannot be run); one that leaves no position to generate into is refused."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
    if len(ids) >= n_positions:
        shown = prompt[:40] + ("..." if len(prompt) > 40 else "")
        raise ConfigError(f"{what} {shown!r} is {len(ids)} tokens, which leaves none of the model's n_positions="
                          f"{n_positions} to generate into; shorten it to at most {n_positions - 1} tokens")
    return ids


def row_seed(seed: int, index: int, sample: int = 0) -> int:
    """The seed of one output row (prompt `index`, its `sample`-th continuation): a fixed mix, so a row
    draws the same tokens in any batch, on any rank, and each (index, sample) draws its own."""
    return (seed * 1_000_003 + index * 10_007 + sample) % (2**63 - 1)


class RepetitionPenaltyAfterPadding(LogitsProcessor):
    """CTRL's repetition penalty (as transformers' RepetitionPenaltyLogitsProcessor: divide a positive
    logit, multiply a negative one) over each row's own tokens only: its left padding is not text."""

    def __init__(self, penalty: float, pad_lengths: list[int]):
        self.penalty, self.pad_lengths = penalty, pad_lengths

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for i, pad in enumerate(self.pad_lengths):
            ids = input_ids[i, pad:]
            got = scores[i].gather(0, ids)
            scores[i].scatter_(0, ids, torch.where(got < 0, got * self.penalty, got / self.penalty))
        return scores


class RowSampler(LogitsProcessor):
    """Samples each row's next token from softmax(scores) with that row's own generator, then leaves only
    that token finite, so `generate`'s greedy step takes it. Last in the list: the scores it sees are
    already tempered and cut."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        picks = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks[:, None], 0.0)


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[str], max_new_tokens: int, sampling: Sampling = GREEDY,
                 seeds: list[int] | None = None, real_vocab: int | None = None) -> list[list[int]]:
    """Each prompt's token ids followed by its new ones (up to and with EOS), by a GPT2LMHeadModel on its
    own device, in one `generate` per group of rows with the same token budget. Vocabulary rows from
    `real_vocab` (default: the config's unpadded_vocab_size) or the tokenizer's size up, padding, are never
    produced. `seeds` (one per prompt) are needed when sampling."""
    if sampling.do_sample and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt")
    device = next(model.parameters()).device
    n_positions = model.config.n_positions
    ids = [prompt_ids(tokenizer, p, n_positions) for p in prompts]
    # Each row's budget: max_new_tokens, or what its prompt leaves of n_positions. Rows are grouped by
    # budget, so a long prompt near the context end does not shorten the others in its batch.
    budget = [max(1, min(max_new_tokens, n_positions - len(x))) for x in ids]
    # A padded model (pad_vocab_to_multiple_of) says its real vocabulary in its config: rows past it
    # are zero, and a zero logit can beat every real one.
    real_vocab = real_vocab or getattr(model.config, "unpadded_vocab_size", None) or model.config.vocab_size
    # A model wider than its tokenizer (config_overrides.vocab_size 50304, a folder saved padded): ids past
    # the tokenizer decode to '' and were generated, each a step of the budget lost from the text.
    real_vocab = min(real_vocab, len(tokenizer))
    result: list[list[int]] = [[] for _ in prompts]
    for limit in sorted(set(budget)):
        rows = [i for i, b in enumerate(budget) if b == limit]
        width = max(len(ids[i]) for i in rows)
        pads = [width - len(ids[i]) for i in rows]
        eos = tokenizer.eos_token_id
        batch = torch.tensor([[eos] * p + ids[i] for p, i in zip(pads, rows)], device=device)
        mask = torch.tensor([[0] * p + [1] * len(ids[i]) for p, i in zip(pads, rows)], device=device)
        processors = LogitsProcessorList()
        if sampling.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyAfterPadding(sampling.repetition_penalty, pads))
        if real_vocab < model.config.vocab_size:
            processors.append(SuppressTokensLogitsProcessor(list(range(real_vocab, model.config.vocab_size)), device))
        if sampling.do_sample:
            if sampling.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampling.top_p))
            processors.append(RowSampler([seeds[i] for i in rows], device))
        # Eager even where the blocks are compiled: every new length and KV-cache state would recompile
        # them (a few tokens of text are not worth it), and would spend dynamo's recompile limit.
        with torch.compiler.set_stance("force_eager"):
            config = GenerationConfig(max_new_tokens=limit, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                                      bos_token_id=eos, **({"stop_strings": list(sampling.stop_strings)}
                                                           if sampling.stop_strings else {}))
            # generate fills every field this config leaves unset from model.generation_config: a model folder's
            # saved generation_config.json (num_beams, no_repeat_ngram_size, its own penalty) would change what
            # these settings generate, silently. A blank one for the call leaves only what is set here.
            saved, model.generation_config = model.generation_config, GenerationConfig()
            try:
                out = model.generate(batch, attention_mask=mask, generation_config=config, logits_processor=processors,
                                     **({"tokenizer": tokenizer} if sampling.stop_strings else {}))
            finally:
                model.generation_config = saved
        stop = StopStringCriteria(tokenizer, list(sampling.stop_strings)) if sampling.stop_strings else None
        for r, i in enumerate(rows):
            new = out[r, width:].tolist()
            if eos in new:  # a finished row (EOS, a stop string) is padded with EOS: it ends at its first one, as alone
                k = new.index(eos)
                # Finished by a stop string at k - 1, the EOS at k is padding, which the row alone never has.
                by_stop = stop is not None and k > 0 and bool(stop(out[r:r + 1, :width + k], None)[0])
                new = new[:k] if by_stop else new[:k + 1]
            result[i] = ids[i] + new
    return result


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, sampling: Sampling = GREEDY,
                   seeds: list[int] | None = None, real_vocab: int | None = None) -> list[str]:
    """Each prompt as given + its continuation (generate_ids' new tokens, decoded without special tokens):
    a prompt's own special tokens (a literal <|endoftext|>) stay in the text."""
    n_positions = model.config.n_positions
    return [prompt + continuation(tokenizer, x, len(prompt_ids(tokenizer, prompt, n_positions)))
            for prompt, x in zip(prompts, generate_ids(model, tokenizer, prompts, max_new_tokens, sampling, seeds, real_vocab))]


def continuation(tokenizer, ids: list[int], n_prompt: int) -> str:
    """The text that ids[n_prompt:] add after the prompt's ids[:n_prompt]. Decoded on their own, a
    SentencePiece-style (Metaspace) decoder drops the first new token's leading space ("x =" + "return", not
    "x = return"); decoded after the prompt's tokens, minus the prompt's own decoding, they keep it."""
    head = tokenizer.decode(ids[:n_prompt], skip_special_tokens=True)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(ids[n_prompt:], skip_special_tokens=True)


def greedy_text(model, tokenizer, prompt: str, max_new_tokens: int, repetition_penalty: float = 1.0,
                real_vocab: int | None = None) -> str:
    """Greedy continuation of one prompt (the export's sample)."""
    return generate_texts(model, tokenizer, [prompt], max_new_tokens, Sampling(repetition_penalty=repetition_penalty),
                          real_vocab=real_vocab)[0]
