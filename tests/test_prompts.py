"""Prompt files: .txt (one prompt a line, '#' comments) and .json (a list of strings), the bundled
general set, and broken files refused at validation with one line naming the node and the file."""
import json

import pytest

from solrl_core.run import main
from solrl_core.train.prompts import load_prompts


def test_txt_file_is_one_prompt_a_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\n\n  a red circle  \n\ta blue square\n# the end\nthree green triangles", "utf-8")
    assert load_prompts(str(path)) == ["a red circle", "a blue square", "three green triangles"]


def test_json_file_is_a_list_of_strings(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["  a red circle ", "", "a caf\u00e9 sign"]), "utf-8")
    assert load_prompts(str(path)) == ["a red circle", "a caf\u00e9 sign"]


def test_bundled_general_prompts_from_any_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found beside the bundled workflows, as their Prompt Set names it
    prompts = load_prompts("prompts/general.txt")
    # The file: 21 lines, the first a comment.
    assert len(prompts) == len(set(prompts)) == 20
    assert prompts[0] == "a red fox sitting in fresh snow at sunrise"
    assert prompts[-1] == "a koi pond seen from above with lily pads"
    assert not any(p.startswith("#") for p in prompts)


def _prompt_set_workflow(tmp_path, source: str):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps({
        "1": {"class_type": "SolRLPromptSet", "inputs": {"source": source}},
        "2": {"class_type": "SolRLLogMetric", "inputs": {"name": "x", "value": 1.0}},
    }))
    return path


@pytest.mark.parametrize("name, content, fragment", [
    ("missing.txt", None, "not found"),
    ("truncated.json", '["a red circle", ', "invalid JSON at line 1"),
    ("object.json", '{"prompts": ["a red circle"]}', "expected a JSON list of strings"),
    ("numbers.json", '["a red circle", 3]', "expected a JSON list of strings"),
    ("only_comments.txt", "# nothing yet\n\n", "has no prompts"),
    ("empty_list.json", "[]", "has no prompts"),
    ("latin1.txt", b"caf\xe9 au lait\n", "not UTF-8"),
])
def test_broken_prompt_file_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, name, content, fragment):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, "utf-8")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([str(_prompt_set_workflow(tmp_path, str(path))), "--run-dir", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "node 1 (SolRLPromptSet): input 'source'" in err and name in err and fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*before, "wf.json"})  # nothing written
