"""The random-weights baseline role: the base's architecture and tokenizer, seeded random weights.

A probe on it measures what the architecture and the lexical identity of the tokens give
a probe without any training (the random-weights control of the Holmes benchmark,
Waldis et al. 2024; also Hewitt & Liang 2019, Zhang & Bowman 2018). Turned on by
`model.random_init=true` (on in the demo); the role is called `random_init`, and it is
probed only: similarity compares it only when `model.pairs` names it.

    ${paths.cache_dir}/models/<fingerprint>/     published atomically (tmp dir + rename)
        config.json, model.safetensors           AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
        tokenizer files                          the base's tokenizer, as is
        manifest.json                            written last: kind, base identity, seed, versions

The fingerprint hashes the base's identity (config and weight files for a local dir,
the resolved commit for a hub id), the seed and the format version, so a second run
reuses the directory, and another base or seed gets its own.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

ROLE = "random_init"
FORMAT = "layerprobe-random-init-v1"


def random_init_fingerprint(base: str, seed: int, revision: str | None = None) -> str:
    from layerprobe.models.load import checkpoint_identity

    identity = {"format": FORMAT, "base": checkpoint_identity(base, revision), "seed": int(seed)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def ensure_random_init(base: str, cache_dir: Path, seed: int = 0, revision: str | None = None,
                       trust_remote_code: bool = False) -> Path:
    """The checkpoint dir of the random-init twin of `base`, built on first use (file-locked)."""
    from filelock import FileLock

    root = Path(cache_dir) / "models" / random_init_fingerprint(base, seed, revision)
    if (root / "manifest.json").exists():
        log.info("random_init: cached at %s", root)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / "manifest.json").exists():  # built by another job while we waited
            return root
        start = time.time()
        _build(base, root, seed, revision, trust_remote_code)
        log.info("random_init: built %s from the config of %s (seed %d) in %.1f s", root, base, seed, time.time() - start)
    return root


def _build(base: str, root: Path, seed: int, revision, trust_remote_code: bool) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from layerprobe.features.store import atomic_write_bytes
    from layerprobe.models.load import checkpoint_identity, quiet_transformers

    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(base, revision=revision, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(base, revision=revision, trust_remote_code=trust_remote_code)
            state = torch.random.get_rng_state()
            torch.manual_seed(seed)  # the architecture's own initializer (_init_weights), seeded
            try:
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            finally:
                torch.random.set_rng_state(state)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        manifest = {"format": FORMAT, "kind": ROLE, "base": str(base), "base_identity": checkpoint_identity(base, revision),
                    "seed": int(seed), "architecture": type(model).__name__,
                    "parameters": int(sum(p.numel() for p in model.parameters())),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_bytes(tmp / "manifest.json", json.dumps(manifest, indent=2, default=str).encode())  # last
        shutil.rmtree(root, ignore_errors=True)  # a dir without a manifest was never complete
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
