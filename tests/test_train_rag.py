"""The trainer with --arch rag on tiny models: loss falls, gradients reach the query encoder, exact
resume, LoRA, plain-library checkpoints, config files and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkit.cli import app

from conftest import make_passages, run_torchrun, write_jsonl

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_path: Path, tiny_lm_path: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rag")
    corpus = write_jsonl(root / "corpus.jsonl", make_passages(30))
    assert run("index", "build", corpus, "-o", root / "idx", "--model", tiny_encoder_path, "--device", "cpu").exit_code == 0
    data = write_jsonl(root / "train.jsonl", [{"question": f"river king {i}", "answers": ["city music"]} for i in range(8)])
    return {"root": root, "index": root / "idx", "data": data, "lm": tiny_lm_path}


def base_args(setup: dict[str, Path], output: Path, *extra: object) -> list[object]:
    return ["train", "--arch", "rag", "--data", setup["data"], "--index", setup["index"], "--generator", setup["lm"],
            "-o", output, "--n-docs", 3, "--batch-size", 2, "--lr", "1e-2", "--logging-steps", 1, "--device", "cpu",
            "--json", *extra]


def losses(output: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("loss", ["sequence", "token"])
def test_loss_falls_and_checkpoints_open_with_plain_libraries(setup: dict[str, Path], tmp_path: Path, loss: str) -> None:
    out = tmp_path / "run"
    result = run(*base_args(setup, out, "--max-steps", 8, "--save-steps", 4, "--loss", loss))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"] == 8 and report["trainable_params"] == report["total_params"] > 0
    seen = losses(out)
    assert seen[8] < seen[1] * 0.8, seen
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-8" / "generator")
    assert model.config.num_hidden_layers == 2
    assert SentenceTransformer(str(out / "checkpoint-8" / "query_encoder"), device="cpu").encode(["x"]).shape == (1, 32)
    assert json.loads((out / "checkpoint-8" / "ragkit_train_config.json").read_text())["loss"] == loss


def test_query_encoder_receives_gradient(setup: dict[str, Path]) -> None:
    from ragkit.archs.rag.model import RagModelConfig, build_rag

    model = build_rag(RagModelConfig(generator=str(setup["lm"]), index=str(setup["index"]), n_docs=3))
    out = model(["river king 1", "city music 2"], ["city", "music"])
    out["loss"].backward()
    grads = [p.grad for p in model.query_encoder.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum().item() for g in grads) > 0
    assert out["doc_scores"].shape == (2, 3)


def test_resume_reproduces_the_uninterrupted_losses(setup: dict[str, Path], tmp_path: Path) -> None:
    full = tmp_path / "full"
    assert run(*base_args(setup, full, "--max-steps", 6, "--save-steps", 3)).exit_code == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    result = run(*base_args(setup, resumed, "--max-steps", 6, "--save-steps", 3, "--resume"))
    assert result.exit_code == 0, result.stderr
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)


def test_lora_trains_an_adapter_peft_can_load(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "lora"
    result = run(*base_args(setup, out, "--max-steps", 2, "--save-steps", 2, "--lora-r", 4, "--freeze-query-encoder"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert 0 < report["trainable_params"] < report["total_params"] // 2
    adapter = out / "checkpoint-2" / "generator"
    assert (adapter / "adapter_model.safetensors").exists()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["lm"]), adapter)
    assert any("lora" in name for name, _ in peft_model.named_parameters())


def test_qlora_trains_adapters_over_a_4bit_generator(setup: dict[str, Path], tmp_path: Path, tiny_lm64_path: Path) -> None:
    """QLoRA through the one trainer, on bitsandbytes' CPU backend (the same code path as on a GPU)."""
    pytest.importorskip("bitsandbytes")
    runs = {}
    for name, extra in {"lora": [], "qlora": ["--quantize", "4bit"]}.items():
        out = tmp_path / name
        args = ["train", "--arch", "rag", "--data", setup["data"], "--index", setup["index"], "--generator", tiny_lm64_path,
                "-o", out, "--n-docs", 2, "--batch-size", 2, "--lr", "1e-2", "--logging-steps", 1, "--device", "cpu",
                "--json", "--max-steps", 4, "--save-steps", 4, "--lora-r", 4, "--freeze-query-encoder", *extra]
        result = run(*args)
        assert result.exit_code == 0, result.stderr
        runs[name] = (json.loads(result.stdout), losses(out), out)
    (lora, _, _), (qlora, seen, out) = runs["lora"], runs["qlora"]
    assert seen[4] < seen[1], seen
    # same model, same adapters: packed 4-bit weights still count as the parameters they hold
    assert (qlora["trainable_params"], qlora["total_params"]) == (lora["trainable_params"], lora["total_params"])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = out / "checkpoint-4" / "generator"
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm64_path), adapter).merge_and_unload()
    assert merged.config.hidden_size == 64
    # the checkpoint answers with its adapter over 4-bit weights, or merged and then int8-quantised
    for bits in ("4bit", "int8"):
        result = runner.invoke(app, ["generate", "--arch", "rag", "--model", str(out / "checkpoint-4"), "--quantize", bits,
                                     "--max-new-tokens", "3", "--device", "cpu"], input="river king 3\n")
        assert result.exit_code == 0, result.stderr
        row = json.loads(result.stdout)
        assert len(row["passages"]) == 2 and row["log_prob"] <= 0.0


def test_two_torchrun_processes_on_cpu_share_the_data_and_report_once(setup: dict[str, Path], tmp_path: Path) -> None:
    """The multi-process path (torchrun ranks, DDP over gloo) the same code takes on many GPUs."""
    out = tmp_path / "ddp"
    done = run_torchrun(base_args(setup, out, "--max-steps", 4, "--save-steps", 4))
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(reports) == 1, done.stdout  # rank 0 alone prints
    report = reports[0]
    assert report["processes"] == 2
    assert report["examples_per_s"] * report["wall_s"] == pytest.approx(4 * 2 * 2)  # steps x batch x ranks
    assert json.loads((out / "cost_report.json").read_text())["processes"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # one log line per step, not one per rank
    assert logged[-1]["epoch"] == pytest.approx(2.0)  # 8 questions, 2 per rank per step: the ranks split them
    assert logged[-1]["loss"] < logged[0]["loss"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "final" / "generator").config.num_hidden_layers == 2


def test_seq2seq_generator_trains(setup: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(setup["lm"])
    config = BartConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=512,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        decoder_start_token_id=tok.eos_token_id, forced_bos_token_id=None)
    bart = tmp_path / "bart"
    BartForConditionalGeneration(config).save_pretrained(bart)
    tok.save_pretrained(bart)
    out = tmp_path / "run"
    args = base_args(setup, out, "--max-steps", 6, "--save-steps", 6)
    args[args.index("--generator") + 1] = bart
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    seen = losses(out)
    assert seen[6] < seen[1]


def test_config_file_flags_win_and_unknown_keys_fail(setup: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'arch = "rag"\ndata = "{setup["data"]}"\nindex = "{setup["index"]}"\ngenerator = "{setup["lm"]}"\n'
                   f'output = "{tmp_path / "out"}"\nn_docs = 2\nmax_steps = 1\ndevice = "cpu"\nbatch_size = 2\n')
    result = run("train", "--config", cfg, "--max-steps", 2, "--json")
    assert result.exit_code == 0, result.stderr
    saved = json.loads((tmp_path / "out" / "ragkit_train_config.json").read_text())
    assert saved["max_steps"] == 2 and saved["n_docs"] == 2
    cfg.write_text('arch = "rag"\nlearning_rate = 3\n')
    result = run("train", "--config", cfg)
    assert result.exit_code == 2 and "key 'learning_rate': unknown key" in result.stderr


def test_bad_training_input(setup: dict[str, Path], tmp_path: Path, other_tiny_encoder_path: Path, wide_tiny_encoder_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "train.source").write_text("q one\nq two\n")
    (hf / "train.target").write_text("a one\n\n")
    args = base_args(setup, tmp_path / "o", "--max-steps", 1)
    args[args.index("--data") + 1] = hf
    result = run(*args)
    assert result.exit_code == 3 and "train.target:2: missing target" in result.stderr

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args[args.index("--data") + 1] = empty
    assert run(*args).exit_code == 3

    args[args.index("--data") + 1] = setup["data"]
    result = run(*args, "--query-encoder", wide_tiny_encoder_path)
    assert result.exit_code == 4 and "dimension" in result.stderr
    result = run(*args, "--n-docs", 99)
    assert result.exit_code == 4 and "fewer than the 99" in result.stderr


def test_sharded_training_options_pass_through_or_fail_clearly(setup: dict[str, Path], tmp_path: Path) -> None:
    import importlib.util

    from ragkit.train.config import TrainConfig
    from ragkit.train.trainer import training_arguments

    fsdp_file = tmp_path / "fsdp.json"
    fsdp_file.write_text(json.dumps({"version": 2, "cpu_offload": True}))
    args = training_arguments(TrainConfig(output=str(tmp_path / "o"), fsdp=True, fsdp_config=str(fsdp_file)), use_cpu=True)
    assert args.fsdp and args.fsdp_config["cpu_offload"] is True  # reaches transformers.Trainer as given
    base = base_args(setup, tmp_path / "r", "--max-steps", 1)
    result = run(*base, "--fsdp-config", fsdp_file)
    assert result.exit_code == 2 and "--fsdp-config needs --fsdp" in result.stderr
    result = run(*base, "--fsdp", "--deepspeed", fsdp_file)
    assert result.exit_code == 2 and "pick one" in result.stderr
    result = run(*base, "--deepspeed", tmp_path / "missing.json")
    assert result.exit_code == 4 and "missing.json" in result.stderr
    a_list = tmp_path / "list.json"
    a_list.write_text("[2]")
    result = run(*base, "--deepspeed", a_list)
    assert result.exit_code == 3 and "expected an object" in result.stderr
    not_json = tmp_path / "ds.json"
    not_json.write_text("{stage: 2")
    result = run(*base, "--deepspeed", not_json)
    assert result.exit_code == 3 and "ds.json" in result.stderr and "not a DeepSpeed JSON config" in result.stderr
    if importlib.util.find_spec("deepspeed") is None:
        result = run(*base, "--deepspeed", fsdp_file)
        assert result.exit_code == 4 and "pip install deepspeed" in result.stderr
    result = run(*base, "--fsdp")  # transformers raises a bare ValueError in one process
    assert result.exit_code == 2 and "launch with torchrun" in result.stderr


def test_json_stdout_stays_clean_when_a_library_prints(setup: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed logs and reports op builds on stdout; `train --json` must still print only its report."""
    from ragkit.archs.rag.training import RagArch

    build = RagArch.build

    def noisy_build(self, config, device):
        print("[INFO] a library talking on stdout")
        return build(self, config, device)

    monkeypatch.setattr(RagArch, "build", noisy_build)
    result = run(*base_args(setup, tmp_path / "r", "--max-steps", 1))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 1
    assert "a library talking on stdout" in result.stderr


def deepspeed_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}}


@pytest.mark.slow
def test_deepspeed_zero_stages_reach_the_weights_ddp_reaches(setup: dict[str, Path], tmp_path: Path) -> None:
    """DeepSpeed ZeRO-2 and ZeRO-3 on two CPU ranks (DeepSpeed's CPU accelerator; its first run compiles a
    communication op for minutes) against plain DDP: same losses, same adapter, the frozen query encoder
    saved whole (ZeRO-3 gathers it), and a ZeRO-3 resume that continues the losses. Seen passing with
    deepspeed 0.19.8."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    lora = ["--max-steps", 4, "--save-steps", 2, "--lora-r", 4, "--lora-dropout", 0, "--freeze-query-encoder"]
    runs = {}
    for name in ("ddp", "zero2", "zero3"):
        extra: list[object] = []
        if name != "ddp":
            config = tmp_path / f"{name}.json"
            config.write_text(json.dumps(deepspeed_config(int(name[-1]))))
            extra = ["--deepspeed", config]
        out = tmp_path / name
        done = run_torchrun(base_args(setup, out, *lora, *extra), timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout)["processes"] == 2
        runs[name] = out
    for name in ("zero2", "zero3"):
        for step, loss in losses(runs["ddp"]).items():
            assert losses(runs[name])[step] == pytest.approx(loss, rel=1e-5), (name, step)
        for part in ("generator/adapter_model.safetensors", "query_encoder/model.safetensors"):
            ours, ddp = load_file(runs[name] / "final" / part), load_file(runs["ddp"] / "final" / part)
            assert ours.keys() == ddp.keys() and ours
            for key in ddp:
                assert ours[key].shape == ddp[key].shape
                torch_close = (ours[key].float() - ddp[key].float()).abs().max().item()
                assert torch_close < 1e-4, (name, part, key, torch_close)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(runs["zero3"] / "checkpoint-2", resumed / "checkpoint-2")
    done = run_torchrun(base_args(setup, resumed, *lora, "--deepspeed", tmp_path / "zero3.json", "--resume"), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    again, first = losses(resumed), losses(runs["zero3"])
    assert sorted(again) == [3, 4] and all(again[s] == pytest.approx(first[s], rel=1e-5) for s in (3, 4))


FSDP_SAVE_SCRIPT = """
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import set_seed

from ragkit.archs.rag.model import RagModelConfig, build_rag
from ragkit.archs.rag.training import RagArch
from ragkit.models.lm import LoraSettings
from ragkit.train.trainer import fsdp_full_parameters

lm, index, out = sys.argv[1:4]
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
set_seed(0)
model = build_rag(RagModelConfig(generator=lm, index=index, n_docs=2),
                  lora=LoraSettings(r=4, alpha=8, dropout=0.0))
arch = RagArch()
if dist.get_rank() == 0:
    arch.save(model, Path(out) / "plain")
for module in list(model.modules()):
    if type(module).__name__ in model._no_split_modules:
        fully_shard(module, mesh=mesh)
fully_shard(model, mesh=mesh)
assert any(type(p).__name__ == "DTensor" for p in model.parameters())
with fsdp_full_parameters(model):
    if dist.get_rank() == 0:
        arch.save(model, Path(out) / "sharded")
assert all(type(p).__name__ == "DTensor" for p in model.parameters())
loss = model(questions=["river king 1", "city music"], answers=["city music", "river"])["loss"]
loss.backward()  # the shards are back in place and still train
print("ok", float(loss))
dist.destroy_process_group()
"""


def test_fsdp_checkpoints_hold_the_full_weights(setup: dict[str, Path], tmp_path: Path) -> None:
    """FSDP2 on two CPU ranks (gloo): saving through the architecture while sharded writes the same files
    as saving the unsharded model (Trainer cannot run FSDP on the CPU; this is ragkit's part of it)."""
    from safetensors.torch import load_file

    script = tmp_path / "fsdp_save.py"
    script.write_text(FSDP_SAVE_SCRIPT)
    done = run_torchrun([setup["lm"], setup["index"], tmp_path], script=script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok") == 2
    for part in ("generator/adapter_model.safetensors", "query_encoder/model.safetensors"):
        plain, sharded = load_file(tmp_path / "plain" / part), load_file(tmp_path / "sharded" / part)
        assert plain.keys() == sharded.keys() and plain
        for key in plain:
            assert plain[key].equal(sharded[key]), (part, key)


def test_fsdp_wraps_the_generator_and_encoder_layers(setup: dict[str, Path]) -> None:
    from ragkit.archs.rag.model import RagModelConfig, build_rag
    from ragkit.models.lm import LoraSettings

    model = build_rag(RagModelConfig(generator=str(setup["lm"]), index=str(setup["index"]), n_docs=2),
                      lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    assert {"LlamaDecoderLayer", "BertLayer"} <= set(model._no_split_modules)


def test_end2end_refuses_several_processes(setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: every rank would rewrite the same index
    result = run(*base_args(setup, tmp_path / "e2e", "--max-steps", 1, "--end2end"))
    assert result.exit_code == 2 and "one process" in result.stderr


def test_unknown_arch_is_a_usage_error() -> None:
    result = run("train", "--arch", "nonsense", "--data", "x", "-o", "y")
    assert result.exit_code == 2


@pytest.fixture(scope="module")
def trained(setup: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    result = run(*base_args(setup, out, "--max-steps", 4, "--save-steps", 4))
    assert result.exit_code == 0, result.stderr
    return out / "checkpoint-4"


def test_trained_checkpoints_refuse_options_their_decoding_ignores(trained: Path) -> None:
    for extra in (["--do-sample"], ["--temperature", "0.7"], ["--template", "{prompt}"], ["--backend", "vllm"]):
        result = runner.invoke(app, ["generate", "--arch", "rag", "--model", str(trained), "--device", "cpu", *extra],
                               input="river king 3\n")
        assert result.exit_code == 2 and f"{extra[0]}" in result.stderr and "not used by a trained RAG" in result.stderr


@pytest.mark.parametrize("mode", ["token", "token-beam", "sequence-thorough", "sequence-fast"])
def test_generate_loads_a_trained_checkpoint(trained: Path, mode: str) -> None:
    result = runner.invoke(app, ["generate", "--arch", "rag", "--model", str(trained), "--rag-decoding", mode,
                                 "--max-new-tokens", "4", "--device", "cpu"], input="river king 3\ncity music\n")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(len(r["passages"]) == 3 for r in rows)
    assert sum(p["doc_prob"] for p in rows[0]["passages"]) == pytest.approx(1.0, abs=1e-5)
    assert isinstance(rows[0]["output"], str) and rows[0]["log_prob"] <= 0.0


def test_k_decides_the_passages_a_trained_checkpoint_marginalises_over(trained: Path) -> None:
    """14.3: `--k 1` on a trained checkpoint exited 0 and returned its 3 training passages."""
    result = runner.invoke(app, ["generate", "--arch", "rag", "--model", str(trained), "--k", "1",
                                 "--max-new-tokens", "2", "--device", "cpu"], input="river king 3\n")
    assert result.exit_code == 0, result.stderr
    [row] = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(row["passages"]) == 1 and row["passages"][0]["doc_prob"] == pytest.approx(1.0)


def test_decoding_modes_agree_with_their_definitions(trained: Path) -> None:
    from ragkit.archs.rag.decoding import decode, load_rag_checkpoint

    rag = load_rag_checkpoint(trained)
    thorough = decode(rag, ["river king 3"], mode="sequence-thorough", max_new_tokens=4)[0]
    fast = decode(rag, ["river king 3"], mode="sequence-fast", max_new_tokens=4)[0]
    assert thorough.log_prob >= fast.log_prob - 1e-5  # summing over every passage can only add mass
    # with one passage, RAG-Token greedy is plain greedy decoding of that passage's prompt
    rag.config.n_docs = 1
    token = decode(rag, ["river king 3"], mode="token", max_new_tokens=4)[0]
    hits, _ = rag.retrieve(["river king 3"])
    prompt = rag._prompts(["river king 3"], hits)[0]
    ids = rag.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    plain = rag.generator.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=rag.tokenizer.pad_token_id)
    expected = rag.tokenizer.decode(plain[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert token.text == expected
    # one step: the beam's best hypothesis is the mixture's argmax token, as greedy's
    rag.config.n_docs = 3
    one_greedy = decode(rag, ["river king 3"], mode="token", max_new_tokens=1)[0]
    one_beam = decode(rag, ["river king 3"], mode="token-beam", max_new_tokens=1, num_beams=3)[0]
    assert one_beam.text == one_greedy.text
    wide = decode(rag, ["river king 3"], mode="token-beam", max_new_tokens=4, num_beams=4)[0]
    assert wide.log_prob <= 0.0 and len(rag.tokenizer(wide.text, add_special_tokens=False)["input_ids"]) <= 4


def test_end2end_trains_the_doc_encoder_and_refreshes_its_own_index(setup: dict[str, Path], tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from ragkit.index import Index
    from ragkit.models.encoder import weights_fingerprint

    original = Index.open(setup["index"]).info()
    out = tmp_path / "e2e"
    result = run(*base_args(setup, out, "--max-steps", 4, "--save-steps", 4, "--end2end", "--refresh-steps", 2,
                            "--refresh-shards", 2))
    assert result.exit_code == 0, result.stderr
    assert Index.open(setup["index"]).info()["version"] == original["version"]  # the user's index is untouched
    own = Index.open(out / "index")
    assert own.info()["version"] == original["version"] + 2  # refreshed at steps 2 and 4, half the passages each
    assert own.manifest["end2end"] == {"step": 4, "slice": "2/2"} and len(own) == original["passages"]
    doc = SentenceTransformer(str(out / "checkpoint-4" / "doc_encoder"), device="cpu")
    query = SentenceTransformer(str(out / "checkpoint-4" / "query_encoder"), device="cpu")
    assert weights_fingerprint(doc) != original["fingerprint"]  # the document encoder trained
    assert weights_fingerprint(doc) == own.encoder.fingerprint  # the last refresh used its final weights
    assert weights_fingerprint(query) != weights_fingerprint(doc)
    # resume continues on the run's own refreshed index
    again = run(*base_args(setup, out, "--max-steps", 6, "--save-steps", 2, "--end2end", "--refresh-steps", 2,
                           "--refresh-shards", 2), "--resume")
    assert again.exit_code == 0, again.stderr
    assert Index.open(out / "index").manifest["end2end"] == {"step": 6, "slice": "1/2"}
    bad = run(*base_args(setup, tmp_path / "x", "--end2end", "--distributed-retriever", "ray"))
    assert bad.exit_code == 2 and "--end2end" in bad.stderr


def test_the_seeds_optimiser_and_dropout_flags_reach_the_run(setup: dict[str, Path], tmp_path: Path) -> None:
    """finetune_rag.py's --warmup_ratio, --adam_epsilon, --attention_dropout (and ragkit's dashed spellings):
    the schedule warms up over that share of the steps, AdamW gets that epsilon, the generator that dropout."""
    import torch
    from transformers import AutoConfig

    out = tmp_path / "run"
    result = run(*base_args(setup, out, "--max-steps", 8, "--save-steps", 8, "--warmup_ratio", "0.5",
                            "--adam_epsilon", "1e-6", "--attention_dropout", "0.25"))
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["learning_rate"] for r in rows if "learning_rate" in r}
    # linear warmup over 4 of 8 steps to the peak 1e-2 (the rate logged at step s is the one step s used: 0 at
    # step 1), then linear decay; without warmup step 1 would run at the peak
    assert [rates[s] for s in (1, 2, 3, 5)] == pytest.approx([0.0, 1e-2 / 4, 1e-2 / 2, 1e-2]), rates
    assert rates[8] < rates[6] < rates[5]
    optimizer = torch.load(out / "checkpoint-8" / "optimizer.pt", weights_only=True)
    assert {g["eps"] for g in optimizer["param_groups"]} == {1e-6}
    assert AutoConfig.from_pretrained(out / "checkpoint-8" / "generator").attention_dropout == 0.25
    # Llama has no hidden dropout: refused, not stored unused
    refused = run(*base_args(setup, tmp_path / "r2", "--max-steps", 1, "--dropout", "0.1"))
    assert refused.exit_code == 2 and "--dropout" in refused.stderr and "no dropout field" in refused.stderr
    both = run(*base_args(setup, tmp_path / "r3", "--warmup-ratio", "0.1", "--warmup-steps", "2"))
    assert both.exit_code == 2 and "give one" in both.stderr


def test_profile_reports_retrieval_time_per_step(setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--profile: retrieval seconds per step and their share of the step in metrics.jsonl and the cost report.
    Checked against a search made slower by a known 50 ms: it shows up as >= 50 ms per step."""
    import time

    from ragkit.index import Index

    real = Index.search_with_vectors

    def slow(self, queries, k):  # noqa: ANN001
        time.sleep(0.05)
        return real(self, queries, k)

    monkeypatch.setattr(Index, "search_with_vectors", slow)
    out = tmp_path / "run"
    result = run(*base_args(setup, out, "--max-steps", 4, "--save-steps", 4, "--logging-steps", 2, "--profile"))
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "retrieval_s" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(0.05 <= r["retrieval_s"] < 1.0 and 0 < r["retrieval_share"] < 1 for r in logged), logged
    report = json.loads((out / "cost_report.json").read_text())
    assert report["retrieval_s"] >= 4 * 0.05 and 0 < report["retrieval_share"] < 1
    plain = tmp_path / "plain"
    assert run(*base_args(setup, plain, "--max-steps", 2, "--save-steps", 2)).exit_code == 0
    assert json.loads((plain / "cost_report.json").read_text())["retrieval_s"] is None
    assert not any("retrieval_s" in json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines())


def test_validation_while_training_logs_the_metric_and_keeps_the_best_checkpoint(setup: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    """--eval-data decoded every --eval-steps: eval_em / eval_f1 / eval_match in metrics.jsonl, equal to
    what `generate --arch rag` answers with that step's checkpoint; the best checkpoint survives rotation
    (--save-total-limit 1) and is named in the cost report."""
    from ragkit.eval.tasks import get_task, load_examples

    val = write_jsonl(tmp_path / "val.jsonl", [{"id": f"v{i}", "question": f"river king {i}",
                                                "answers": ["unreachable zebra"]} for i in range(3)])
    out = tmp_path / "run"
    result = run(*base_args(setup, out, "--max-steps", 6, "--save-steps", 2, "--save-total-limit", 1, "--loss", "token",
                            "--eval-data", val, "--eval-steps", 2, "--eval-max-new-tokens", 4, "--n_val", 3))
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval_em" in r}
    assert sorted(evals) == [2, 4, 6] and all(r["eval_n"] == 3 for r in evals.values())
    assert all(0 <= r[m] <= 1 for r in evals.values() for m in ("eval_em", "eval_f1", "eval_match"))
    # no answer can match, so every step ties and the first stays the best: kept although not the newest
    report = json.loads(result.stdout)
    assert report["best_checkpoint"] == str(out / "checkpoint-2") and report["best_metric"] == {"eval_em": 0.0}
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-6").is_dir() and not (out / "checkpoint-4").exists()
    # the logged validation is what the checkpoint answers (answers it can reach: the training answers)
    reachable = write_jsonl(tmp_path / "reach.jsonl", [{"id": f"v{i}", "question": f"river king {i}",
                                                        "answers": ["city music"]} for i in range(3)])
    out2 = tmp_path / "run2"
    result = run(*base_args(setup, out2, "--max-steps", 4, "--save-steps", 4, "--loss", "token",
                            "--eval-data", reachable, "--eval-steps", 4, "--eval-max-new-tokens", 4))
    assert result.exit_code == 0, result.stderr
    logged = next(json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines() if "eval_f1" in line)
    generated = run("generate", reachable, "--arch", "rag", "-m", out2 / "checkpoint-4", "--rag-decoding", "token",
                    "--max-new-tokens", 4, "--device", "cpu")
    assert generated.exit_code == 0, generated.stderr
    examples = load_examples(get_task("qa"), reachable)
    outputs = [json.loads(line)["output"] for line in generated.stdout.splitlines()]
    scores = [get_task("qa").score(e, o) for e, o in zip(examples, outputs)]
    assert logged["eval_f1"] == pytest.approx(sum(s["f1"] for s in scores) / 3) and logged["eval_f1"] > 0, outputs
    assert logged["eval_em"] == pytest.approx(sum(s["em"] for s in scores) / 3)
    refused = run(*base_args(setup, tmp_path / "r", "--eval-metric", "bleu", "--eval-data", val))
    assert refused.exit_code == 2 and "--eval-metric bleu" in refused.stderr
    # --predict-data (finetune_rag's --do_predict): the final model answers the test set after training
    out3 = tmp_path / "run3"
    result = run(*base_args(setup, out3, "--max-steps", 4, "--save-steps", 4, "--loss", "token",
                            "--predict-data", reachable, "--test_max_target_length", 4))
    assert result.exit_code == 0, result.stderr
    predicted = [json.loads(line) for line in (out3 / "test_predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predicted] == ["v0", "v1", "v2"] and all(len(p["passage_ids"]) == 3 for p in predicted)
    final = run("generate", reachable, "--arch", "rag", "-m", out3 / "final", "--rag-decoding", "token",
                "--max-new-tokens", 4, "--device", "cpu")
    assert [p["output"] for p in predicted] == [json.loads(line)["output"] for line in final.stdout.splitlines()]
    report = json.loads(result.stdout)
    assert report["test_metrics"]["f1"] == pytest.approx(sum(p["f1"] for p in predicted) / 3)


def test_passage_weighted_kl_by_hand() -> None:
    import torch

    from ragkit.archs.rag.model import passage_weighted_kl

    torch.manual_seed(0)
    student, teacher = torch.randn(4, 3, 7), torch.randn(4, 3, 7)  # 2 questions x 2 passages, 3 tokens, vocab 7
    target = torch.tensor([[1, 2, -100], [3, -100, -100]])
    assert float(passage_weighted_kl(student, student, target, torch.zeros(2, 2), 2.0)) == pytest.approx(0.0, abs=1e-6)
    # all belief on the first passage: only rows 0 and 2 count, each over its labelled tokens
    scores = torch.tensor([[50.0, -50.0], [50.0, -50.0]])
    t, s = torch.log_softmax(teacher / 2, -1), torch.log_softmax(student / 2, -1)
    kl = (t.exp() * (t - s)).sum(-1)
    expected = (kl[0, :2].mean() + kl[2, :1].mean()) / 2 * 4
    assert float(passage_weighted_kl(student, teacher, target, scores, 2.0)) == pytest.approx(float(expected), rel=1e-5)


def test_rag_distillation_pulls_the_generator_to_the_teacher(setup: dict[str, Path], tmp_path: Path,
                                                            tiny_selfrag_path: Path) -> None:
    """--distill-from TEACHER --distill-alpha 0: the loss is the passage-weighted KL to the teacher's token
    distribution, and it falls; a teacher of another vocabulary is refused (exit 4)."""
    from conftest import build_tiny_causal_lm

    teacher = build_tiny_causal_lm(tmp_path / "teacher", seed=5)
    out = tmp_path / "run"
    result = run(*base_args(setup, out, "--max-steps", 8, "--save-steps", 8, "--distill-from", teacher,
                            "--distill-alpha", "0", "--distill-temperature", "1"))
    assert result.exit_code == 0, result.stderr
    seen = losses(out)
    assert seen[8] < 0.8 * seen[1], seen
    assert not any("teacher" in p.name for p in (out / "final").rglob("*"))  # never saved
    refused = run(*base_args(setup, tmp_path / "r", "--max-steps", 1, "--distill-from", tiny_selfrag_path))
    assert refused.exit_code == 4 and "vocabulary" in refused.stderr
