import pytest

from selfbudgeter import cli


def test_usage_lists_every_stage(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for name in cli.STAGES:
        assert f"  {name}" in out


@pytest.mark.parametrize("name", cli.STAGES)
def test_every_command_has_its_module_and_main(name):
    import importlib

    assert callable(importlib.import_module(cli.STAGES[name][0]).main)


def test_unknown_command_is_one_line(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'trian'" in err


def test_user_error_is_one_line_with_exit_2(capsys, tmp_path):
    assert cli.main(["build-sft", "--profile", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfbudgeter build-sft: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("rank, printed", [(None, True), ("0", True), ("1", False)])
def test_only_rank_zero_reports_under_a_multi_process_launch(capsys, monkeypatch, tmp_path, rank, printed):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert cli.main(["task", "--out", str(tmp_path), "--split", "test"]) == 0
    assert (tmp_path / "test.jsonl").exists()  # every rank does the work
    assert ("test: 400 rows" in capsys.readouterr().out) is printed
