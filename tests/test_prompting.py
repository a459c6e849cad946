"""Chat templates and the position guarantee: base and tuned are read at the same semantic
position, the last token of the user's prompt, even when only one wraps it in a chat template.

Checked against independent computations: the tokens themselves, and (for a causal model,
which cannot see what follows a position) Hugging Face's hidden_states of the rendered text
cut right after the prompt."""
import logging

import numpy as np
import pytest
import torch

from conftest import save_tiny, word_tokenizer
from layerprobe.models import LayerCapture, load_backbone
from layerprobe.config import ExtractConfig, ModelConfig
from layerprobe.features.extract import FeatureExtractor, ensure_features, store_for
from layerprobe.models.prompting import PromptEncoder, PromptError, PromptSpec, make_spec, prepare_prompts, render_chat
from layerprobe.tasks import finalize_task

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PROMPTS = ["the cat sat on the mat", "  a big red dog was very happy  ", "two", "the small blue cat and a green dog sat ."]
TRAINER = {"accelerator": "cpu", "devices": 1}


def chat_tokenizer(template: str | None = CHAT_TEMPLATE, padding_side="right"):
    tok = word_tokenizer(padding_side=padding_side)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]})
    tok.chat_template = template
    return tok


def tiny_pair(root, seed=0):
    """The same tiny Llama twice: `plain` without a chat template, `chat` with one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = chat_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    chat = save_tiny(model, tok, root / "chat")
    plain = save_tiny(model, chat_tokenizer(template=None), root / "plain")
    return plain, chat


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("pair"))


def test_render_chat_locates_the_prompt():
    tok = chat_tokenizer()
    for system in (None, "you are very happy"):
        for prompt in PROMPTS:
            text, start, end = render_chat(tok, prompt, system)
            assert text[start:end] == prompt.strip()
            assert text.endswith("<|end|>\n<|assistant|>\n")  # the generation prompt follows the user's prompt
            assert (system is None) == ("<|system|>" not in text)


def test_plain_and_chat_read_the_same_token():
    plain = PromptEncoder(chat_tokenizer(template=None))
    chat_tok = chat_tokenizer()
    chat = PromptEncoder(chat_tok, make_spec(chat_tok, True, None, "tuned", "x"))
    for p, c, prompt in zip(plain.encode(PROMPTS), chat.encode(PROMPTS), PROMPTS):
        words = prompt.split()
        # the pooled span is exactly the prompt's words, in both; chat markup lies outside it
        assert chat_tok.convert_ids_to_tokens(p.ids[p.first : p.last + 1]) == words
        assert chat_tok.convert_ids_to_tokens(c.ids[c.first : c.last + 1]) == words
        assert c.ids[c.last] == p.ids[p.last]
        assert c.last < len(c.ids) - 1  # the chat role's last token is NOT the last token of its input


def test_tokenizer_that_appends_eos_is_read_before_it():
    from tokenizers import processors

    tok = word_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    (enc,) = PromptEncoder(tok).encode(["the cat sat"])
    assert tok.convert_ids_to_tokens(enc.ids) == ["<s>", "the", "cat", "sat", "</s>"]
    assert (enc.first, enc.last) == (1, 3)


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_keeps_the_end_of_the_prompt(side):
    tok = chat_tokenizer()
    long_prompt = " ".join(["the cat sat on the mat"] * 10)
    chat = PromptEncoder(tok, make_spec(tok, True, None, "tuned", "x"), max_length=12, truncation_side=side)
    (enc,) = chat.encode([long_prompt])
    assert len(enc.ids) == 12 and enc.truncated
    names = tok.convert_ids_to_tokens(enc.ids)
    if side == "left":  # the prompt's end and the generation prompt survive; it is read at its end
        assert names[enc.last] == "mat" and names[enc.last + 1 :] == ["<|end|>", "<|assistant|>"]
    else:  # the end was cut: read at the last prompt token that is left
        assert names[0] == "<|user|>" and enc.first == 1 and enc.last == len(enc.ids) - 1


def _hf_last(model, tok, text, add_special_tokens):
    enc = tok(text, add_special_tokens=add_special_tokens, return_tensors="pt")
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    return torch.stack([h[0, -1] for h in hs])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_chat_features_equal_hf_hidden_states_at_the_prompt_end(pair, padding_side):
    plain_dir, chat_dir = pair
    model, tok = load_backbone(str(chat_dir))
    tok.padding_side = padding_side
    spec = make_spec(tok, True, "you are happy", "tuned", str(chat_dir))
    encoder = PromptEncoder(tok, spec)
    ids, attention, prompt_mask = encoder.pad(encoder.encode(PROMPTS))
    with LayerCapture(model, "last", final_norm=True) as cap:
        feats = cap(ids, attention, prompt_mask)
    for i, prompt in enumerate(PROMPTS):
        text, _, end = render_chat(tok, prompt, "you are happy")
        # causal: the state at the prompt's last token cannot depend on the generation prompt after it
        torch.testing.assert_close(feats[i], _hf_last(model, tok, text[:end], False), atol=3e-5, rtol=1e-4)

    plain_model, plain_tok = load_backbone(str(plain_dir))
    encoder = PromptEncoder(plain_tok)
    ids, attention, prompt_mask = encoder.pad(encoder.encode(PROMPTS))
    with LayerCapture(plain_model, "last", final_norm=True) as cap:
        plain = cap(ids, attention, prompt_mask)
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(plain[i], _hf_last(plain_model, plain_tok, prompt, True), atol=3e-5, rtol=1e-4)
    # same weights, same prompt token, different context (the chat header): the features differ
    assert not torch.allclose(plain[:, 1:], feats[:, 1:])


def test_extraction_stores_chat_and_plain_apart_at_aligned_positions(pair, tmp_path):
    plain_dir, chat_dir = pair
    rows = [(f"t:{i}", p, i % 2) for i, p in enumerate(PROMPTS * 5)]
    task = finalize_task("t", "c", "", ["a", "b"], rows, (0.6, 0.2, 0.2), 0)
    cfg = ExtractConfig(batch_size=3, shard_size=8)
    specs = prepare_prompts(ModelConfig(base=str(plain_dir), tuned=str(chat_dir), chat_roles=["tuned"]),
                            {"base": str(plain_dir), "tuned": str(chat_dir)})
    assert not specs["base"].chat and specs["tuned"].chat
    feats = {}
    for role, path in (("base", plain_dir), ("tuned", chat_dir)):
        feats[role], ids = ensure_features(role, str(path), [task], cfg, TRAINER, tmp_path, prompt=specs[role])["t"].load()
        assert ids == task.ids
    model, tok = load_backbone(str(chat_dir))
    for i, (_, prompt, _) in enumerate(rows[:4]):
        text, _, end = render_chat(tok, prompt)
        np.testing.assert_allclose(feats["tuned"][i, :-1], _hf_last(model, tok, text[:end], False)[:-1].numpy(), atol=3e-5)
    # the chat setting (and the template itself) is part of the store's fingerprint
    identity = {"kind": "local", "content": "x"}
    roots = {store_for(tmp_path, identity, task, cfg, s).root for s in
             (None, PromptSpec(), specs["tuned"], PromptSpec(chat=True, template_hash="other"),
              PromptSpec(chat=True, template_hash=specs["tuned"].template_hash, system_prompt="be brief"))}
    assert len(roots) == 4  # None and PromptSpec() are the same plain setting


def test_missing_chat_template_is_a_clear_error(pair):
    plain_dir, chat_dir = pair
    cfg = ModelConfig(base=str(plain_dir), tuned=str(chat_dir), chat_roles=["base"])
    with pytest.raises(PromptError, match=r"model.chat_roles includes 'base' but the tokenizer of '.*plain' has no chat template"):
        prepare_prompts(cfg, {"base": str(plain_dir), "tuned": str(chat_dir)})


def test_tokenizer_mismatch_warns_but_runs(tmp_path, pair, caplog):
    from conftest import tiny_llama

    other = tiny_llama(tmp_path / "other")  # the plain word tokenizer: no chat special tokens
    _, chat_dir = pair
    with caplog.at_level(logging.WARNING):
        specs = prepare_prompts(ModelConfig(base=str(other), tuned=str(chat_dir), chat_roles=["tuned"]),
                                {"base": str(other), "tuned": str(chat_dir)})
    assert "tokenizers of 'base' and 'tuned' differ" in caplog.text
    assert specs["tuned"].chat
    # positions still line up: both read the prompt's last word
    tok_a = load_backbone(str(other))[1]
    tok_b = load_backbone(str(chat_dir))[1]
    (a,) = PromptEncoder(tok_a).encode(["the cat sat"])
    (b,) = PromptEncoder(tok_b, specs["tuned"]).encode(["the cat sat"])
    assert tok_a.convert_ids_to_tokens(a.ids)[a.last] == tok_b.convert_ids_to_tokens(b.ids)[b.last] == "sat"


def test_extractor_accepts_a_placed_backbone(pair):
    """model.device_map: accelerate places the model; the extractor keeps it out of Lightning's module tree."""
    plain_dir, _ = pair
    model, tok = load_backbone(str(plain_dir), device_map="cpu")
    extractor = FeatureExtractor(model, tok, ExtractConfig(), placed=True)
    assert not list(extractor.parameters())  # nothing for Lightning to move
    _, out = extractor.predict_step((0, PROMPTS), 0)
    ref, tok2 = load_backbone(str(plain_dir))
    encoder = PromptEncoder(tok2)
    with LayerCapture(ref, "last") as cap:
        expected = cap(*encoder.pad(encoder.encode(PROMPTS)))
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)
