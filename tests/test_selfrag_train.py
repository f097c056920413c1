"""Self-RAG training: label masks, the generator and critic on the shared trainer, LoRA checkpoints that
carry the reflection-token rows, export, and critic labelling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_jsonl
from ragkit.cli import app
from ragkit.archs.selfrag.data import IGNORE, InstructionExample, encode

GEN_ROWS = [
    {"instruction": "who was the king of france", "output":
     "[Retrieval]<paragraph>paris\nthe king of france was born in paris</paragraph>[Relevant]the king[Fully supported][Utility:5]"},
    {"instruction": "the river in london", "output": "[No Retrieval]the river[Utility:4]"},
    {"instruction": "music of the city", "input": "rome",
     "output": "[Retrieval]<paragraph>rome\nmusic film poet</paragraph>[Irrelevant]the music[Utility:2]"},
] * 4


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_prompt_and_paragraph_contents_are_masked(tiny_selfrag_path: Path) -> None:
    tok = _tokenizer(tiny_selfrag_path)
    ex = InstructionExample("who was the king", "", "[Retrieval]<paragraph>paris\nthe city</paragraph>[Relevant]king")
    enc = encode(ex, tok, critic=False, max_length=256)
    ids, labels = enc["input_ids"], enc["labels"]
    tokens = tok.convert_ids_to_tokens(ids)
    trained = [t for t, lab in zip(tokens, labels) if lab != IGNORE]
    assert trained == ["[Retrieval]", "<paragraph>", "</paragraph>", "[Relevant]", "king", "</s>"]
    for i, lab in enumerate(labels):
        if lab != IGNORE:
            assert lab == ids[i]


def test_critic_prompt_has_no_trailing_newline_and_trains_only_the_token(tiny_selfrag_path: Path) -> None:
    tok = _tokenizer(tiny_selfrag_path)
    enc = encode(InstructionExample("rate it", "the king", "[Relevant]"), tok, critic=True, max_length=256)
    trained = [t for t, lab in zip(tok.convert_ids_to_tokens(enc["input_ids"]), enc["labels"]) if lab != IGNORE]
    assert trained == ["[Relevant]", "</s>"]


def _train(tmp_path: Path, model: Path, arch: str, rows: list[dict], *extra: str) -> Path:
    data = write_jsonl(tmp_path / f"{arch}.jsonl", rows)
    out = tmp_path / f"run-{arch}"
    result = CliRunner().invoke(app, [
        "train", "--arch", arch, "--data", str(data), "--generator", str(model), "-o", str(out),
        "--max-steps", "12", "--batch-size", "4", "--lr", "3e-3", "--logging-steps", "2", "--save-steps", "12",
        "--device", "cpu", "--json", *extra])
    assert result.exit_code == 0, result.stderr
    return out


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_generator_lora_trains_and_checkpoint_restores_new_token_rows(tiny_lm_path: Path, tmp_path: Path) -> None:
    run = _train(tmp_path, tiny_lm_path, "selfrag", GEN_ROWS)
    losses = _losses(run)
    assert losses[-1] < losses[0]
    final = run / "final" / "model"
    assert (final / "adapter_model.safetensors").exists()
    assert json.loads((run / "final" / "selfrag.json").read_text())["role"] == "generator"
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_lm_path.resolve())

    from ragkit.archs.selfrag.loading import load_causal_lm
    from ragkit.archs.selfrag.tokens import reflection_ids

    torch.manual_seed(1)
    model, tok = load_causal_lm(str(run / "final"), device="cpu")
    ids = reflection_ids(tok)
    batch = tok(["who was the king of france [Retrieval]"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
    # the base's new rows start random: equal outputs under another seed mean the adapter restored them
    torch.manual_seed(2)
    again, _ = load_causal_lm(str(run / "final"), device="cpu")
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits[0, -1], logits, atol=1e-5)
    assert (final / "adapter_model.safetensors").stat().st_size < 200_000  # no full embedding copy

    # export merges LoRA into a plain model folder with the same outputs
    exported = tmp_path / "exported"
    result = CliRunner().invoke(app, ["export", str(run / "final"), "-o", str(exported)])
    assert result.exit_code == 0, result.stderr
    assert not (exported / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(exported)
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits[0, -1], logits, atol=1e-4)
    assert reflection_ids(_tokenizer(exported)).ids == ids.ids


def test_critic_trains_and_exported_model_is_refused_by_export_twice(tiny_lm_path: Path, tmp_path: Path) -> None:
    rows = [{"instruction": "is the evidence relevant", "input": "paris", "output": "[Relevant]", "task": "relevance"},
            {"instruction": "is the evidence relevant", "input": "rome film", "output": "[Irrelevant]",
             "task": "relevance"}] * 4
    run = _train(tmp_path, tiny_lm_path, "selfrag-critic", rows, "--lora-r", "0")
    assert (run / "final" / "model" / "model.safetensors").exists()  # full fine-tuning with --lora-r 0
    assert json.loads((run / "final" / "selfrag.json").read_text())["role"] == "critic"
    losses = _losses(run)
    assert losses[-1] < losses[0]
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    result = CliRunner().invoke(app, ["export", str(run / "final"), "-o", str(target)])
    assert result.exit_code == 2 and "exists" in result.stderr
    assert (target / "keep.txt").exists()


@pytest.mark.parametrize("row, field", [({"output": "[Relevant]"}, "instruction"),
                                        ({"instruction": "x", "output": ""}, "output")])
def test_bad_training_rows_name_file_line_and_field(tiny_lm_path: Path, tmp_path: Path, row: dict, field: str) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [GEN_ROWS[0], row])
    result = CliRunner().invoke(app, ["train", "--arch", "selfrag", "--data", str(data), "--generator",
                                      str(tiny_lm_path), "-o", str(tmp_path / "r"), "--max-steps", "1",
                                      "--device", "cpu"])
    assert result.exit_code == 3
    assert f"bad.jsonl:2: field '{field}'" in result.stderr


# -- critic labelling -------------------------------------------------------------------------------
class ScriptedCritic:
    """Judgements fixed by the evidence text, to check which passage and tokens the labeller writes."""

    def __init__(self, retrieve: bool) -> None:
        self.retrieve = retrieve
        self.asked: dict[str, int] = {}

    def judge(self, task, items):
        from ragkit.archs.selfrag.critic import Judgement

        self.asked[task] = self.asked.get(task, 0) + len(items)
        out = []
        for _, text in items:
            if task == "retrieval":
                token = "[Retrieval]" if self.retrieve else "[No Retrieval]"
            elif task == "utility":
                token = "[Utility:4]"
            elif task == "relevance":
                token = "[Irrelevant]" if "rome" in text else "[Relevant]"
            else:
                token = "[Fully supported]" if "paris" in text.split("Evidence:")[1] else "[Partially supported]"
            out.append(Judgement(token, {token: 1.0}))
        return out


def test_labelling_picks_the_relevant_best_supported_passage() -> None:
    from ragkit.archs.selfrag.critic import label_examples

    found = [{"id": "r", "title": "rome", "text": "rome film"}, {"id": "l", "title": "london", "text": "a city"},
             {"id": "p", "title": "paris", "text": "the king"}]
    critic = ScriptedCritic(retrieve=True)
    rows = label_examples(critic, [{"instruction": "who was the king", "output": "the king", "id": 7}],
                          lambda queries, k: [found[:k]] * len(queries), 3)
    assert rows[0]["output"] == ("[Retrieval]<paragraph>paris\nthe king</paragraph>[Relevant]the king"
                                 "[Fully supported][Utility:4]")
    assert rows[0]["id"] == 7 and rows[0]["critic"]["passage"] == "p"
    assert critic.asked == {"retrieval": 1, "utility": 1, "relevance": 3, "groundness": 2}  # rome is irrelevant
    only_rome = label_examples(ScriptedCritic(True), [{"instruction": "q", "output": "a"}],
                               lambda queries, k: [found[:1]] * len(queries), 1)
    assert only_rome[0]["output"] == "[Retrieval]<paragraph>rome\nrome film</paragraph>[Irrelevant]a[Utility:4]"
    none = label_examples(ScriptedCritic(False), [{"instruction": "q", "output": "a"}],
                          lambda queries, k: pytest.fail("no retrieval expected"), 3)
    assert none[0]["output"] == "[No Retrieval]a[Utility:4]"


def test_selfrag_label_cli_on_a_tiny_critic(tiny_selfrag_path: Path, tiny_encoder_path: Path, corpus_file: Path,
                                            tmp_path: Path) -> None:
    from ragkit.archs.selfrag.tokens import REFLECTION_TOKENS

    runner = CliRunner()
    idx = tmp_path / "idx"
    built = runner.invoke(app, ["index", "build", str(corpus_file), "-o", str(idx), "--model", str(tiny_encoder_path),
                                "--device", "cpu"])
    assert built.exit_code == 0, built.stderr
    data = write_jsonl(tmp_path / "plain.jsonl", [{"instruction": "who was the king", "output": "the king"},
                                                  {"question": "the river", "answers": ["river"]}])
    result = runner.invoke(app, ["selfrag", "label", str(data), "--critic", str(tiny_selfrag_path), "--index",
                                 str(idx), "--ndocs", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2
    for row, answer in zip(rows, ["the king", "river"]):
        assert row["output"].startswith(("[Retrieval]<paragraph>", "[No Retrieval]"))
        assert answer in row["output"]
        assert row["critic"]["utility"] in REFLECTION_TOKENS and row["output"].endswith(row["critic"]["utility"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x"}])
    failed = runner.invoke(app, ["selfrag", "label", str(bad), "--critic", str(tiny_selfrag_path), "--index", str(idx)])
    assert failed.exit_code == 3 and "bad.jsonl:1: field 'output'" in failed.stderr


def test_too_long_examples_keep_their_output_in_the_loss(tiny_selfrag_path: Path) -> None:
    tok = _tokenizer(tiny_selfrag_path)
    long_input = " ".join(["the city of paris"] * 100)
    enc = encode(InstructionExample("rate it", long_input, "[Relevant]"), tok, critic=True, max_length=32)
    assert len(enc["input_ids"]) == 32
    trained = [t for t, lab in zip(tok.convert_ids_to_tokens(enc["input_ids"]), enc["labels"]) if lab != IGNORE]
    assert trained == ["[Relevant]", "</s>"]


def test_tracker_writes_tensorboard_events_and_cost_report_prices_gpu_hours(tiny_lm_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run = _train(tmp_path, tiny_lm_path, "selfrag-critic",
                 [{"instruction": "rate", "input": "paris", "output": "[Relevant]"}] * 8,
                 "--tracker", "tensorboard", "--gpu-hour-price", "2.5")
    assert list(run.rglob("events.out.tfevents.*")), "no tensorboard event file"
    report = json.loads((run / "cost_report.json").read_text())
    assert report["gpu_hours"] == 0.0 and report["gpu_cost"] == 0.0  # a CPU run uses no GPU-hours
    assert report["trainable_params"] < report["total_params"]


def test_mlflow_tracker_logs_into_the_run_folder(tiny_lm_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = _train(tmp_path, tiny_lm_path, "selfrag-critic",
                 [{"instruction": "rate", "input": "paris", "output": "[Relevant]"}] * 8, "--tracker", "mlflow")
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and "loss" in runs[0].data.metrics, "no loss logged"
    assert (run / "mlflow.db").exists() or (run / "mlruns").is_dir()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists(), "nothing in the working directory"


def test_unknown_tracker_is_a_usage_error(tiny_lm_path: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", GEN_ROWS)
    result = CliRunner().invoke(app, ["train", "--arch", "selfrag", "--data", str(data), "-o", str(tmp_path / "r"),
                                      "--tracker", "comet"])
    assert result.exit_code == 2 and "--tracker comet" in result.stderr


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a W&B run file: a 7-byte ':W&B' header, then LevelDB's log format (32 KiB
    blocks of chunks: crc32c, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4). Read by hand because
    wandb 0.31 no longer ships a Python reader (wandb-core, in Go, writes and syncs these files)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, records, pending = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_tracker_logs_offline_into_the_run_folder(tiny_lm_path: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--tracker wandb without an API key: offline, under OUTPUT/wandb, every logged loss in the run's
    history (read back from the run file); nothing in the working directory; stdout stays the JSON report."""
    pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    run = _train(tmp_path, tiny_lm_path, "selfrag-critic",
                 [{"instruction": "rate", "input": "paris", "output": "[Relevant]"}] * 8, "--tracker", "wandb")
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, list((run / "wandb").iterdir())
    history = []
    for record in _wandb_records(files[0]):
        if record.WhichOneof("record_type") == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            if "train/loss" in row:
                history.append(row)
    assert [r["train/global_step"] for r in history] == [2, 4, 6, 8, 10, 12]
    assert [r["train/loss"] for r in history] == pytest.approx(_losses(run), rel=1e-5)
    assert not (tmp_path / "wandb").exists(), "nothing in the working directory"



def test_distillation_loss_falls_on_a_tiny_teacher_student_pair(tiny_lm_path: Path, tiny_selfrag_path: Path,
                                                               tmp_path: Path) -> None:
    from ragkit.archs.selfrag.training import distillation_kl

    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 2, -100, -100]])
    assert float(distillation_kl(logits, logits, labels, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_kl(logits, torch.randn(2, 5, 7), labels, 2.0)) > 0.0
    # pure KL (alpha 0): the student (the same base, its own new rows) moves towards the teacher
    run = _train(tmp_path, tiny_lm_path, "selfrag", GEN_ROWS, "--distill-from", str(tiny_selfrag_path),
                 "--distill-alpha", "0", "--distill-temperature", "1")
    losses = _losses(run)
    assert losses[-1] < losses[0]
    assert not (run / "final" / "model" / "teacher").exists()


def test_distillation_refuses_a_teacher_with_another_vocabulary(tiny_lm_path: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", GEN_ROWS)
    result = CliRunner().invoke(app, ["train", "--arch", "selfrag", "--data", str(data), "--generator", str(tiny_lm_path),
                                      "-o", str(tmp_path / "r"), "--distill-from", str(tiny_lm_path), "--max-steps", "1",
                                      "--device", "cpu"])
    assert result.exit_code == 4 and "vocabulary differs" in result.stderr
    retro = CliRunner().invoke(app, ["train", "--arch", "retro", "--data", str(data), "-o", str(tmp_path / "r2"),
                                     "--distill-from", str(tiny_lm_path)])
    assert retro.exit_code == 2 and "--distill-from: not used by --arch retro" in retro.stderr


def test_generator_qlora_trains_over_a_4bit_base(tiny_lm64_path: Path, tmp_path: Path) -> None:
    """Reflection tokens added, base loaded in 4 bits (bitsandbytes' CPU backend), LoRA over it."""
    pytest.importorskip("bitsandbytes")
    run = _train(tmp_path, tiny_lm64_path, "selfrag", GEN_ROWS, "--quantize", "4bit")
    losses = _losses(run)
    assert losses[-1] < losses[0], losses
    assert (run / "final" / "model" / "adapter_model.safetensors").exists()
    from ragkit.archs.selfrag.loading import load_causal_lm
    from ragkit.archs.selfrag.tokens import reflection_ids

    model, tok = load_causal_lm(str(run / "final"), device="cpu")
    assert len(reflection_ids(tok).ids) > 0 and model.get_input_embeddings().weight.shape[0] == len(tok)
    # Self-RAG decoding over the 4-bit base with the adapter on top (not merged into rounded weights)
    quantised, _ = load_causal_lm(str(run / "final"), device="cpu", merge_lora=True, quantize="4bit")
    assert "Linear4bit" in {type(m).__name__ for m in quantised.modules()}
    assert any("lora" in name for name, _ in quantised.named_parameters())
    result = CliRunner().invoke(app, ["generate", "--arch", "selfrag", "--model", str(run / "final"), "--quantize", "4bit",
                                      "--mode", "no_retrieval", "--max-new-tokens", "4", "--device", "cpu"],
                                input="who was the king of france\n")
    assert result.exit_code == 0, result.stderr
    assert "output" in json.loads(result.stdout.splitlines()[0])


def test_qlora_needs_lora(tiny_lm_path: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", GEN_ROWS)
    base = ["train", "--arch", "selfrag", "--data", str(data), "--generator", str(tiny_lm_path), "-o", str(tmp_path / "r"),
            "--max-steps", "1", "--device", "cpu", "--quantize", "4bit"]
    full = CliRunner().invoke(app, [*base, "--lora-r", "0"])
    assert full.exit_code == 2 and "QLoRA" in full.stderr
