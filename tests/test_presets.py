"""Config composition for every model preset, every task preset and experiment=layer_by_layer;
task presets also load a local dataset directory in the real dataset's schema."""
import datasets
import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT
from layerprobe.config import ExtractConfig, ModelConfig, ProbeConfig, TaskConfig, register_configs, to_dataclass
from layerprobe.similarity import SimilarityConfig
from layerprobe.tasks import load_tasks

register_configs()

MODEL_PRESETS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
PAIRS = {  # preset -> (base, tuned, other roles)
    "llama2_7b": ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf", {}),
    "llama3_8b": ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", {}),
    "qwen25_05b": ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", {}),
    "qwen25_7b": ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", {}),
    "mistral_7b": ("mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", {}),
    "smollm2": ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct", {}),
    "olmo2_7b": ("allenai/OLMo-2-1124-7B", "allenai/OLMo-2-1124-7B-Instruct", {"sft": "allenai/OLMo-2-1124-7B-SFT"}),
}


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_model_preset_composes(preset):
    model = to_dataclass(ModelConfig, compose_train([f"model={preset}"]).model)
    if preset == "demo":
        assert model.build_demo
        return
    base, tuned, others = PAIRS[preset]
    assert (model.base, model.tuned, dict(model.others)) == (base, tuned, others)
    assert set(model.chat_roles) == {"tuned", *others}  # every instruction-tuned role reads its chat template
    assert model.dtype == (None if preset == "smollm2" else "bfloat16")  # 135M: extract.dtype (float32) is fine


def test_olmo2_compares_each_stage():
    model = to_dataclass(ModelConfig, compose_train(["model=olmo2_7b"]).model)
    assert list(model.roles()) == ["base", "tuned", "sft"]
    assert model.role_pairs() == [("base", "sft"), ("sft", "tuned"), ("base", "tuned")]


def test_model_options_from_the_command_line():
    model = to_dataclass(ModelConfig, compose_train(
        ["model.build_demo=false", "model.base=a/b", "model.tuned=c/d", "+model.others.sft=e/f", "model.chat_roles=[sft,tuned]",
         "model.device_map=auto", "model.dtype=bfloat16", "model.system_prompt=Be brief."]).model)
    assert model.chat_roles == ["sft", "tuned"] and model.device_map == "auto" and model.system_prompt == "Be brief."
    from layerprobe.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.chat_roles names role\(s\) \['sfft'\]"):
        to_dataclass(ModelConfig, compose_train(["model=smollm2", "model.chat_roles=[sfft]"]).model)
    with pytest.raises(ConfigError, match="model.dtype='fp8' is not valid"):
        to_dataclass(ModelConfig, compose_train(["model=smollm2", "model.dtype=fp8"]).model)


def test_device_map_needs_one_process():
    from layerprobe.models import PlacementError, check_placement

    model = to_dataclass(ModelConfig, compose_train(["model=llama2_7b", "model.device_map=auto"]).model)
    check_placement(model, {"devices": 1})
    with pytest.raises(PlacementError, match="cannot run with trainer.devices=2: set trainer.devices=1"):
        check_placement(model, {"devices": 2})


def test_memory_estimate_counts_parameters_without_allocating(llama_dir, caplog):
    from transformers import AutoConfig

    from layerprobe.models import load_backbone
    from layerprobe.models import memory_estimate

    with caplog.at_level("INFO"):
        model, _ = load_backbone(str(llama_dir))
    n = sum(p.numel() for p in model.parameters())
    assert f"{n / 1e3:.2f} K parameters x 4 bytes (float32) = about {n * 4 / 1024**2:.1f} MiB of weights" in caplog.text
    est = memory_estimate(AutoConfig.from_pretrained(str(llama_dir)), "bfloat16")
    assert est["parameters"] == n and est["weights_gib"] == pytest.approx(n * 2 / 1024**3)
    # a 7B config costs nothing to count: built on the meta device
    from transformers import LlamaConfig

    big = memory_estimate(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                      vocab_size=32000), "bfloat16")
    assert big["parameters"] == pytest.approx(6.607e9, rel=1e-3) and 12 < big["weights_gib"] < 13


def test_layer_by_layer_experiment_composes():
    cfg = compose_train(["experiment=layer_by_layer"])
    model = to_dataclass(ModelConfig, cfg.model)
    assert (model.base, model.tuned) == PAIRS["llama2_7b"][:2] and model.chat_roles == ["tuned", "control"] and model.dtype == "bfloat16"
    # the study's MOSSA recipe (its public code): LoRA q,v r=8 alpha=16, lr 5e-5 cosine, 3 epochs, 4 x 4, fp16, 1024 tokens
    from layerprobe.tuning import to_tuning_config
    from layerprobe.tuning.data import LLAMA2_SYSTEM_PROMPT

    tuning = to_tuning_config(cfg.tuning)
    assert model.train_controls and model.system_prompt == LLAMA2_SYSTEM_PROMPT
    assert (tuning.method, tuning.target_modules, tuning.lora_r, tuning.lora_alpha, tuning.lora_dropout) == ("lora", ["q_proj", "v_proj"], 8, 16, 0.0)
    assert (tuning.lr, tuning.epochs, tuning.batch_size, tuning.grad_accum, tuning.precision, tuning.max_length) == (5e-5, 3, 4, 4, "16", 1024)
    assert (tuning.loss_on, tuning.chat_template, tuning.max_per_cluster) == ("answer", "llama2", 50000)
    task = to_dataclass(TaskConfig, cfg.task)
    assert task.source == "flan" and task.tasks is None and task.target == "default" and task.max_per_cluster
    extract = to_dataclass(ExtractConfig, cfg.extract)
    assert extract.pooling == "last" and extract.store_dtype == "float16"
    sim = to_dataclass(SimilarityConfig, cfg.similarity)
    assert set(sim.measures) == {"linear_cka", "debiased_cka"} and sim.cross_layer
    assert to_dataclass(ProbeConfig, cfg.probe).name == "linear"
    # and it stays overridable: local data, another model set
    cfg = compose_train(["experiment=layer_by_layer", "task.data_files=x.jsonl", "model=qwen25_05b"])
    assert cfg.task.data_files == "x.jsonl" and cfg.model.base == "Qwen/Qwen2.5-0.5B"


# task preset -> (columns of the real dataset beyond `label`, its ClassLabel names)
TASK_SCHEMAS = {
    "sst2": (["sentence", "idx"], ["negative", "positive"]),
    "cola": (["sentence", "idx"], ["unacceptable", "acceptable"]),
    "mrpc": (["sentence1", "sentence2", "idx"], ["not_equivalent", "equivalent"]),
    "qqp": (["question1", "question2", "idx"], ["not_duplicate", "duplicate"]),
    "mnli": (["premise", "hypothesis", "idx"], ["entailment", "neutral", "contradiction"]),
    "qnli": (["question", "sentence", "idx"], ["entailment", "not_entailment"]),
    "rte": (["sentence1", "sentence2", "idx"], ["entailment", "not_entailment"]),
    "wnli": (["sentence1", "sentence2", "idx"], ["not_entailment", "entailment"]),
    "boolq": (["question", "passage", "idx"], ["False", "True"]),
    "cb": (["premise", "hypothesis", "idx"], ["entailment", "contradiction", "neutral"]),
    "copa": (["premise", "choice1", "choice2", "question", "idx"], ["choice1", "choice2"]),
    "wic": (["word", "sentence1", "sentence2", "start1", "start2", "end1", "end2", "idx"], ["False", "True"]),
    "wsc": (["text", "span1_index", "span2_index", "span1_text", "span2_text", "idx"], ["False", "True"]),
    "multirc": (["paragraph", "question", "answer"], ["False", "True"]),
    "ag_news": (["text"], ["World", "Sports", "Business", "Sci/Tech"]),
    "imdb": (["text"], ["neg", "pos"]),
}
INT_COLUMNS = {"idx", "start1", "start2", "end1", "end2", "span1_index", "span2_index"}


def test_every_task_preset_has_a_schema_here():
    presets = {p.stem for p in (ROOT / "conf" / "task").glob("*.yaml")} - {"demo", "file", "hf", "flan"}
    assert presets == set(TASK_SCHEMAS)


@pytest.mark.parametrize("preset", sorted(TASK_SCHEMAS))
def test_task_preset_reads_its_dataset_schema(preset, tmp_path):
    columns, names = TASK_SCHEMAS[preset]
    n = 12 * len(names)
    data = {c: (list(range(100, 100 + n)) if c in INT_COLUMNS else [f"{c} {i}" for i in range(n)]) for c in columns}
    data["label"] = [i % len(names) for i in range(n)]
    features = datasets.Features({**{c: datasets.Value("int32" if c in INT_COLUMNS else "string") for c in columns},
                                  "label": datasets.ClassLabel(names=names)})
    (tmp_path / preset).mkdir()
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / preset / "train.parquet"))

    cfg = compose_train([f"task={preset}", f"task.path={tmp_path / preset}", "task.data_name=null"])
    spec = to_dataclass(TaskConfig, cfg.task)
    assert spec.source == "hf" and spec.instruction and "{instruction}" in spec.template
    (task,) = load_tasks(spec)
    assert task.name == preset and task.label_names == names
    ex = task.examples[3]
    assert ex.text.startswith(spec.instruction) and ex.text.rstrip().endswith(":")
    assert all(f"{c} 3" in ex.text for c in columns if f"{{{c}}}" in spec.template)
    assert ex.label == 3 % len(names)
    assert ex.id == (f"{preset}:103" if spec.id_column else f"{preset}:3")
