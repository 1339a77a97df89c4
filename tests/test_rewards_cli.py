"""`tulu verify`: one JSON line per input; bad lines exit non-zero naming the file and line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tulu_pipeline.cli import main
from tulu_pipeline.settings import repo_root


def _write(tmp_path, lines, name="in.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
                    encoding="utf-8")
    return path


def _run(capsys, *argv):
    code = main(["verify", *argv])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines() if line.strip()], captured.err


def test_gsm8k_file(tmp_path, capsys):
    path = _write(tmp_path, [
        {"id": "a", "response": "The answer is $1,000.", "ground_truth": "#### 1,000"},
        {"id": 2, "response": "So 7.", "ground_truth": 8},
        "",
    ])
    code, rows, _ = _run(capsys, "--task", "gsm8k", "--input", str(path))
    assert code == 0
    assert [(r["id"], r["ok"], r["score"]) for r in rows] == [("a", True, 1.0), (2, False, 0.0)]
    assert set(rows[0]) == {"id", "score", "ok", "reason"}
    assert "expected 8" in rows[1]["reason"]


def test_math_file(tmp_path, capsys):
    path = _write(tmp_path, [{"id": 1, "response": r"so $\boxed{0.5}$", "ground_truth": r"\frac{1}{2}"}])
    code, rows, _ = _run(capsys, "--task", "math", "--input", str(path))
    assert code == 0 and rows[0]["ok"]


def test_ifeval_nested_and_top_level_constraints_strict_and_loose(tmp_path, capsys):
    constraints = {"instruction_id_list": ["startend:quotation", "punctuation:no_comma"], "kwargs": [{}, {}]}
    response = 'Sure here it is:\n"All wrapped up"'
    path = _write(tmp_path, [
        {"id": "nested", "response": response, "constraints": constraints},
        {"id": "top", "response": response, **constraints},
    ])
    code, strict, _ = _run(capsys, "--task", "ifeval", "--input", str(path))
    assert code == 0
    assert [r["score"] for r in strict] == [0.5, 0.5]
    assert "startend:quotation" in strict[0]["reason"]
    code, loose, _ = _run(capsys, "--task", "ifeval", "--input", str(path), "--mode", "loose")
    assert code == 0 and all(r["ok"] for r in loose)


@pytest.mark.parametrize("task, lines, message", [
    ("gsm8k", ['{"id": 1, "response": "1", "ground_truth": "1"}', "{not json"], ":2: invalid JSON"),
    ("gsm8k", [{"id": 1, "response": "1"}], ":1: missing field 'ground_truth'"),
    ("gsm8k", [{"response": "1", "ground_truth": "1"}], ":1: missing field 'id'"),
    ("gsm8k", [{"id": 1, "response": 5, "ground_truth": "1"}], ":1: 'response' must be a string"),
    ("gsm8k", [{"id": 1, "response": "1", "ground_truth": ["1"]}], ":1: 'ground_truth' must be a non-empty string"),
    ("gsm8k", [{"id": 1, "response": "1", "ground_truth": "none"}], ":1: gsm8k ground truth has no number"),
    ("gsm8k", ["[1, 2]"], ":1: expected a JSON object"),
    ("ifeval", [{"id": 1, "response": "x"}], ":1: missing field 'constraints'"),
    ("ifeval", [{"id": 1, "response": "x", "constraints": "no_comma"}], ":1: 'constraints' must be an object"),
    ("ifeval", [{"id": 1, "response": "x", "instruction_id_list": ["bogus:id"], "kwargs": [{}]}],
     ":1: unknown IFEval instruction id"),
])
def test_bad_lines_exit_nonzero_naming_file_and_line(tmp_path, capsys, task, lines, message):
    path = _write(tmp_path, lines)
    code, rows, err = _run(capsys, "--task", task, "--input", str(path))
    assert code != 0
    assert rows == []  # nothing printed for a file with a bad line
    assert str(path) + message in err


def test_missing_file_and_bad_task(tmp_path, capsys):
    code, _, err = _run(capsys, "--task", "gsm8k", "--input", str(tmp_path / "nope.jsonl"))
    assert code != 0 and "nope.jsonl" in err
    with pytest.raises(SystemExit):
        main(["verify", "--task", "code", "--input", "x.jsonl"])


def test_cli_process(tmp_path):
    path = _write(tmp_path, [{"id": 1, "response": "#### 3", "ground_truth": "3"}])
    result = subprocess.run([sys.executable, "-m", "tulu_pipeline.cli", "verify", "--task", "gsm8k",
                             "--input", str(path)], capture_output=True, text=True, cwd=repo_root(), timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True
