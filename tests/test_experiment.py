"""Experiment files: schema errors, loaders, methods, trainer choice, run folders, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from paca.experiment import (
    ExperimentError,
    experiment_from_dict,
    load_experiment,
    run_experiment,
    shipped_experiments,
)
from paca.experiment.data import DatasetNotFoundError, load_splits
from paca.experiment.model_loader import ModelNotFoundError, load_model
from paca.experiment.schema import DataSection, MethodSection, ModelSection
from paca.experiment.trainer import trainer_kind

TINY_LLAMA = {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64}


def tiny_experiment(tmp: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A seconds-long experiment table: tiny LLaMA, PaCA, built-in instruction data."""
    exp: dict[str, Any] = {
        "name": "t",
        "seed": 0,
        "output_dir": str(tmp / "runs"),
        "model": {"name": "paca.tiny/tiny-llama", "options": dict(TINY_LLAMA)},
        "data": {"seq_len": 32, "max_train_samples": 64, "max_eval_samples": 8},
        "method": {"name": "paca", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "train": {
            "steps": 6, "batch_size": 4, "lr": 3e-2, "logging_steps": 1, "save_steps": 3,
            "throughput_warmup_steps": 1, "max_grad_norm": 0.0,
        },
    }  # fmt: skip
    for key, value in sections.items():
        if isinstance(value, dict):
            exp[key] = {**exp.get(key, {}), **value}
        else:
            exp[key] = value
    return exp


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub look-ups fail at once instead of retrying a network that is not there."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


# ----------------------------------------------------------------------- schema
def test_unknown_key_names_path_suggestion_and_allowed_keys():
    with pytest.raises(ExperimentError) as err:
        experiment_from_dict({"model": {"name": "x"}, "train": {"learnig_rate": 1}}, "e.toml")
    msg = str(err.value)
    assert "e.toml" in msg and "[train].learnig_rate" in msg and "Did you mean 'lr'?" in msg
    assert "Allowed keys in [train]" in msg and "batch_size" in msg


@pytest.mark.parametrize(
    ("section", "key", "meant"),
    [
        ("train", "learning_rate", "lr"), ("train", "gradient_accumulation_steps", "grad_accum"),
        ("train", "per_device_train_batch_size", "batch_size"), ("train", "max_steps", "steps"),
        ("train", "num_train_epochs", "epochs"), ("train", "lr_scheduler_type", "lr_scheduler"),
        ("train", "bf16", "precision"), ("train", "optim", "optimizer"),
        ("method", "lora_alpha", "alpha"), ("method", "rank", "r"),
        ("data", "max_seq_length", "seq_len"), ("model", "model_name_or_path", "name"),
    ],
)  # fmt: skip
def test_keys_of_other_tools_suggest_ours(section: str, key: str, meant: str):
    """transformers/PEFT names and abbreviations get a hint without a list of aliases."""
    with pytest.raises(ExperimentError, match=rf"\[{section}\]\.{key}\. Did you mean '{meant}'\?"):
        experiment_from_dict({"model": {"name": "x"}, section: {key: 1}})


def test_unknown_section_is_reported():
    with pytest.raises(ExperimentError, match=r"unknown key trainer.*Did you mean 'train'"):
        experiment_from_dict({"model": {"name": "x"}, "trainer": {}})


def test_wrong_type_names_the_expected_type():
    with pytest.raises(ExperimentError, match=r"\[train\]\.steps must be an integer, got '10'"):
        experiment_from_dict({"model": {"name": "x"}, "train": {"steps": "10"}})
    with pytest.raises(ExperimentError, match=r"\[method\]\.target_modules must be"):
        experiment_from_dict({"model": {"name": "x"}, "method": {"target_modules": [1, 2]}})
    with pytest.raises(ExperimentError, match=r"\[model\] must be a table"):
        experiment_from_dict({"model": "x"})


def test_bad_choice_lists_the_allowed_values():
    with pytest.raises(ExperimentError) as err:
        experiment_from_dict({"model": {"name": "x"}, "method": {"name": "loar"}})
    msg = str(err.value)
    assert "[method].name = 'loar'" in msg and "did you mean 'lora'" in msg
    assert "'paca', 'lora', 'full', 'frozen'" in msg


def test_minimum_and_required_keys():
    with pytest.raises(ExperimentError, match=r"\[method\]\.r = 0 is too small"):
        experiment_from_dict({"model": {"name": "x"}, "method": {"r": 0}})
    with pytest.raises(ExperimentError, match=r"\[model\]\.name is required"):
        experiment_from_dict({})


def test_ints_are_accepted_for_floats_and_defaults_fill_in():
    exp = experiment_from_dict({"model": {"name": "x"}, "train": {"lr": 1}})
    assert exp.train.lr == 1.0 and isinstance(exp.train.lr, float)
    assert exp.method.name == "paca" and exp.train.precision == "fp32"


def test_invalid_toml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nname = 1\n")
    with pytest.raises(ExperimentError, match="not valid TOML"):
        load_experiment(bad)
    with pytest.raises(FileNotFoundError, match="experiment file not found.*tiny"):
        load_experiment(tmp_path / "missing.toml")


def test_resolved_toml_round_trips(tmp_path: Path):
    exp = experiment_from_dict(tiny_experiment(tmp_path))
    path = tmp_path / "resolved.toml"
    path.write_text(exp.to_toml())
    assert load_experiment(path).to_dict() == exp.to_dict()


def test_overrides_apply_dotted_keys(tmp_path: Path):
    path = tmp_path / "e.toml"
    path.write_text('[model]\nname = "paca.tiny/tiny-llama"\n')
    exp = load_experiment(path, {"train.steps": 3, "method.name": "lora", "seed": 7})
    assert (exp.train.steps, exp.method.name, exp.seed) == (3, "lora", 7)


def test_shipped_experiments_validate_with_the_paper_settings():
    shipped = shipped_experiments()
    assert {
        "tiny", "llama2-7b-mmlu-paca", "llama2-7b-mmlu-lora", "llama3-8b-oasst1-paca",
        "gaudi2-throughput-llama3-8b", "vit-b16-cifar100-paca",
    } <= set(shipped)  # fmt: skip
    exps = {name: load_experiment(path) for name, path in shipped.items()}
    mmlu = exps["llama2-7b-mmlu-paca"]
    assert (mmlu.method.r, mmlu.method.alpha, mmlu.train.lr) == (16, 64, 1e-4)
    oasst = exps["llama3-8b-oasst1-paca"]
    assert (oasst.method.r, oasst.train.lr) == (64, 5e-3)
    gaudi = exps["gaudi2-throughput-llama3-8b"]
    assert (gaudi.data.seq_len, gaudi.train.precision, gaudi.method.r) == (512, "bf16", 8)
    assert exps["vit-b16-cifar100-paca"].data.num_labels == 100


def test_docs_describe_every_key():
    from pydantic import BaseModel

    from paca.experiment.schema import Experiment

    docs = (Path(__file__).resolve().parents[1] / "docs" / "experiments.md").read_text()
    for name, section in Experiment.model_fields.items():
        assert f"`{name}`" in docs or f"`[{name}]`" in docs, name
        if isinstance(section.annotation, type) and issubclass(section.annotation, BaseModel):
            for key in section.annotation.model_fields:
                assert f"| `{key}` |" in docs, f"[{name}].{key}"


# ----------------------------------------------------------------------- data
def test_local_jsonl_csv_json_and_lmflow_files(tmp_path: Path):
    rows = [{"instruction": f"say {i}", "response": str(i)} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "lm.json").write_text(
        json.dumps({"type": "text_only", "instances": [{"text": "a"}]})
    )
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["instruction", "response"])
        writer.writeheader()
        writer.writerows(rows)
    for name in ("d.jsonl", "d.json", "d.csv"):
        splits = load_splits(DataSection(train=str(tmp_path / name), eval_fraction=0.2), seed=0)
        assert len(splits.train) == 8 and len(splits.eval) == 2
        assert splits.train[0]["instruction"].startswith("say")
    assert load_splits(DataSection(train=str(tmp_path / "lm.json")), 0).train == [{"text": "a"}]


def test_save_to_disk_folder_with_splits(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(6)]}),
        test=datasets.Dataset.from_dict({"text": ["held out"]}),
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    splits = load_splits(DataSection(train=str(tmp_path / "ds"), eval_split="test"), seed=0)
    assert len(splits.train) == 6 and splits.eval[0]["text"] == "held out"
    with pytest.raises(ExperimentError, match="no split 'validation'; splits: test, train"):
        load_splits(DataSection(train=str(tmp_path / "ds"), eval_split="validation"), seed=0)


def test_missing_dataset_says_what_was_looked_for(tmp_path: Path, offline: None):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(
        DatasetNotFoundError, match=f"looked for the local file or folder {missing}"
    ):
        load_splits(DataSection(train=str(missing)), seed=0)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DatasetNotFoundError, match="not a datasets save_to_disk folder"):
        load_splits(DataSection(train=str(tmp_path / "empty_dir")), seed=0)
    with pytest.raises(DatasetNotFoundError) as err:
        load_splits(DataSection(train="nosuch-user/nosuch-data"), seed=0)
    assert "paca.tiny/instructions" in str(err.value) and "hub dataset" in str(err.value)


def test_builtin_sets_have_a_fresh_eval_sample():
    splits = load_splits(DataSection(max_train_samples=20, max_eval_samples=5), seed=0)
    assert len(splits.train) == 20 and len(splits.eval) == 5
    assert splits.eval != splits.train[:5]  # seed + 1: a different sample of the same tasks
    images = load_splits(DataSection(train="paca.tiny/images", max_train_samples=4), seed=0)
    assert images.num_labels == 10 and images.train[0]["image"].shape == (3, 32, 32)


# ---------------------------------------------------------------------- models
def test_unknown_tiny_and_missing_local_model(tmp_path: Path, offline: None):
    with pytest.raises(ModelNotFoundError, match=r"built-in models: .*paca.tiny/tiny-gpt2"):
        load_model(ModelSection(name="paca.tiny/tiny-bert"))
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelNotFoundError, match="found a folder without config.json"):
        load_model(ModelSection(name=str(tmp_path / "m")))
    with pytest.raises(ModelNotFoundError) as err:
        load_model(ModelSection(name="nosuch-user/nosuch-model"))
    assert "paca.tiny/tiny-llama" in str(err.value) and "hub id 'nosuch-user/nosuch-model'" in str(
        err.value
    )


def test_local_model_folder_loads_with_its_tokenizer(tmp_path: Path):
    from paca.tiny import byte_tokenizer, tiny_llama

    tiny_llama(**TINY_LLAMA).save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    loaded = load_model(ModelSection(name=str(tmp_path / "m"), dtype="bfloat16"))
    assert loaded.task == "causal-lm" and loaded.source == "local"
    assert next(loaded.model.parameters()).dtype.is_floating_point
    assert str(next(loaded.model.parameters()).dtype) == "torch.bfloat16"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("hi", add_special_tokens=False)) == "hi"


# --------------------------------------------------------------------- methods
def _prepare(method: dict[str, Any]):
    import paca
    from paca.experiment.methods import prepare
    from paca.tiny import tiny_llama

    return prepare(tiny_llama(**TINY_LLAMA), MethodSection(**method), 0, paca.get_backend())


def test_methods_train_what_they_say():
    targets = ["q_proj", "v_proj"]
    p = _prepare({"name": "paca", "r": 4, "alpha": 16.0, "target_modules": targets})
    assert p.lr_scale == 4.0 and p.trains
    q = p.model.model.model.layers[0].self_attn.q_proj
    assert p.trainable == 4 * (
        q.base_layer.out_features
        + p.model.model.model.layers[0].self_attn.v_proj.base_layer.out_features
    )
    lora = _prepare({"name": "lora", "r": 4, "target_modules": targets})
    assert 0 < lora.trainable < lora.total and lora.lr_scale == 1.0
    full = _prepare({"name": "full"})
    assert full.trainable == full.total
    frozen = _prepare({"name": "frozen"})
    assert frozen.trainable == 0 and not frozen.trains


def test_modules_to_save_are_trained_in_full_and_checked():
    p = _prepare(
        {"name": "paca", "r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}
    )
    head = p.model.model.lm_head  # a trainable copy; the pretrained head stays frozen
    assert all(param.requires_grad for param in head.modules_to_save["default"].parameters())
    assert not any(param.requires_grad for param in head.original_module.parameters())
    assert p.trainable > 4 * p.model.model.model.layers[0].self_attn.q_proj.base_layer.out_features
    with pytest.raises(ExperimentError, match=r"modules_to_save.*\['head'\] match no module"):
        _prepare({"name": "paca", "target_modules": ["q_proj"], "modules_to_save": ["head"]})


# ------------------------------------------------------------- trainer choice
def test_gaudi_trainer_only_on_hpu_with_optimum_habana():
    assert trainer_kind("cpu", find_spec=lambda name: object()) == "hf"
    assert trainer_kind("cuda", find_spec=lambda name: object()) == "hf"
    assert trainer_kind("hpu", find_spec=lambda name: object()) == "gaudi"
    assert trainer_kind("hpu", find_spec=lambda name: None) == "hf"

    def no_optimum(name: str) -> None:
        raise ModuleNotFoundError("No module named 'optimum'")

    assert trainer_kind("hpu", find_spec=no_optimum) == "hf"


def test_lazy_mode_must_agree_with_an_explicit_sdk_setting():
    from paca.experiment.trainer import check_lazy_mode

    check_lazy_mode(True, None)
    check_lazy_mode(False, None)  # SW >= 1.21 defaults to eager
    check_lazy_mode(True, "1")
    check_lazy_mode(False, "0")
    with pytest.raises(ExperimentError, match="lazy_mode = true but PT_HPU_LAZY_MODE=0"):
        check_lazy_mode(True, "0")
    with pytest.raises(ExperimentError, match="set PT_HPU_LAZY_MODE=0"):
        check_lazy_mode(False, "1")


def test_gaudi_trainer_gets_gaudi_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Against a stand-in of optimum-habana's documented API (the real one needs Gaudi)."""
    import sys
    import types

    from transformers import Trainer, TrainingArguments

    from paca.experiment.trainer import build_trainer, common_arguments
    from paca.integrations.transformers import PacaTrainer

    seen: dict[str, Any] = {}

    class GaudiConfig:
        use_fused_adam = use_fused_clip_norm = None

    def gaudi_training_arguments(**kwargs: Any) -> TrainingArguments:
        seen["args"] = dict(kwargs)
        gaudi_only = ("use_habana", "use_lazy_mode", "use_hpu_graphs_for_training",
                      "gaudi_config_name")  # fmt: skip
        plain = {k: v for k, v in kwargs.items() if k not in gaudi_only}
        return TrainingArguments(use_cpu=True, **plain)  # this machine has no HPU

    class GaudiTrainer(Trainer):
        def __init__(self, model: Any = None, gaudi_config: Any = None, **kwargs: Any) -> None:
            seen["gaudi_config"] = gaudi_config
            super().__init__(model=model, **kwargs)

    habana = types.ModuleType("optimum.habana")
    habana.GaudiConfig, habana.GaudiTrainer = GaudiConfig, GaudiTrainer
    habana.GaudiTrainingArguments = gaudi_training_arguments
    optimum = types.ModuleType("optimum")
    optimum.habana = habana
    monkeypatch.setitem(sys.modules, "optimum", optimum)
    monkeypatch.setitem(sys.modules, "optimum.habana", habana)
    monkeypatch.delenv("PT_HPU_LAZY_MODE", raising=False)
    # The model computes on the cpu backend here, which the Gaudi checks would refuse:
    # record that the one GaudiTrainer builder checks (tests/test_hpu_backend.py runs them).
    checked: list[tuple[Any, Any]] = []
    monkeypatch.setattr(
        "paca.integrations.habana.check_gaudi_args",
        lambda args, backend: checked.append((args, backend)) or [],
    )

    exp = experiment_from_dict(tiny_experiment(tmp_path, train={"precision": "bf16"}))
    prepared = _prepare({"name": "paca", "r": 4, "target_modules": ["q_proj"]})
    kwargs = common_arguments(exp, tmp_path / "ckpt", "hpu", prepared.lr_scale)
    trainer = build_trainer(exp, "gaudi", prepared.model, kwargs)
    assert [backend for _, backend in checked] == [prepared.model.backend]
    assert isinstance(trainer, PacaTrainer) and isinstance(trainer, GaudiTrainer)
    args = seen["args"]
    assert args["use_habana"] is True and args["use_lazy_mode"] is True
    assert args["gaudi_config_name"] is None and args["bf16"] is True
    assert "use_cpu" not in args and "fp16" not in args
    assert seen["gaudi_config"].use_fused_clip_norm is True
    assert seen["gaudi_config"].use_fused_adam is False
    with pytest.raises(ExperimentError, match="fp16' is not supported on Gaudi"):
        bad = experiment_from_dict(tiny_experiment(tmp_path, train={"precision": "fp16"}))
        common_arguments(bad, tmp_path, "hpu", 1.0)


def test_a_bf16_trainer_leaves_the_next_fp32_one_unmixed(tmp_path: Path):
    """transformers 4.x TrainingArguments(bf16=True) write ACCELERATE_MIXED_PRECISION into
    the environment; a later fp32 experiment in the same process must not autocast."""
    import os

    from paca.experiment.trainer import build_trainer, common_arguments

    before = os.environ.get("ACCELERATE_MIXED_PRECISION")
    for precision, expected in (("bf16", "bf16"), ("fp32", "no")):
        exp = experiment_from_dict(tiny_experiment(tmp_path, train={"precision": precision}))
        prepared = _prepare({"name": "paca", "r": 4, "target_modules": ["q_proj"]})
        kwargs = common_arguments(exp, tmp_path / precision, "cpu", prepared.lr_scale)
        trainer = build_trainer(exp, "hf", prepared.model, kwargs)
        assert trainer.accelerator.mixed_precision == expected
        assert os.environ.get("ACCELERATE_MIXED_PRECISION") == before


# ------------------------------------------------------------------ full runs
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("run")
    exp = experiment_from_dict(tiny_experiment(tmp))
    return run_experiment(exp, backend="cpu", run_dir=tmp / "run", progress=False)


def test_run_folder_holds_config_environment_metrics_summary_adapter(finished_run):
    run_dir, s = finished_run.run_dir, finished_run.summary
    assert load_experiment(run_dir / "experiment.toml").method.r == 4
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["backend"] == "cpu" and env["device_name"]
    assert env["describe"]["backend"] == "cpu" and env["libraries"]["torch"]
    assert "git" in env
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 6]
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(s))
    assert s["status"] == "completed" and s["steps"] == 6
    assert s["eval_loss"] < s["eval_loss_before"]
    assert 0 <= s["eval_accuracy"] <= 1
    assert s["measured_steps"] == 5 and s["step_time_median_s"] > 0
    assert s["tokens_per_second"] > 0 and s["samples_per_second"] > 0
    assert s["peak_memory_bytes"] is None  # the CPU backend has no memory hooks
    assert s["trainable_params"] < s["total_params"]
    assert any((run_dir / s["adapter"]).iterdir())
    assert (run_dir / "checkpoints" / "checkpoint-6").is_dir()


def test_adapter_reloads_to_the_trained_model(finished_run):
    import torch

    import paca
    from paca.tiny import tiny_llama

    if not hasattr(paca, "load"):
        pytest.fail("paca.load is missing: the adapter written by the run cannot be reloaded")
    model = paca.load(tiny_llama(**TINY_LLAMA), finished_run.run_dir / "adapter")
    ids = torch.arange(10)[None]
    with torch.no_grad():
        base = tiny_llama(**TINY_LLAMA)(ids).logits
        tuned = model(ids).logits
    assert not torch.allclose(base, tuned)


def test_a_run_folder_is_never_overwritten(finished_run):
    exp = load_experiment(finished_run.run_dir / "experiment.toml")
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        run_experiment(exp, backend="cpu", run_dir=finished_run.run_dir, progress=False)


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    from paca.experiment.callbacks import RunRecorder

    original = RunRecorder.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if state.global_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunRecorder, "on_step_end", on_step_end)


@pytest.mark.slow
def test_ctrl_c_leaves_a_usable_run_and_resume_finishes_it(
    finished_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    exp = load_experiment(finished_run.run_dir / "experiment.toml")
    _interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, backend="cpu", run_dir=tmp_path / "r", progress=False)
    partial = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert partial["status"] == "interrupted" and partial["steps"] == 4
    assert (tmp_path / "r" / "adapter").is_dir() and (tmp_path / "r" / "metrics.jsonl").is_file()

    monkeypatch.undo()
    done = run_experiment(None, run_dir=tmp_path / "r", resume=True, progress=False).summary
    assert done["status"] == "completed" and done["resumed_from"] == "checkpoints/checkpoint-3"
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # no duplicates
    assert done["eval_loss_before"] == finished_run.summary["eval_loss_before"]
    assert done["eval_loss"] == pytest.approx(finished_run.summary["eval_loss"], rel=1e-5)


def test_failed_run_is_marked_failed(tmp_path: Path):
    exp = experiment_from_dict(tiny_experiment(tmp_path, data={"train": str(tmp_path / "x.jsonl")}))
    with pytest.raises(DatasetNotFoundError):
        run_experiment(exp, backend="cpu", run_dir=tmp_path / "r", progress=False)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and "x.jsonl" in summary["error"]


def test_frozen_reference_is_evaluated_not_trained(tmp_path: Path):
    exp = experiment_from_dict(tiny_experiment(tmp_path, method={"name": "frozen"}))
    s = run_experiment(exp, backend="cpu", run_dir=tmp_path / "r", progress=False).summary
    assert s["status"] == "completed" and s["steps"] == 0 and s["trainable_params"] == 0
    assert s["eval_loss"] == pytest.approx(s["eval_loss_before"]) and s["adapter"] is None


def test_image_classification_run_reports_accuracy(tmp_path: Path):
    exp = experiment_from_dict(
        tiny_experiment(
            tmp_path,
            model={
                "name": "paca.tiny/tiny-vit",
                "options": {"hidden": 32, "layers": 1, "heads": 2},
            },
            data={"train": "paca.tiny/images", "max_train_samples": 32, "max_eval_samples": 16},
            method={
                "target_modules": "all-linear",
                "exclude_modules": ["classifier"],
                "modules_to_save": ["classifier"],
            },  # fmt: skip
            train={"steps": 4, "save_steps": 0},
        )
    )
    s = run_experiment(exp, backend="cpu", run_dir=tmp_path / "r", progress=False).summary
    assert s["task"] == "image-classification" and 0 <= s["eval_accuracy"] <= 1
    assert s["samples_per_second"] > 0 and s["tokens_per_second"] is None
    adapter = tmp_path / "r" / "adapter"
    from safetensors.torch import load_file

    from paca import io as pio

    assert sorted(p.name for p in adapter.iterdir() if not p.name.startswith(".")) == [
        "paca_adapter.safetensors",
        "paca_config.json",
    ]
    assert pio.WEIGHTS_NAME == "paca_adapter.safetensors"
    assert "classifier.modules_to_save.weight" in load_file(adapter / pio.WEIGHTS_NAME)


# ----------------------------------------------- shipped files on local stand-ins
def _stand_ins(tmp: Path) -> dict[str, str]:
    """Local copies in the hub formats: Alpaca JSONL, guanaco and CIFAR-100 save_to_disk."""
    datasets = pytest.importorskip("datasets")
    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    from paca.tiny import byte_tokenizer, instruction_dataset, tiny_llama, tiny_vit

    tiny_llama(**TINY_LLAMA).save_pretrained(tmp / "llama")
    byte_tokenizer().save_pretrained(tmp / "llama")
    tiny_vit(hidden=32, layers=1, heads=2, num_labels=100).save_pretrained(tmp / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp / "vit")
    alpaca = [
        {"instruction": r["instruction"], "input": "", "output": r["response"]}
        for r in instruction_dataset(24)
    ]
    (tmp / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    text = [f"### Human: {r['instruction']}### Assistant: {r['output']}" for r in alpaca]
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": text[:20]}),
        test=datasets.Dataset.from_dict({"text": text[20:]}),
    ).save_to_disk(str(tmp / "guanaco"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(12)]
    features = datasets.Features(
        {"img": datasets.Image(), "fine_label": datasets.ClassLabel(num_classes=100)}
    )
    split = {"img": images, "fine_label": [int(x) for x in rng.integers(0, 100, 12)]}
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict(split, features=features),
        test=datasets.Dataset.from_dict(split, features=features).select(range(4)),
    ).save_to_disk(str(tmp / "cifar100"))
    return {
        "meta-llama/Llama-2-7b-hf": str(tmp / "llama"),
        "meta-llama/Meta-Llama-3-8B": str(tmp / "llama"),
        "google/vit-base-patch16-224-in21k": str(tmp / "vit"),
        "tatsu-lab/alpaca": str(tmp / "alpaca.jsonl"),
        "timdettmers/openassistant-guanaco": str(tmp / "guanaco"),
        "uoft-cs/cifar100": str(tmp / "cifar100"),
    }


@pytest.mark.slow
def test_shipped_paper_experiments_run_on_local_stand_ins(tmp_path: Path):
    stand_in = _stand_ins(tmp_path)
    for name in ("llama2-7b-mmlu-paca", "llama3-8b-oasst1-paca", "gaudi2-throughput-llama3-8b",
                 "vit-b16-cifar100-paca"):  # fmt: skip
        shipped = load_experiment(shipped_experiments()[name])
        exp = load_experiment(
            shipped_experiments()[name],
            {
                "model.name": stand_in[shipped.model.name],
                "data.train": stand_in[shipped.data.train],
                "data.seq_len": 32, "data.max_eval_samples": 4, "train.steps": 2,
                "train.batch_size": 2, "train.grad_accum": 1, "train.save_steps": 0,
                "train.eval_steps": 0, "train.throughput_warmup_steps": 0, "train.logging_steps": 1,
                "method.r": min(shipped.method.r, 8),
            },
        )  # fmt: skip
        s = run_experiment(exp, backend="cpu", run_dir=tmp_path / name, progress=False).summary
        assert s["status"] == "completed" and s["steps"] == 2, name
        assert s["eval_loss"] is not None and s["train_loss_final"] is not None, name
        assert s["effective_learning_rate"] == pytest.approx(
            shipped.train.lr * (shipped.method.alpha / exp.method.r if shipped.method.alpha else 1)
        ), name
