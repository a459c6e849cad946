"""Block discovery and one-pass capture for every architecture family layerprobe supports:
a tiny model of each, built from its config class and saved with save_pretrained, captures
L+1 layers that equal Hugging Face's own `output_hidden_states`."""
import pytest
import torch

from conftest import save_tiny, word_tokenizer
from layerprobe.models import LayerCapture, find_blocks, find_final_norm, load_backbone

TEXTS = ["the cat sat on the mat", "a big red dog", "two", "the small blue cat and a green dog sat"]


def _decoder_kwargs(tok):
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)


def _encoder_kwargs(tok):
    return dict(vocab_size=len(tok) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=80, pad_token_id=tok.pad_token_id)


# name -> (config class, model class, config kwargs builder, extra kwargs, causal?)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _decoder_kwargs, {"num_key_value_heads": 2}, True),
    "mistral": ("MistralConfig", "MistralForCausalLM", _decoder_kwargs, {"num_key_value_heads": 2, "sliding_window": None}, True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _decoder_kwargs, {"num_key_value_heads": 2}, True),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _decoder_kwargs, {"num_key_value_heads": 2, "head_dim": 8}, True),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _decoder_kwargs, {"num_key_value_heads": 2}, True),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             lambda tok: dict(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=64,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id), {}, True),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _decoder_kwargs, {}, True),
    "bert": ("BertConfig", "BertModel", _encoder_kwargs, {}, False),
    "roberta": ("RobertaConfig", "RobertaModel", _encoder_kwargs, {}, False),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def tiny(request, tmp_path_factory):
    import transformers

    name = request.param
    config_cls, model_cls, kwargs_of, extra, causal = ARCHITECTURES[name]
    torch.manual_seed(0)
    tok = word_tokenizer(padding_side="left" if causal else "right")
    config = getattr(transformers, config_cls)(**kwargs_of(tok), **extra)
    path = save_tiny(getattr(transformers, model_cls)(config), tok, tmp_path_factory.mktemp(name) / "model")
    return name, path, causal


def test_capture_equals_output_hidden_states(tiny):
    name, path, causal = tiny
    model, tok = load_backbone(str(path))
    L = model.config.num_hidden_layers
    assert len(find_blocks(model)) == L
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    # Reference: each text alone (no padding), HF's hidden_states at its last token.
    reference = []
    for text in TEXTS:
        one = tok(text, return_tensors="pt")
        with torch.no_grad():
            hs = model(**one, output_hidden_states=True).hidden_states
        assert len(hs) == L + 1
        reference.append(torch.stack([h[0, -1] for h in hs]))
    reference = torch.stack(reference)

    # Decoders apply their final norm inside hidden_states[-1]; encoders (BERT/RoBERTa) have none.
    has_norm = find_final_norm(model) is not None
    assert has_norm == causal, name
    with LayerCapture(model, "last", final_norm=has_norm) as cap:
        feats = cap(enc["input_ids"], enc["attention_mask"])
    assert feats.shape == (len(TEXTS), L + 1, model.config.hidden_size)
    torch.testing.assert_close(feats, reference, atol=3e-5, rtol=1e-4)
    if has_norm:  # without it, layer L is the raw residual stream and differs from HF's last entry
        with LayerCapture(model, "last", final_norm=False) as cap:
            raw = cap(enc["input_ids"], enc["attention_mask"])
        torch.testing.assert_close(raw[:, :L], reference[:, :L], atol=3e-5, rtol=1e-4)
        assert not torch.allclose(raw[:, L], reference[:, L])
