"""`ragkit prune`: structured layer dropping and magnitude pruning of a generator, saved as a plain
Hugging Face folder that transformers loads and generates with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_causal_lm, run_cli


@pytest.fixture(scope="module")
def deep_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with 4 layers, so that dropping every other one leaves 2."""
    from transformers import AutoModelForCausalLM

    folder = build_tiny_causal_lm(tmp_path_factory.mktemp("deep"), hidden=32)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.num_hidden_layers = 4
    deeper = AutoModelForCausalLM.from_config(model.config)
    torch.manual_seed(0)
    deeper.save_pretrained(folder)
    return folder


def test_keep_every_drops_layers_and_the_model_matches_a_hand_built_one(deep_lm: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "half"
    result = run_cli("prune", deep_lm, "--keep-every", 2, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["layers_before"], report["layers_after"]) == (4, 2) and report["params_after"] < report["params_before"]
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    assert pruned.config.num_hidden_layers == 2
    full = AutoModelForCausalLM.from_pretrained(deep_lm).eval()
    by_hand = torch.nn.ModuleList([full.model.layers[0], full.model.layers[2]])
    full.model.layers = by_hand
    for i, layer in enumerate(full.model.layers):
        layer.self_attn.layer_idx = i
    full.config.num_hidden_layers = 2
    ids = torch.tensor([[2, 5, 6, 7]])
    torch.testing.assert_close(pruned(ids).logits, full(ids).logits)
    generated = pruned.generate(ids, max_new_tokens=3, do_sample=False)  # the KV cache follows the new indices
    assert generated.shape[1] == 7
    again = run_cli("prune", deep_lm, "--keep-layers", "0,3", "-o", tmp_path / "ends", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["layers_after"] == 2


@pytest.mark.parametrize("method", ["l1-unstructured", "ln-structured"])
def test_magnitude_pruning_zeroes_that_share_of_the_layer_weights(deep_lm: Path, tmp_path: Path, method: str) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    result = run_cli("prune", deep_lm, "--sparsity", "0.5", "--method", method, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["sparsity"] == pytest.approx(0.5, abs=0.02)
    model = AutoModelForCausalLM.from_pretrained(out)
    weights = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    zero = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zero == pytest.approx(0.5, abs=0.02)  # saved, not only masked
    if method == "ln-structured":  # whole output rows
        assert any(bool((w == 0).all(dim=1).any()) for w in weights)
    original = AutoModelForCausalLM.from_pretrained(deep_lm)
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)  # embeddings untouched


def test_prune_refusals(deep_lm: Path, tmp_path: Path) -> None:
    cases = [(["--keep-layers", "0,9"], "0-3"), (["--sparsity", "1.0"], "[0, 1)"), ([], "nothing to prune"),
             (["--keep-every", 2, "--keep-layers", "0"], "give one"), (["--method", "random", "--sparsity", "0.1"], "--method")]
    for extra, message in cases:
        result = run_cli("prune", deep_lm, *extra, "-o", tmp_path / "x")
        assert result.exit_code == 2 and message in result.stderr, (extra, result.stderr)
        assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert run_cli("prune", deep_lm, "--keep-every", 2, "-o", tmp_path / "full").exit_code == 2
