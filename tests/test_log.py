"""gloss_ray.log, gloss-ray's one way of printing a line: the prefix and stream, redaction, rank 0 only."""
import io
import sys

from gloss_ray.log import fail, for_rank, say

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"
URI = f"s3://AKIDEXAMPLE:{SECRET}@bucket"


def test_say_prints_one_prefixed_line_on_stdout_or_on_the_file_given(capsys):
    say("epoch 1: loss 0.5")
    assert capsys.readouterr() == ("[gloss-ray] epoch 1: loss 0.5\n", "")
    say("mr: fetched MR/test.csv (1.0 kB)", file=sys.stderr)
    assert capsys.readouterr() == ("", "[gloss-ray] mr: fetched MR/test.csv (1.0 kB)\n")


def test_every_line_has_the_credentials_of_its_uris_redacted(capfd):
    say(f"run r: outputs -> {URI}/runs/r")
    for_rank(0)(f"done: outputs in {URI}/runs/r")
    fail(f"error: {URI}/data/nope.csv: file or folder not found")
    out, err = capfd.readouterr()
    assert out.splitlines() == ["[gloss-ray] run r: outputs -> s3://***@bucket/runs/r",
                                "[gloss-ray] done: outputs in s3://***@bucket/runs/r"]
    assert err == "gloss-ray: error: s3://***@bucket/data/nope.csv: file or folder not found\n"


def test_rank_0_says_on_the_process_stdout_and_the_other_ranks_say_nothing(capfd, monkeypatch):
    teed = io.StringIO()            # what Ray Train V2 puts in place of sys.stdout (a tee into its logger)
    monkeypatch.setattr(sys, "stdout", teed)
    for rank in (0, 1, 3):
        for_rank(rank)(f"epoch 1 on rank {rank}")
    monkeypatch.undo()
    assert capfd.readouterr() == ("[gloss-ray] epoch 1 on rank 0\n", "")
    assert teed.getvalue() == ""
