"""Loading checkpoints: identity (for fingerprints), memory estimate, frozen backbone + tokenizer.

- `checkpoint_identity`: what identifies the weights of a local dir or hub id, for the
  feature-store and model-cache fingerprints.
- `memory_estimate`: parameters x bytes per dtype, from the config alone (the model is
  built on the meta device, so nothing is allocated), logged before every load.
- `load_backbone`: a frozen, eval-mode `AutoModel` and its tokenizer (with a pad token).
"""
from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from layerprobe.errors import LayerprobeError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BackboneError(LayerprobeError):
    """A checkpoint that cannot be loaded or captured; the message says how to fix it."""


BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 1024**3


def count_parameters(config, trust_remote_code: bool = False) -> int:
    """Parameters of the backbone `AutoModel` builds from `config`, counted on the meta device."""
    from transformers import AutoModel

    try:
        with torch.device("meta"), quiet_transformers():
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # exotic configs: the usual transformer formula is close enough for an estimate
        d = getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)
        layers = getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0)
        inner = getattr(config, "intermediate_size", None) or 4 * d
        vocab = getattr(config, "vocab_size", 0)
        return int(layers * (4 * d * d + 3 * d * inner) + vocab * d)


def memory_estimate(config, dtype: str, trust_remote_code: bool = False) -> dict:
    n = count_parameters(config, trust_remote_code)
    return {"parameters": n, "dtype": dtype, "weights_gib": n * BYTES_PER_PARAM[dtype] / GiB}


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


def log_memory_estimate(checkpoint: str, config, dtype: str, device_map=None, trust_remote_code: bool = False) -> dict:
    est = memory_estimate(config, dtype, trust_remote_code)
    where = f"device_map={device_map}" if device_map else "one device"
    size = f"{est['weights_gib']:.1f} GiB" if est["weights_gib"] >= 1 else f"{est['weights_gib'] * 1024:.1f} MiB"
    log.info("loading '%s': %s parameters x %d bytes (%s) = about %s of weights (%s), plus activations",
             checkpoint, _count(est["parameters"]), BYTES_PER_PARAM[dtype], dtype, size, where)
    if torch.cuda.is_available() and not device_map:
        free, _ = torch.cuda.mem_get_info()
        if est["weights_gib"] * GiB > free:
            log.warning("'%s' needs about %.1f GiB but the GPU has %.1f GiB free; set model.device_map=auto to spread it "
                        "over several GPUs, or model.dtype=bfloat16", checkpoint, est["weights_gib"], free / GiB)
    return est


def is_local(path_or_id: str) -> bool:
    return os.path.exists(os.path.expanduser(path_or_id))


def looks_like_path(path_or_id: str) -> bool:
    return path_or_id.startswith(("/", "./", "../", "~", ".\\")) or path_or_id.count("/") > 1 or os.sep + os.sep in path_or_id


def check_checkpoint(path_or_id: str, role: str) -> None:
    if not is_local(path_or_id) and looks_like_path(path_or_id):
        raise BackboneError(f"checkpoint path for model '{role}' not found: {path_or_id}; fix model.{role}=<hub id or existing dir>")
    if is_local(path_or_id) and os.path.isdir(os.path.expanduser(path_or_id)):
        check_weight_files(Path(path_or_id).expanduser(), role)


def check_weight_files(root: Path, role: str) -> None:
    """A local checkpoint's weight files are whole: each safetensors header parses and the file
    is exactly as long as the header says; each torch .bin opens as a zip. Reads headers only."""
    import json
    import struct
    import zipfile

    fix = f"model.controls.{role.split(':', 1)[1]}" if role.startswith("control:") else f"model.{role}"
    index = next(iter(sorted(root.glob("*.safetensors.index.json")) + sorted(root.glob("*.bin.index.json"))), None)
    files = sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin"))
    if index is not None:
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise BackboneError(f"checkpoint of model '{role}': {index} is not a valid weight index; "
                                f"re-save the checkpoint or fix {fix}") from None
        missing = sorted(n for n in names if not (root / n).is_file())
        if missing:
            raise BackboneError(f"checkpoint of model '{role}' lacks weight file(s) {missing} listed in {index.name}; "
                                f"finish the download or fix {fix}")
    if not files and (root / "config.json").exists():
        raise BackboneError(f"checkpoint of model '{role}' at {root} has no weight files (*.safetensors or *.bin); "
                            f"finish the download or fix {fix}")
    for path in files:
        size, why = path.stat().st_size, None
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                try:
                    header = json.loads(f.read(n)) if 0 < n <= min(size - 8, 100 << 20) else None
                    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                except (ValueError, TypeError, KeyError, AttributeError):
                    header, end = None, 0
            if header is None:
                why = "not a safetensors file (unreadable header)"
            elif 8 + n + end != size:
                why = f"{size} bytes, its header describes {8 + n + end} (truncated or damaged)"
        elif not zipfile.is_zipfile(path) and path.open("rb").read(1) != b"\x80":  # zip, or a legacy pickle
            why = "not a PyTorch checkpoint (truncated or damaged)"
        if why:
            raise BackboneError(f"weight file {path} of model '{role}' is {why}; re-download or re-save the checkpoint, "
                                f"or fix {fix}")


def checkpoint_identity(path_or_id: str, revision: str | None = None) -> dict:
    """What identifies the weights, for the feature-store fingerprint.

    Local dirs: config.json plus each weight file's name, size and a hash of its first and
    last MiB (cheap, and changes whenever the weights are rewritten). Hub ids: the commit the
    revision resolves to, read from the local Hugging Face cache (fetching config.json only).
    """
    import hashlib

    if is_local(path_or_id):
        root = Path(path_or_id).expanduser().resolve()
        h = hashlib.sha256()
        files = sorted(p for p in root.iterdir() if p.is_file() and (p.suffix in {".json", ".safetensors", ".bin", ".model"}))
        for p in files:
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
                if p.stat().st_size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    h.update(f.read())
        return {"kind": "local", "path": str(root), "content": h.hexdigest()}
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(path_or_id, revision=revision, allow_patterns=["config.json"])
    except Exception as err:  # hub errors come in many types; all mean the same to the user
        raise BackboneError(
            f"could not resolve model '{path_or_id}' on the Hugging Face hub or in its cache ({type(err).__name__}); "
            "check the id, your network / HF_TOKEN, or point model.<role> at a local directory"
        ) from err
    return {"kind": "hub", "id": path_or_id, "commit": Path(snapshot).name}


def load_backbone(path_or_id: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False, revision=None,
                  device_map=None):
    """Load a frozen, eval-mode backbone and its tokenizer (with a pad token).

    device_map (e.g. "auto"): accelerate places the model over the visible GPUs and it is not
    moved afterwards. A memory estimate is logged before the weights are read.
    """
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        config = AutoConfig.from_pretrained(path_or_id, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise BackboneError(f"cannot load model config from '{path_or_id}': {first}") from err
    if getattr(config, "is_encoder_decoder", False):
        raise BackboneError(f"'{path_or_id}' is an encoder-decoder model; layerprobe captures decoder-only or encoder-only stacks")
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    log_memory_estimate(path_or_id, config, dtype, device_map, trust_remote_code)
    placement = {"device_map": device_map} if device_map else {}
    with quiet_transformers():  # AutoModel drops the LM head of causal checkpoints: expected, not news
        model = AutoModel.from_pretrained(path_or_id, config=config, **{dtype_key: DTYPES[dtype]}, **placement, **kwargs)
    model.eval().requires_grad_(False)
    if not device_map:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    ensure_pad_token(tokenizer)
    return model, tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Tokenizers without a pad token reuse EOS (or UNK); pads are masked out anyway."""
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is None:
            raise BackboneError("the tokenizer has no pad, eos, unk or bos token to pad with; set tokenizer.pad_token")
        tokenizer.pad_token = fallback


@contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars for every model
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` attribute (a
            # FutureWarning per model); nothing a user can act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# --- LoRA adapters: one base in memory, adapters swapped on it --------------------------------


def is_adapter_dir(path_or_id: str) -> bool:
    """A local peft adapter dir (adapter_config.json), as the tuning stage writes for method=lora."""
    return is_local(path_or_id) and (Path(path_or_id).expanduser() / "adapter_config.json").exists()


def adapter_identity(base_identity: dict, adapter_dir: str) -> dict:
    """The fingerprint identity of base + adapter: follows both the base weights and the adapter's."""
    return {"kind": "adapter", "base": base_identity, "adapter": checkpoint_identity(adapter_dir)}


def has_tokenizer(path: str) -> bool:
    root = Path(path).expanduser()
    return is_local(path) and any((root / f).exists() for f in ("tokenizer_config.json", "tokenizer.json"))


class AdapterSet:
    """LoRA adapters on one base model, swapped with peft's `load_adapter` / `set_adapter`.

    The base (a causal LM) is read once, when the first adapter is activated; every adapter is
    loaded onto it then. `activate(name)` returns (backbone, tokenizer) for capture: the base's
    transformer stack (with the LoRA layers peft injected, the named adapter active and merged
    by peft's `merge_adapter`) and the adapter dir's tokenizer (the base's if it has none).
    """

    def __init__(self, base: str, dtype: str = "float32", revision=None, trust_remote_code: bool = False):
        self.base, self.dtype, self.revision, self.trust_remote_code = base, dtype, revision, trust_remote_code
        self.adapters: dict[str, str] = {}
        self.peft = None
        self._names: dict[str, str] = {}
        self._tokenizers: dict[str, object] = {}
        self._active: str | None = None
        self._originals: dict = {}

    def add(self, name: str, adapter_dir: str) -> None:
        self.adapters[name] = str(adapter_dir)

    def _load(self) -> None:
        import transformers
        from peft import PeftModel
        from transformers import AutoConfig, AutoModelForCausalLM

        kwargs = {"trust_remote_code": self.trust_remote_code, "revision": self.revision}
        config = AutoConfig.from_pretrained(self.base, **kwargs)
        log_memory_estimate(self.base, config, self.dtype, None, self.trust_remote_code)
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(self.base, config=config, **{dtype_key: DTYPES[self.dtype]}, **kwargs)
        for i, (name, path) in enumerate(self.adapters.items()):
            key = f"adapter{i}"  # peft keys modules by adapter name: no dots or colons
            try:
                with quiet_transformers():
                    if self.peft is None:
                        self.peft = PeftModel.from_pretrained(model, path, adapter_name=key, is_trainable=False)
                    else:
                        self.peft.load_adapter(path, adapter_name=key, is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as err:
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                raise BackboneError(f"the LoRA adapter of '{name}' ({path}) does not fit the base model {self.base}: {first}") from err
            self._names[name] = key
        log.info("%d LoRA adapter(s) loaded on one base (%s): %s", len(self.adapters), self.base, ", ".join(self.adapters))
        self.peft.eval().requires_grad_(False)
        # the base weights the adapters wrap, to restore them exactly between merges
        self._originals = {n: m.base_layer.weight.detach().clone() for n, m in self.peft.named_modules()
                           if hasattr(m, "base_layer") and hasattr(m, "merge")}

    def tokenizer(self, name: str):
        if name not in self._tokenizers:
            from layerprobe.models.prompting import load_tokenizer

            path = self.adapters[name]
            self._tokenizers[name] = load_tokenizer(path if has_tokenizer(path) else self.base, self.trust_remote_code,
                                                    None if has_tokenizer(path) else self.revision)
        return self._tokenizers[name]

    def activate(self, name: str):
        """Make `name` the active adapter, merged into the base weights (a forward then costs what the base's
        does); the previous merge is undone first and the wrapped weights restored bit-exactly."""
        import torch

        if self.peft is None:
            self._load()
        if self._active is not None:
            self.peft.unmerge_adapter()
            with torch.no_grad():
                modules = dict(self.peft.named_modules())
                for n, w in self._originals.items():
                    modules[n].base_layer.weight.copy_(w)
        self.peft.set_adapter(self._names[name])
        self.peft.merge_adapter()
        self._active = name
        return self.peft.get_base_model().base_model, self.tokenizer(name)

    def provider(self, name: str):
        """A callable for ensure_features(backbone=...): activates `name` when features are missing."""
        return lambda: self.activate(name)
