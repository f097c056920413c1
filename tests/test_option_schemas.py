"""Issue 14.3: every option of generate / eval / train, under every architecture, is honoured (it reaches the
architecture's options) or refused (exit 2 naming the flag, before any model loads). Nothing is dropped."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from ragkit.archs import registry
from ragkit.archs.options import field_names
from ragkit.cli import app
from ragkit.commands.eval import BEIR_OPTIONS, EVAL_LEVEL, LM_OPTIONS, SAMPLING
from ragkit.commands.generate import GENERATE_LEVEL
from ragkit.train.config import ARCH_FIELDS, FIELDS, fields_of

runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands
REPO = Path(__file__).resolve().parent.parent

# values that pass each option's own checks when it is given alone
VALID = {"critic_task": "utility", "dtype": "float32", "backend": "vllm", "quantize": "int8", "template": "{prompt}", "stop": "END",
         "mode": "always_retrieve", "passages": "index", "retrieval_mode": "sparse", "fusion": "score",
         "rag_decoding": "token", "device": "cpu", "workdir": "work", "index": "IDX"}
# what an option needs beside it to pass its checks alone (the companion is in the same schema)
COMPANIONS = {**{name: ["--index", "IDX"] for name in ("passages", "retrieval_mode", "fusion", "dense_weight")},
              "tensor_parallel_size": ["--backend", "vllm"], "filter_thres": ["--do-sample"]}


def params(command: str) -> dict[str, Any]:
    return {p.name: p for p in COMMANDS[command].params if p.opts and p.opts[0].startswith("-")}


def given(param: Any, tmp: Path) -> tuple[list[str], Any]:
    """(arguments that give `param` a non-default value, the value its options field should then hold)."""
    if getattr(param, "is_flag", False):
        if param.secondary_opts and param.default is True:
            return [param.secondary_opts[0]], False
        return [param.opts[0]], True
    name, flag = param.name, param.opts[0]
    if name in VALID:
        value = str(tmp / "idx") if VALID[name] == "IDX" else VALID[name]
        return [flag, value], (value,) if name == "stop" else value
    kind = annotation(param)
    if kind is int:
        value = (param.default if isinstance(param.default, int) else max(param.min or 0, 2)) + 1
        return [flag, str(value)], value
    if kind is float:
        value = 0.3 if param.default != 0.3 else 0.4
        return [flag, str(value)], value
    return [flag, "x"], "x"


def annotation(param: Any) -> Any:
    """The option's Python type, None and list wrappers removed."""
    import typing

    kind = param.type_descriptor.annotation
    while typing.get_args(kind):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def no_model_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Model names resolve to nothing here. The modules that bind `resolve` at import are imported first:
    imported while the stand-in is in place, they would keep it after the test (and break every later test
    that loads a model, as test_retro_pipeline did after this file)."""
    import ragkit.models.encoder  # noqa: F401
    import ragkit.models.generator  # noqa: F401

    monkeypatch.setattr("ragkit.models.registry.resolve", lambda m: None)
    monkeypatch.setattr("ragkit.archs.rag.hf_checkpoint.hf_rag_class", lambda m: None)  # no transformers RAG folder


def rag_checkpoint(tmp: Path) -> str:
    folder = tmp / "rag-ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "rag_config.json").write_text("{}")
    return str(folder)


# (architecture, --model): the RAG architecture has two schemas, by what --model is
CASES = [("none", "m"), ("rag", "m"), ("rag", "CKPT"), ("selfrag", "m"), ("selfrag-critic", "m"), ("retro", "m")]


def case_model(model: str, tmp: Path) -> str:
    return rag_checkpoint(tmp) if model == "CKPT" else model


def schema(arch: str, model: str) -> set[str]:
    return field_names(registry.get(arch).options_class(model))


@pytest.mark.parametrize(("arch", "model"), CASES)
def test_generate_refuses_every_option_its_architecture_does_not_read(arch: str, model: str, tmp_path: Path) -> None:
    model = case_model(model, tmp_path)
    own = schema(arch, model)
    refused = 0
    for name, param in params("generate").items():
        if name in own or name in GENERATE_LEVEL:
            continue
        args, _ = given(param, tmp_path)
        result = runner.invoke(app, ["generate", "-", "--arch", arch, "-m", model, *args], input="q\n")
        assert result.exit_code == 2, (name, result.stderr)
        assert result.stderr.startswith(f"Error: {args[0]}: not used by"), result.stderr
        refused += 1
    assert refused >= 5


@pytest.mark.parametrize(("arch", "model"), CASES)
def test_generate_hands_every_option_of_the_schema_to_the_architecture(arch: str, model: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each option given alone reaches the architecture's options with the value typed."""
    model = case_model(model, tmp_path)
    seen: list[Any] = []

    class Answerer:
        device = "cpu"

        def answer(self, questions: Any) -> list[dict[str, Any]]:
            return [{"id": q.id, "question": q.text, "output": "", "passages": []} for q in questions]

    monkeypatch.setattr(registry.Architecture, "load", lambda self, m, options: seen.append(options) or Answerer())
    if arch == "retro":  # RETRO reads prompts, not questions
        monkeypatch.setattr(registry.Architecture, "read_input", lambda self, *a, **k: [])
    no_model_lookup(monkeypatch)
    own = schema(arch, model)
    every = params("generate")
    assert own <= set(every), f"schema fields without a flag: {own - set(every)}"
    # retrieve-then-read without an index needs the input's own passages (refused when the input is read)
    question = '{"question": "q", "ctxs": [{"title": "t", "text": "x"}]}\n' if arch == "rag" else "q\n"
    for name in sorted(own - GENERATE_LEVEL):  # --task is the command's (it also reads the input as that task)
        args, value = given(every[name], tmp_path)
        args += [str(tmp_path / "idx") if a == "IDX" else a for a in COMPANIONS.get(name, [])]
        seen.clear()
        result = runner.invoke(app, ["generate", "-", "--arch", arch, "-m", model, *args], input=question)
        assert result.exit_code == 0, (name, result.stderr)
        assert getattr(seen[0], name) == value, name


def test_the_task_decides_self_rag_scoring_and_form() -> None:
    from ragkit.archs.selfrag.inference import SelfRagOptions

    assert SelfRagOptions(task="asqa").decoding().long_form and not SelfRagOptions(task="popqa").decoding().long_form
    assert SelfRagOptions(task="arc_c").decoding().closed and not SelfRagOptions().decoding().closed
    assert not SelfRagOptions(task="asqa", long_form=False).decoding().long_form


def test_flags_show_the_defaults_the_schemas_hold() -> None:
    """The help text's defaults are the dataclasses' (defaults live in the schema; flags only show them)."""
    every = {**params("generate"), **params("eval")}
    for arch, model in CASES:
        cls = registry.get(arch).options_class("CKPT-missing" if model == "m" else "")
        if model == "CKPT":
            from ragkit.archs.rag.inference import RagCheckpointOptions as cls  # noqa: N813
        for f in dataclasses.fields(cls):
            if f.name == "k" and f.default is None:
                continue  # a RAG checkpoint's k is its own n_docs (the help says so)
            default = every[f.name].default
            assert default == f.default or (default is None and f.default is None), (arch, f.name, default, f.default)


@pytest.mark.parametrize(("arch", "model"), [c for c in CASES if c[0] != "retro"])
def test_eval_with_a_model_refuses_what_the_architecture_does_not_read(arch: str, model: str, tmp_path: Path) -> None:
    model = case_model(model, tmp_path)
    own = schema(arch, model) | EVAL_LEVEL | SAMPLING | {"model", "arch", "limit"}
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "q", "answers": ["a"]}\n')
    for name, param in params("eval").items():
        if name in own:
            continue
        args, _ = given(param, tmp_path)
        result = runner.invoke(app, ["eval", "--task", "qa", "--data", str(data), "--arch", arch, "-m", model, *args])
        assert result.exit_code == 2 and result.stderr.startswith(f"Error: {args[0]}: not used by"), (name, result.stderr)


@pytest.mark.parametrize(("task", "allowed"), [("qa", {"predictions", "limit", "model", *SAMPLING}), ("lm", LM_OPTIONS),
                                               ("beir", BEIR_OPTIONS)])
def test_eval_paths_without_an_answering_model_refuse_generation_options(task: str, allowed: set[str],
                                                                         tmp_path: Path) -> None:
    """Scoring read predictions, `--task lm` and `--task beir` each read a fixed set of options."""
    for name, param in params("eval").items():
        if name in allowed | EVAL_LEVEL:
            continue
        args, _ = given(param, tmp_path)
        result = runner.invoke(app, ["eval", "--task", task, "--data", str(tmp_path), *args], input="")
        assert result.exit_code == 2, (task, name, result.stderr)
        assert result.stderr.startswith(f"Error: {args[0]}: not used by"), (task, name, result.stderr)


@pytest.mark.parametrize("arch", registry.TRAINABLE)
def test_train_refuses_every_option_of_another_architecture(arch: str, tmp_path: Path) -> None:
    """`train --arch rag --retro-dim 8 --hard-negatives 4` trained RAG and dropped both."""
    every = params("train")
    foreign = sorted(set(FIELDS) - fields_of(arch))
    assert foreign
    for name in foreign:
        param = next(p for p in every.values() if p.name == name)
        args, _ = given(param, tmp_path)
        result = runner.invoke(app, ["train", "--arch", arch, "--data", "d", "-o", str(tmp_path / "o"), *args])
        assert result.exit_code == 2, (name, result.stderr)
        assert re.match(rf"Error: {re.escape(args[0])}: not used by --arch {arch}\b", result.stderr), result.stderr


def test_train_refuses_a_config_key_of_another_architecture_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"arch": "rag", "data": "d", "output": str(tmp_path / "o"), "retro_dim": 8}))
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2
    assert f"{config}: key 'retro_dim': not used by --arch rag" in result.stderr


def test_every_architecture_section_field_is_read_by_that_architecture() -> None:
    """The schema is not a list of hopes: each section's field is read (`config.FIELD`) in its folder, and
    each common field by the trainer or the config."""
    folders = {"rag": "rag", "selfrag": "selfrag", "selfrag-critic": "selfrag", "embedder": "embedder",
               "retro": "retro"}
    for arch, names in ARCH_FIELDS.items():
        source = "\n".join(p.read_text() for p in (REPO / "ragkit" / "archs" / folders[arch]).glob("*.py"))
        if "LoraSettings.from_config(config" in source:  # the one LoRA helper reads the --lora-* flags
            source += (REPO / "ragkit" / "models" / "lm.py").read_text()
        for name in names:
            assert re.search(rf"\bconfig\.{name}\b", source), (arch, name)
    shared = "\n".join(p.read_text() for p in [*(REPO / "ragkit" / "train").glob("*.py"), *(REPO / "ragkit" / "archs").rglob("*.py")])
    for name in set(FIELDS) - {n for names in ARCH_FIELDS.values() for n in names}:
        assert re.search(rf"\b(\w*config|self)\.{name}\b", shared), name


@pytest.mark.parametrize(("flags", "message"), [
    (["--arch", "rag", "-m", "CKPT", "--temperature", "0.5"], "--temperature: not used by a trained RAG checkpoint"),
    (["--arch", "rag", "-m", "m", "--retrieval-mode", "hybrid", "--passages", "ctxs"],
     "--retrieval-mode, --fusion and --dense-weight choose how --index is searched"),
    (["--arch", "none", "--k", "3"], "--k: not used by --arch none"),
    (["--arch", "selfrag", "--k", "5", "--max-passage-words", "150"], "--max-passage-words: not used by --arch selfrag"),
])
def test_the_silently_dropped_flags_of_the_issue_are_refused(flags: list[str], message: str, tmp_path: Path) -> None:
    args = [rag_checkpoint(tmp_path) if a == "CKPT" else a for a in flags]
    result = runner.invoke(app, ["generate", "-", *args], input="q\n")
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_a_trained_rag_checkpoint_honours_k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`generate --arch rag --model TRAINED --k 1` returned the checkpoint's 3 passages."""
    from ragkit.archs.rag import inference

    class Rag:
        def __init__(self) -> None:
            self.config = type("C", (), {"n_docs": 3, "loss": "sequence"})()

        def parameters(self):  # noqa: ANN201
            import torch

            yield torch.zeros(1)

    monkeypatch.setattr("ragkit.archs.rag.decoding.load_rag_checkpoint", lambda *a, **k: Rag())
    answerer = inference.load(rag_checkpoint(tmp_path), inference.RagCheckpointOptions(k=1))
    assert answerer.rag.config.n_docs == 1
    default = inference.load(rag_checkpoint(tmp_path), inference.RagCheckpointOptions())
    assert default.rag.config.n_docs == 3


def test_the_self_rag_scripts_spellings_are_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--ndocs is --k, --world_size is --tensor-parallel-size (seed 001's run_short_form.py names)."""
    seen: list[Any] = []

    class Answerer:
        device = "cpu"

        def answer(self, questions: Any) -> list[dict[str, Any]]:
            return []

    monkeypatch.setattr(registry.Architecture, "load", lambda self, m, options: seen.append(options) or Answerer())
    no_model_lookup(monkeypatch)
    result = runner.invoke(app, ["generate", "-", "--arch", "selfrag", "-m", "m", "--ndocs", "7", "--backend", "vllm",
                                 "--world_size", "2"], input="q\n")
    assert result.exit_code == 0, result.stderr
    assert (seen[0].k, seen[0].tensor_parallel_size) == (7, 2)
