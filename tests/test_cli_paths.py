"""Output flags that name what cannot be written: one message, exit status 2, no traceback, nothing left on disk.

Every check runs before any work, so the commands' other arguments need not exist; the oracle is the
listing of the folder before and after.
"""

from pathlib import Path

import pytest

from moekit.cli.main import main


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def cases(d: Path) -> list[tuple[list[str], str]]:
    f, folder, ck = d / "afile", d / "adir", str(d / "no-run")
    return [
        (["train", "--preset", "tiny", "--out", f, "train.steps=1"], "is an existing file"),
        (["train", "--out", f, "--resume"], "is an existing file"),
        (["train", "--preset", "tiny", "--out", f / "run"], "is a file, not a directory"),
        (["train-forecaster", "--csv", "x.csv", "--out", f], "is an existing file"),
        (["distill", ck, "--student", "tiny", "--out", f], "is an existing file"),
        (["pregate", ck, "--out", f], "is an existing file"),
        (["convert", "--to", "hf", ck, f], "is an existing file"),
        (["convert", "--to", "gguf", ck, folder], "is a directory"),
        (["forecast", "--model", ck, "--csv", "x.csv", "--horizon", "3", "--out", folder], "is a directory"),
        (["forecast", "--model", ck, "--csv", "x.csv", "--horizon", "3", "--out", f / "x.csv"], "is a file"),
        (["forecast", "--model", ck, "--csv", "x.csv", "--horizon", "3", "--out", d / "o.csv", "--plot", folder],
         "--plot"),
        (["inspect", ck, "--heatmap", folder], "is a directory"),
        (["inspect", ck, "--batches", "-3"], "--batches -3 is invalid: it must be an integer >= 1"),
        (["inspect", ck, "--batches", "0"], "--batches 0 is invalid"),
        (["eval-forecast", "--model", ck, "--csv", "x.csv", "--out", folder], "is a directory"),
    ]


def test_unwritable_outputs_are_one_message_and_leave_nothing(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "adir").mkdir()
    before = listing(tmp_path)
    for argv, message in cases(tmp_path):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 2, (argv, err)
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert listing(tmp_path) == before, argv
    assert (tmp_path / "afile").read_text() == "keep me\n"


def test_a_read_only_folder_is_refused_before_the_work(tmp_path, capsys):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user writes anywhere (root)")
        code = main(["train", "--preset", "tiny", "--out", str(locked / "run")])
        err = capsys.readouterr().err
        assert code == 2 and "permission denied" in err and "Traceback" not in err
    finally:
        locked.chmod(0o700)
