"""``--model`` is checked on the driver before Ray starts: a folder that holds no model, or a hub
name that cannot be had (offline), is one line naming it and what is missing, exit status 2."""
import re

import pytest

from gloss_ray import cli


def _one_error_line(capsys, *args) -> str:
    code = cli.main(["train", "--benchmark", "mr", *args])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if not re.match(r"^(\x1b\[\d+m)?\(", ln)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gloss-ray: error: --model: "), err
    assert "[gloss-ray] run" not in out                  # no Train run was started
    return lines[0]


def test_a_model_folder_without_a_model_is_one_line_naming_the_folder_and_what_is_missing(tmp_path, capsys,
                                                                                       data_dir):
    (tmp_path / "README.md").write_text("not a model\n")
    err = _one_error_line(capsys, "--model", str(tmp_path))
    assert str(tmp_path) in err and "no config.json" in err and "no weights" in err and "no tokenizer files" in err


def test_a_model_folder_without_tokenizer_files_names_them(tiny_model_dir, tmp_path, capsys, data_dir):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "special*"))
    err = _one_error_line(capsys, "--model", str(folder))
    assert "no tokenizer files" in err and "config.json" not in err.split("(")[0]


def test_a_hub_name_offline_is_one_line(monkeypatch, capsys, data_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _one_error_line(capsys, "--model", "gloss-ray-tests/no-such-model")
    assert "gloss-ray-tests/no-such-model" in err and "offline" in err.lower()


@pytest.mark.parametrize("name", [None, "tiny"])
def test_real_model_folders_pass_the_check(name, tiny_model_dir):
    from gloss_ray.model import check_model, resolve_model_path

    path = tiny_model_dir if name == "tiny" else name
    assert check_model(path) == resolve_model_path(path)
