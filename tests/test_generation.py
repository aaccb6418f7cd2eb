"""gpt2dist/generation.py: batched generation gives each prompt what it gets alone, greedy or sampled,
and sampling draws from the tempered, cut distribution with one seed per row."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import TINY
from gpt2dist.errors import ConfigError
from gpt2dist.generation import RowSampler, Sampling, generate_ids, generate_texts, row_seed

PROMPTS = ["def main(", "", "import os\nimport sys\n\nclass Parser(", "x", "return self."]


@pytest.fixture(scope="module")
def model(tokenizer):
    # A random model with large weights: peaked, prompt-dependent next-token choices (a default init
    # predicts nearly uniformly and repeats itself, which would let a wrong position go unseen).
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, initializer_range=0.3, **TINY)
    return GPT2LMHeadModel(config).eval()


def alone(model, tokenizer, prompts, n, sampling=Sampling(), seeds=None):
    return [generate_ids(model, tokenizer, [p], n, sampling, None if seeds is None else [s])[0]
            for p, s in zip(prompts, seeds or [None] * len(prompts))]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_a_batch_of_prompts_gets_what_each_prompt_gets_alone(model, tokenizer, penalty):
    """Left padding (masked, with positions from the mask) and a repetition penalty that skips it: the
    same tokens as one prompt at a time, for prompts of 0 to 13 tokens in one batch."""
    sampling = Sampling(repetition_penalty=penalty)
    batched = generate_ids(model, tokenizer, PROMPTS, 12, sampling)
    assert batched == alone(model, tokenizer, PROMPTS, 12, sampling)
    news = [b[len(tokenizer(p).input_ids or [0]):] for b, p in zip(batched, PROMPTS)]
    assert all(len(n) >= 3 for n in news) and len({tuple(n) for n in news}) == len(PROMPTS)  # real, varied output
    texts = generate_texts(model, tokenizer, PROMPTS, 12, sampling)
    assert all(t.startswith(p) for t, p in zip(texts, PROMPTS))


def test_sampling_depends_on_the_row_seed_only(model, tokenizer):
    hot = Sampling(do_sample=True, temperature=1.5)
    seeds = [row_seed(7, i) for i in range(len(PROMPTS))]
    batched = generate_ids(model, tokenizer, PROMPTS, 12, hot, seeds)
    assert batched == alone(model, tokenizer, PROMPTS, 12, hot, seeds)  # any batch, any order
    assert generate_ids(model, tokenizer, PROMPTS[::-1], 12, hot, seeds[::-1]) == batched[::-1]
    # Other seeds, other continuations; top_k=1 leaves only the most likely token: greedy.
    again = generate_ids(model, tokenizer, PROMPTS, 12, hot, [row_seed(8, i) for i in range(len(PROMPTS))])
    assert sum(a != b for a, b in zip(again, batched)) >= 3
    assert generate_ids(model, tokenizer, PROMPTS, 12, Sampling(do_sample=True, top_k=1), seeds) == \
        generate_ids(model, tokenizer, PROMPTS, 12)
    # One prompt, several samples: each (index, sample) has its own seed.
    many = generate_ids(model, tokenizer, ["def "] * 6, 12, hot, [row_seed(7, 0, j) for j in range(6)])
    assert len({tuple(m) for m in many}) >= 4


def test_row_sampler_draws_from_the_tempered_top_k_and_top_p_distribution():
    """4,000 rows of the same logits: the sampled frequencies match softmax(logits / T) renormalised over
    the top k (within 0.03), and tokens outside the cut are never drawn."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    rows = 4000
    for warpers, allowed in (([TemperatureLogitsWarper(2.0), TopKLogitsWarper(4)], 4),
                             ([TopPLogitsWarper(0.8)], None)):
        scores = logits.repeat(rows, 1)
        for w in warpers:
            scores = w(None, scores)
        expected = torch.softmax(scores[0], -1)
        if allowed is None:  # top_p 0.8: the smallest prefix of the sorted tokens reaching 0.8
            probs = torch.softmax(logits, -1)
            allowed = int((probs.cumsum(0) < 0.8).sum()) + 1
        picks = RowSampler([row_seed(1, i) for i in range(rows)], torch.device("cpu"))(None, scores).argmax(-1)
        freq = torch.bincount(picks, minlength=len(logits)).float() / rows
        assert freq[allowed:].sum() == 0 and (freq - expected).abs().max() < 0.03, (freq, expected)


def test_padded_vocabulary_rows_are_never_sampled(tokenizer):
    """A vocabulary padded by 64 rows whose logits would dominate: at temperature 5 none is drawn."""
    torch.manual_seed(0)
    eos, real = tokenizer.eos_token_id, len(tokenizer)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=real + 64, bos_token_id=eos, eos_token_id=eos, **TINY)).eval()
    with torch.no_grad():
        model.lm_head.weight[real:] = model.lm_head.weight[:64] * 5  # tied: their logits outgrow the real ones
    out = generate_ids(model, tokenizer, ["def "] * 32, 16, Sampling(do_sample=True, temperature=5.0),
                       [row_seed(0, i) for i in range(32)], real_vocab=real)
    assert max(max(o) for o in out) < real
    # A model wider than its tokenizer, saying nothing of padding (config_overrides.vocab_size 50304, a folder
    # saved padded): ids past the tokenizer decode to '' and were drawn, each a lost step of the budget.
    wider = generate_ids(model, tokenizer, ["def "] * 32, 16, Sampling(do_sample=True, temperature=5.0),
                         [row_seed(0, i) for i in range(32)])
    assert max(max(o) for o in wider) < real
    greedy = generate_ids(model, tokenizer, ["def ", "x"], 8)
    assert max(max(o) for o in greedy) < real
    with torch.no_grad():  # the check can fail: the rows past the tokenizer win unmasked
        logits = model(torch.tensor([tokenizer.encode("def ")])).logits[0, -1]
    assert logits.argmax() >= real


def test_a_long_prompt_does_not_shorten_its_batch(model, tokenizer):
    """Each row's budget is its own (n_positions - prompt length): a prompt 2 short of n_positions gets 2
    tokens, and the short prompts beside it their full 12, as alone."""
    n_pos = TINY["n_positions"]
    long = tokenizer.decode([tokenizer("a").input_ids[0]] * (n_pos - 2))
    assert len(tokenizer(long).input_ids) == n_pos - 2
    prompts = ["def main(", long, "x"]
    batched = generate_ids(model, tokenizer, prompts, 12)
    assert batched == alone(model, tokenizer, prompts, 12)
    assert len(batched[1]) <= n_pos and len(batched[0]) > len(tokenizer("def main(").input_ids) + 2


@pytest.mark.parametrize("bad, says", [(dict(temperature=0.0), "model.temperature=0.0 must be > 0"),
                                       (dict(top_p=0.0), "model.top_p=0.0 must be in (0, 1]"),
                                       (dict(top_k=-1), "model.top_k=-1 must be >= 0"),
                                       (dict(repetition_penalty=0.0), "model.repetition_penalty=0.0 must be > 0")])
def test_bad_sampling_settings_are_one_line(bad, says):
    with pytest.raises(ConfigError) as err:
        Sampling(do_sample=True, **bad).check()
    assert str(err.value) == says + {"temperature": "", "top_p": " (1: no cut)", "top_k": " (0: no cut)",
                                     "repetition_penalty": " (1: none)"}[next(iter(bad))]


@pytest.mark.parametrize("knobs, says", [
    (dict(temperature=5.0, top_k=3), "model.temperature=5.0, model.top_k=3 only apply when sampling"),
    (dict(top_p=0.9), "model.top_p=0.9 only applies when sampling")])
def test_sampling_knobs_without_do_sample_are_refused(knobs, says):
    """Greedy decoding reads none of them: the output was greedy, with no word that they were ignored."""
    with pytest.raises(ConfigError) as err:
        Sampling(**knobs).check()
    assert str(err.value) == says + ": set model.do_sample=true, or drop them for greedy decoding"
    Sampling(do_sample=True, **knobs).check()


def test_a_saved_generation_config_changes_nothing(model, tokenizer):
    """A model folder's generation_config.json (no_repeat_ngram_size, num_beams, its own penalty) was applied
    on top of the settings: predict's greedy text changed with the folder it was loaded from."""
    sampling = Sampling(repetition_penalty=1.3)
    plain = generate_ids(model, tokenizer, PROMPTS, 12, sampling)
    saved = model.generation_config
    try:
        model.generation_config = type(saved)(**{**saved.to_dict(), "no_repeat_ngram_size": 1, "num_beams": 2,
                                                 "repetition_penalty": 2.0, "bad_words_ids": [[plain[0][-1]]]})
        assert generate_ids(model, tokenizer, PROMPTS, 12, sampling) == plain
    finally:
        model.generation_config = saved


def test_the_text_starts_with_the_prompt_as_given(model, tokenizer):
    """A literal <|endoftext|> in a prompt is kept in the text (decoding without special tokens dropped it)."""
    eos = tokenizer.eos_token  # the test tokenizer's EOS string
    prompts = [f"story one{eos}story two", "", "def main("]
    texts = generate_texts(model, tokenizer, prompts, 6)
    assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(texts, prompts)), texts
    assert texts[2] == tokenizer.decode(generate_ids(model, tokenizer, prompts[2:], 6)[0], skip_special_tokens=True)


@pytest.fixture(scope="module")
def sentencepiece_style(tmp_path_factory):
    """A Llama-2-style tokenizer (its tokenizer.json's structure: spaces as "▁", <s> added by the
    post-processor, a decoder that drops the text's leading space), 600 tokens trained on the test corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import corpus_texts
    from gpt2dist.tokenizer import load_tokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(corpus_texts(), trainer=trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    d = tmp_path_factory.mktemp("sp_tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(d)
    return load_tokenizer(str(d))


def test_prompts_are_encoded_as_packing_encodes_documents(sentencepiece_style):
    """A tokenizer whose post-processor adds <s> (Llama, Mistral) put it before every prompt, a token packing
    never adds (add_special_tokens=False): the model was conditioned on an embedding it never trained, and an
    empty prompt started from <s>, not EOS."""
    import numpy as np

    from gpt2dist.data import encode_documents
    from gpt2dist.generation import prompt_ids

    tok = sentencepiece_style
    assert tok("def main(self):").input_ids[0] == tok.bos_token_id  # what the tokenizer alone adds
    packed = encode_documents(["def main(self):"], tok, np.dtype(np.uint16)).tolist()
    assert prompt_ids(tok, "def main(self):", 64) == packed[:-1] and packed[-1] == tok.eos_token_id
    assert prompt_ids(tok, "", 64) == [tok.eos_token_id]


def test_the_continuation_keeps_its_leading_space(sentencepiece_style):
    """Decoded on their own, a Metaspace decoder drops the new tokens' leading space: "x =" + "return",
    glued, text the model did not produce. The text is the whole sequence's decoding."""
    from gpt2dist.generation import continuation, prompt_ids

    tok = sentencepiece_style
    ids = prompt_ids(tok, "x =", 64) + tok(" return self", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids[len(prompt_ids(tok, "x =", 64))])[0] == "▁"
    assert continuation(tok, ids, len(prompt_ids(tok, "x =", 64))) == " return self"
    torch.manual_seed(0)
    eos = tok.eos_token_id
    sp_model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), bos_token_id=eos, eos_token_id=eos,
                                          initializer_range=0.3, **TINY)).eval()
    prompts = ["x =", "def main(self):", "import os"]
    texts = generate_texts(sp_model, tok, prompts, 8)
    for prompt, text, full in zip(prompts, texts, generate_ids(sp_model, tok, prompts, 8)):
        assert text == prompt + tok.decode(full, skip_special_tokens=True)[len(prompt):], (prompt, text)
        assert text.startswith(prompt) and len(text) > len(prompt)


def test_repetition_penalty_skips_the_left_padding():
    """Row 0 is padded with two EOS (id 0) before its tokens 5, 6; row 1 really holds an EOS. The penalty
    (divide a positive logit, multiply a negative one) falls on each row's own tokens only."""
    from gpt2dist.generation import RepetitionPenaltyAfterPadding

    ids = torch.tensor([[0, 0, 5, 6], [0, 5, 7, 7]])
    scores = torch.tensor([[2.0, 1.0, 1.0, 1.0, 1.0, 4.0, -4.0, 1.0]] * 2)
    out = RepetitionPenaltyAfterPadding(2.0, [2, 0])(ids, scores)
    assert out[0].tolist() == [2.0, 1.0, 1.0, 1.0, 1.0, 2.0, -8.0, 1.0]
    assert out[1].tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 2.0, -4.0, 0.5]
    assert scores[0, 5] == 4.0  # the caller's scores are left as they were


def test_stop_strings_end_each_row_where_it_completes_one(model, tokenizer):
    """A row stops at the token that completes a stop string, keeping it: its text is a prefix of the
    unstopped text, ending within one token after the string's first appearance; rows without it run on."""
    full = generate_texts(model, tokenizer, PROMPTS, 24)
    # A stop string from the middle of the first row's continuation: 2 printable, non-space characters.
    tail = full[0][len(PROMPTS[0]):]
    stop = next(tail[i:i + 2] for i in range(4, len(tail) - 1) if tail[i:i + 2].isprintable() and not tail[i:i + 2].isspace()
                and " " not in tail[i:i + 2])
    stopped = generate_texts(model, tokenizer, PROMPTS, 24, Sampling(stop_strings=(stop,)))
    assert stopped == [generate_texts(model, tokenizer, [p], 24, Sampling(stop_strings=(stop,)))[0] for p in PROMPTS]
    # The ids too: a row a stop string ended while others ran on is padded with EOS, which the row alone
    # never generated (it was kept as the row's last token).
    ids = generate_ids(model, tokenizer, PROMPTS, 24, Sampling(stop_strings=(stop,)))
    alone = [generate_ids(model, tokenizer, [p], 24, Sampling(stop_strings=(stop,)))[0] for p in PROMPTS]
    assert ids == alone and any(x[-1] != tokenizer.eos_token_id and len(x) < len(y) for x, y in zip(ids, generate_ids(
        model, tokenizer, PROMPTS, 24)))  # some row was stopped by the string, not by EOS or the budget
    for p, f, s in zip(PROMPTS, full, stopped):
        assert f.startswith(s)
        at = f.find(stop, len(p))
        if at < 0:
            assert s == f  # never completed: the whole continuation
        else:
            end = at + len(stop)
            assert end <= len(s) < len(f) and stop not in s[len(p): end - 1]
