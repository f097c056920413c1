"""Input that must not be taken as it stands. Values that no JSON reader but Python's accepts never go in or out (issue 27.7): numbers beyond float64
(1e400 came back from `index search` as Infinity), a passage score "nan", --bm25-k1 inf (written into the
manifest as Infinity); and JSON that Python reads but ragkit cannot keep is exit 3 naming file, line and field,
not exit 1: a line nested 100,000 deep (RecursionError), lone surrogates in an id, a text or a question."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_passages, run_cli


def corpus_with(tmp_path: Path, bad_line: str) -> Path:
    import json

    good = [json.dumps(p) for p in make_passages(3)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join([good[0], good[1], bad_line, good[2]]) + "\n")
    return path


@pytest.mark.parametrize(("line", "message"), [
    ('{"id": "x", "text": "t", "views": 1e400}', r"c.jsonl:3: 1e400 is beyond a float64's range"),
    ('{"id": "x\\ud800", "text": "t"}', r"c.jsonl:3: field 'id': holds a lone surrogate"),
    ('{"id": "x", "text": "a \\udfff b"}', r"c.jsonl:3: field 'text': holds a lone surrogate"),
    ('{"id": "x", "text": "t", "meta": {"tags": ["ok", "\\ud83d"]}}', r"field 'meta.tags\[1\]': holds a lone"),
    ('{"id": "x", "text": "t", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}", r"c.jsonl:3: JSON nested too deeply"),
])
def test_bad_corpus_values_are_exit_3_naming_the_line(tmp_path: Path, tiny_encoder_path: Path, line: str,
                                                      message: str) -> None:
    import re

    result = run_cli("index", "build", corpus_with(tmp_path, line), "-o", tmp_path / "idx", "-m", tiny_encoder_path,
                     "--device", "cpu")
    assert result.exit_code == 3, (result.exit_code, result.stderr[-1500:])
    assert re.search(message, result.stderr), result.stderr


def test_generate_input_lone_surrogate_exit_3(tmp_path: Path, tiny_lm_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "1", "question": "who \\ud800 wrote it"}\n')
    result = run_cli("generate", questions, "-m", tiny_lm_path, "--device", "cpu")
    assert result.exit_code == 3 and "q.jsonl:1: field 'question': holds a lone surrogate" in result.stderr, result.stderr


def test_passage_scores_that_are_not_finite_are_dropped() -> None:
    from ragkit.io.passages import passage_json

    for score in ("nan", "1e999", "-inf", float("nan")):
        assert passage_json({"id": "a", "text": "t", "score": score})["score"] is None
    assert passage_json({"id": "a", "text": "t", "score": "0.5"})["score"] == 0.5


def test_bm25_parameters_must_be_finite(tmp_path: Path, tiny_encoder_path: Path) -> None:
    import json

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in make_passages(5)))
    for flag, value in (("--bm25-k1", "inf"), ("--bm25-b", "nan")):
        result = run_cli("index", "build", corpus, "-o", tmp_path / "idx", "-m", tiny_encoder_path, "--sparse",
                         flag, value, "--device", "cpu")
        assert result.exit_code == 2, (flag, result.stderr)
        assert not (tmp_path / "idx" / "CURRENT").exists()


# -- TSV corpora (issue 27.5, 27.6) -------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "message"), [
    # an unbalanced quote swallowed the next rows: 1 of 3 passages stored, exit 0
    ('1\t"Aaron was a prophet\tAaron\n2\tMoses led the people"\tMoses\n3\tMiriam sang\tMiriam\n',
     r"c.tsv:1: a double quote opened on this line is closed only on line 2"),
    ('1\tAaron was a prophet\tAaron\n2\t"Moses led\tMoses\n', r"c.tsv:2: unreadable TSV row"),
    # a header of names ragkit does not know was stored as a passage
    ("identifier\tbody\theading\n1\tAaron was a prophet\tAaron\n", r"c.tsv:1: the first row looks like a header"),
])
def test_tsv_rows_never_merge_and_unknown_headers_are_refused(tmp_path: Path, tiny_encoder_path: Path, content: str,
                                                              message: str) -> None:
    import re

    corpus = tmp_path / "c.tsv"
    corpus.write_text(content)
    result = run_cli("index", "build", corpus, "-o", tmp_path / "idx", "-m", tiny_encoder_path, "--device", "cpu")
    assert result.exit_code == 3, (result.exit_code, result.stderr[-1500:])
    assert re.search(message, result.stderr), result.stderr


def test_dpr_quoting_still_reads(tmp_path: Path) -> None:
    """psgs_w100.tsv quotes its texts and doubles the quotes inside them."""
    from ragkit.io.corpus import iter_passages

    corpus = tmp_path / "psgs.tsv"
    corpus.write_text('id\ttext\ttitle\n1\t"Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\n2\tplain text\tB\n'
                      'doc7\tParis\tCity\n')
    passages = list(iter_passages(corpus))
    assert [p.text for p in passages] == ['Aaron ( or ; "Ahärôn") is a prophet', "plain text", "Paris"]


# -- model folders (issue 27.11) ----------------------------------------------------------------------------
def test_a_weights_file_carrying_a_pickle_payload_is_exit_4_and_never_runs(tmp_path: Path) -> None:
    import os
    import shutil

    import torch

    from conftest import build_tiny_encoder

    bert = build_tiny_encoder(tmp_path / "model") .parent / "bert"
    for weights in bert.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Payload()}, bert / "pytorch_model.bin")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "1", "text": "hello world"}\n')
    result = run_cli("index", "build", corpus, "-o", tmp_path / "idx", "-m", bert, "--device", "cpu")
    assert result.exit_code == 4, (result.exit_code, result.stderr[-1500:])  # was 1: "internal error: UnpicklingError"
    assert "holds pickled objects beyond plain tensors" in result.stderr and not marker.exists()


def test_a_config_naming_its_own_code_is_said_when_that_code_is_not_run(tmp_path: Path, tiny_encoder_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import shutil

    from ragkit.models.registry import say_if_own_code_is_ignored

    folder = tmp_path / "model"
    shutil.copytree(tiny_encoder_path.parent / "bert", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_x.XModel"}}))
    say_if_own_code_is_ignored(str(folder), trust_remote_code=False)
    assert "auto_map: AutoModel" in capsys.readouterr().err
    say_if_own_code_is_ignored(str(folder), trust_remote_code=True)
    say_if_own_code_is_ignored(str(tiny_encoder_path.parent / "bert"), trust_remote_code=False)
    assert capsys.readouterr().err == ""
