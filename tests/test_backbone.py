"""Capture and pooling against independent computations: HF's output_hidden_states and
one-example-at-a-time forwards with no padding at all."""
import pytest
import torch

from layerprobe.models import LayerCapture, load_backbone, pool

TEXTS = ["the cat sat", "a big red dog was very happy on the mat", "two", "the small blue cat and a green dog sat"]


def manual_features(model, tokenizer, text, how, final_norm_module=None):
    """One example, no padding: HF hidden_states pooled by hand."""
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    out = []
    for h in hs:
        h = h[0]
        out.append({"last": h[-1], "first": h[0], "mean": h.mean(0)}[how])
    return torch.stack(out)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("how", ["last", "mean", "first"])
def test_pooling_matches_unpadded_forward(llama_dir, padding_side, how):
    model, tok = load_backbone(str(llama_dir))
    tok.padding_side = padding_side
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with LayerCapture(model, how, final_norm=True) as cap:
        feats = cap(enc["input_ids"], enc["attention_mask"])
    assert feats.shape == (len(TEXTS), model.config.num_hidden_layers + 1, model.config.hidden_size)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(feats[i], manual_features(model, tok, text, how), atol=2e-5, rtol=1e-4)


def test_one_pass_capture_equals_output_hidden_states(llama_dir):
    model, tok = load_backbone(str(llama_dir))
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    ref_last = torch.stack([pool(h, enc["attention_mask"], "last") for h in hs], dim=1)
    hooks_before = [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in model.layers]
    with LayerCapture(model, "last", final_norm=False) as cap:
        raw = cap(enc["input_ids"], enc["attention_mask"])
    with LayerCapture(model, "last", final_norm=True) as cap:
        normed = cap(enc["input_ids"], enc["attention_mask"])
    L = model.config.num_hidden_layers
    # layers 0..L-1 are the residual stream in both conventions
    torch.testing.assert_close(raw[:, :L], ref_last[:, :L])
    # HF applies the final RMSNorm inside hidden_states[-1]; final_norm=true reproduces it
    torch.testing.assert_close(normed, ref_last)
    assert not torch.allclose(raw[:, L], ref_last[:, L])
    # the hooks are gone afterwards
    assert [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in model.layers] == hooks_before


def test_tokenizer_without_pad_token(gpt2_dir):
    model, tok = load_backbone(str(gpt2_dir))
    assert tok.pad_token is not None  # reused EOS
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert tok.padding_side == "left"
    with LayerCapture(model, "last", final_norm=True) as cap:
        feats = cap(enc["input_ids"], enc["attention_mask"])
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(feats[i], manual_features(model, tok, text, "last"), atol=2e-5, rtol=1e-4)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from layerprobe.models import BackboneError, check_checkpoint

    with pytest.raises(BackboneError, match="not found.*model.base"):
        check_checkpoint(str(tmp_path / "nope"), "base")
