"""``gloss-ray predict`` / ``embed`` from the command line: what they print and when they refuse."""
import re

import pytest

from gloss_ray import cli


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> str:
    from gloss_ray.model import TextClassifier, load_tokenizer

    out = tmp_path_factory.mktemp("saved_model")
    TextClassifier.from_encoder(tiny_model_dir, 2).save_pretrained(out, load_tokenizer(tiny_model_dir), ["neg", "pos"])
    return str(out)


@pytest.mark.parametrize("command", ["predict", "embed"])
@pytest.mark.parametrize("name, content, message", [("texts.txt", "", "no data rows (the file is empty)"),
                                                     ("texts.csv", "text\n", "no data rows"),
                                                     ("texts.csv", "", "no data rows (the file is empty)")])
def test_an_empty_input_file_is_one_line_and_writes_nothing(model_dir, tmp_path, capfd, command, name, content,
                                                            message):
    """The messages of the reader that training uses too (gloss_ray.data.read_texts)."""
    (tmp_path / name).write_text(content)
    out_file = tmp_path / ("out.csv" if command == "predict" else "out.npy")
    code = cli.main([command, "--model-dir", model_dir, "--input", str(tmp_path / name), "--output", str(out_file)])
    err = capfd.readouterr().err.strip()
    assert code == 2 and err == f"gloss-ray: error: {tmp_path / name}: {message}"
    assert not out_file.exists()


@pytest.mark.parametrize("command", ["predict", "embed"])
def test_a_long_input_shows_progress_and_no_weight_loading_bars(model_dir, tmp_path, capfd, command):
    (tmp_path / "t.txt").write_text("".join(f"film number {i} was fine\n" for i in range(10)))
    capfd.readouterr()
    out_file = tmp_path / ("out.csv" if command == "predict" else "out.npy")
    assert cli.main([command, "--model-dir", model_dir, "--input", str(tmp_path / "t.txt"), "--output",
                     str(out_file), "--batch-size", "4"]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err
    assert re.search(rf"{command}: 100%.*10/10", err), err
