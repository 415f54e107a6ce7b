"""The training CLI's first minute: every mistake is one line naming the field or file, all at once,
before anything runs; --mode=print_config shows the resolved config. Nothing here trains."""

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FINETUNE = "--config=configs/finetune.py:tiny"
PRETRAIN = "--config=configs/pretrain.py:tiny"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cope_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def assert_refused(result: subprocess.CompletedProcess, *expected: str, lines: int = 1) -> list[str]:
    errors = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(errors) == lines and all(line.startswith("error: ") for line in errors), result.stderr
    for text in expected:
        assert text in result.stderr, f"{text!r} not in {result.stderr!r}"
    assert result.stdout == ""
    return errors


@pytest.mark.parametrize("args, expected", [
    ([FINETUNE, "--config.batchsize=4"],
     ["--config.batchsize: no such field in configs/finetune.py:tiny (did you mean batch_size?)"]),
    ([FINETUNE, "--config.pretrain.totl_steps=3"], ["--config.pretrain.totl_steps", "did you mean pretrain.total_steps?"]),
    ([PRETRAIN, "--config.mesh.dat=2"], ["--config.mesh.dat: no such field in configs/pretrain.py:tiny",
                                         "did you mean mesh.data?"]),
    ([PRETRAIN, "--config.mesh.data.x=2"], ["--config.mesh.data.x: mesh.data is an int, not a group of fields"]),
    ([PRETRAIN, "--config.total_steps=abc"], ["--config.total_steps: expected an int, got 'abc'"]),
    ([PRETRAIN, "--config.learning_rate", "fast"], ["--config.learning_rate: expected a float, got 'fast'"]),
    ([PRETRAIN, "--config.mesh=4"], ["--config.mesh: a group of fields (data, fsdp, tensor)", "--config.mesh.data="]),
    ([FINETUNE, "--config.frozen=x"], ["--config.frozen: a list field cannot be set", "configs/finetune.py"]),
    (["--config=configs/finetune.py:huge"], ["configs/finetune.py:huge", "unknown variant 'huge'", "tiny", "paper"]),
    (["--config=configs/nope.py"], ["no config file configs/nope.py", "finetune.py, pretrain.py"]),
    (["--config=configs/pretrian.py:tiny"], ["no config file configs/pretrian.py (did you mean configs/pretrain.py?)"]),
    (["--config.batch_size=4"], ["--config.batch_size needs --config="]),
    ([FINETUNE, "--workdr=/tmp"], ["workdr", "Did you mean: workdir"]),
])
def test_a_mistake_is_one_line_and_nothing_runs(tmp_path, args, expected):
    workdir = tmp_path / "work"
    assert_refused(cli(*args, f"--workdir={workdir}"), *expected)
    assert not workdir.exists()


def test_a_config_file_that_raises_is_one_line_with_its_message_and_line(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("def get_config(variant='tiny'):\n    return undefined_name\n")
    assert_refused(cli(f"--config={config}:tiny", f"--workdir={tmp_path / 'work'}"),
                   f"--config={config}:tiny: NameError: name 'undefined_name' is not defined ({config} line 2)")


def test_every_bad_override_is_reported_in_one_run():
    errors = assert_refused(cli(FINETUNE, "--config.batchsize=4", "--config.total_steps=abc", "--config.mesh.dat=2",
                                "--config.batch_size=16", "--mode=print_config"), lines=3)
    assert [line.split(":")[1].strip() for line in errors] == ["--config.batchsize", "--config.total_steps",
                                                                "--config.mesh.dat"]


def test_print_config_shows_the_overridden_values_without_a_workdir(tmp_path):
    workdir = tmp_path / "work"
    result = cli(FINETUNE, "--mode=print_config", "--config.batch_size=4", "--config.mesh.data", "2",
                 "--config.pretrain.total_steps=7", "--config.time_instruction=duration", f"--workdir={workdir}")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("# configs/finetune.py:tiny, overridden: batch_size, mesh.data, pretrain.total_steps, "
                        "time_instruction")
    for line in ["batch_size: 4", "mesh.data: 2", "pretrain.total_steps: 7", "time_instruction: 'duration'",
                 "stage: 'finetune'", "length_buckets: (256, 384, 512)"]:
        assert line in lines
    assert not workdir.exists()


def test_training_needs_a_workdir_and_a_config():
    assert_refused(cli(PRETRAIN), "--workdir is required for --mode=train")
    assert_refused(cli("--workdir=/tmp/unused"), "--config is required")
