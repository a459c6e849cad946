"""The random-init baseline role: the base's architecture and tokenizer with seeded random
weights, a self-describing cache dir (manifest last), reused on the second run."""
import json

import pytest
import torch

from conftest import tiny_llama
from layerprobe.config import ConfigError, ModelConfig
from layerprobe.models.random_init import ensure_random_init


def test_random_init_twin_is_built_once_and_reused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = tiny_llama(tmp_path / "base", seed=0)
    cache = tmp_path / "cache"
    root = ensure_random_init(str(base), cache, seed=5)
    assert root.parent == cache / "models" and (root / "manifest.json").is_file()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["kind"] == "random_init" and manifest["seed"] == 5 and manifest["base"] == str(base)
    # same architecture and tokenizer, other weights
    assert AutoConfig.from_pretrained(root).to_diff_dict() == AutoConfig.from_pretrained(base).to_diff_dict()
    assert AutoTokenizer.from_pretrained(root).get_vocab() == AutoTokenizer.from_pretrained(base).get_vocab()
    a, b = AutoModelForCausalLM.from_pretrained(base), AutoModelForCausalLM.from_pretrained(root)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    assert not torch.equal(pa["model.layers.0.self_attn.q_proj.weight"], pb["model.layers.0.self_attn.q_proj.weight"])
    # the second call reuses the dir; the same seed rebuilt elsewhere gives the same weights; another seed another dir
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert ensure_random_init(str(base), cache, seed=5) == root and (root / "manifest.json").stat().st_mtime_ns == stamp
    again = AutoModelForCausalLM.from_pretrained(ensure_random_init(str(base), tmp_path / "other", seed=5))
    for name, p in again.named_parameters():
        assert torch.equal(p, pb[name]), name
    assert ensure_random_init(str(base), cache, seed=6) != root
    assert not list((cache / "models").glob(".*tmp*"))  # no half-built dirs left


def test_random_init_role_is_pairable_only_when_on():
    with pytest.raises(ConfigError, match=r"model.pairs entry \['base', 'random_init'\] must name two roles"):
        ModelConfig(base="a", tuned="b", pairs=[["base", "random_init"]])
    ModelConfig(base="a", tuned="b", random_init=True, pairs=[["base", "random_init"]])
