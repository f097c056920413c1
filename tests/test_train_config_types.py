"""A train config file's values are checked against the option's type (issue 27.8: `lr = "fast"` in a TOML
file reached the trainer and failed as a TypeError, exit 1). Like an unknown key or another architecture's key,
it is a usage error (exit 2, issue 27.9: unknown keys were exit 3, another architecture's exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragkit.errors import UsageError
from ragkit.train.config import load_config_file, resolve_config


@pytest.mark.parametrize("line, key", [
    ('lr = "fast"', "lr"),
    ("max_steps = 2.5", "max_steps"),
    ('max_steps = "10"', "max_steps"),
    ("lora_r = true", "lora_r"),  # a bool is not an integer here
    ("bf16 = 1", None),  # unknown key (the precision option is 'precision'): refused as before
    ("precision = 16", "precision"),
])
def test_a_value_of_the_wrong_type_is_an_input_error_naming_file_and_key(tmp_path: Path, line: str, key: str | None):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'arch = "rag"\n{line}\n')
    with pytest.raises(UsageError) as caught:
        resolve_config(cfg, {})
    assert caught.value.exit_code == 2  # as the same option given as a flag
    assert str(cfg) in str(caught.value)
    if key is not None:
        assert key in str(caught.value)


def test_right_types_pass_and_integers_are_numbers(tmp_path: Path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("arch: rag\nlr: 1\nmax_steps: 3\nlora_r: 0\ngpu_hour_price: 2\n")
    values = load_config_file(cfg)
    assert values == {"arch": "rag", "lr": 1, "max_steps": 3, "lora_r": 0, "gpu_hour_price": 2}
    config = resolve_config(cfg, {})
    assert config.lr == 1 and config.max_steps == 3


def test_null_is_taken_only_where_the_option_may_be_unset(tmp_path: Path):
    cfg = tmp_path / "run.json"
    cfg.write_text('{"arch": "rag", "lr": null}')
    assert load_config_file(cfg) == {"arch": "rag", "lr": None}
    cfg.write_text('{"arch": "rag", "max_steps": null}')
    with pytest.raises(UsageError, match="max_steps"):
        load_config_file(cfg)
