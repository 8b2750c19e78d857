"""Bad configuration and input at the door: every case fails before any stage trains (nothing is
written to the run folder), with exit code 2, no traceback, and a message that says what is
wrong and where (file:line, the binding, the stage, close matches). The CLI's own `run` command
runs in this process (typer's runner; a subprocess costs ~25 s of imports here); that a real
`cmkd run` process exits with 2 and no traceback on such errors is checked in test_resume.py
(the refused restart of a stage stopped part-way)."""

from __future__ import annotations

import re
from pathlib import Path

import gin
import pytest
from faultkit import flat
from helpers import TINY_AST, write_gin

pytestmark = [pytest.mark.timeout(300)]

BASE = TINY_AST + """
experiment.name = 'door'
train.dataset = @datasets.synthetic
datasets.synthetic.num_classes = 3
datasets.synthetic.train_samples = 8
datasets.synthetic.eval_samples = 4
datasets.synthetic.clip_seconds = 0.5
train.batch_size = 4
"""
KD = """
experiment.stages = ['teacher', 'student']
student/train.strategy = @strategies.logit_kd
strategies.logit_kd.teacher = 'teacher'
"""


def _cli(tmp_path: Path, text: str, *binds: str, name: str = "exp.gin", device: str = "cpu"):
    """`cmkd run` through the CLI's own code path (typer), in this process."""
    from typer.testing import CliRunner

    from cmkd.cli import app

    path = write_gin(tmp_path / name, text)
    with gin.unlock_config():
        gin.clear_config()
    args = ["run", path, "--run-dir", str(tmp_path / "runs"), "--device", device]
    for b in binds:
        args += ["-b", b]
    try:
        result = CliRunner().invoke(app, args)
    finally:
        with gin.unlock_config():
            gin.clear_config()
    return result, path


def _line(path: str, needle: str) -> int:
    return next(i for i, line in enumerate(Path(path).read_text().splitlines(), 1) if needle in line)


CASES = {
    # name: (gin text, binds, [regexes the message must match]) — {file}/{line:needle} are filled in.
    "syntax typo": (BASE + "train.epochs = = 3\n", (), [r"Unable to parse value\. \(exp\.gin, line {line:= = 3}\)"]),
    "unknown component": (BASE + "train.dataset = @datasets.synthetc\n", (),
                          [r"\({file}:{line:synthetc}\)\. Did you mean: @datasets\.synthetic\?"]),
    "unknown parameter": (BASE + "train.epoch = 3\n", (), [r"named 'epoch' \({file}:{line:epoch = 3}\)\. "
                                                            r"Did you mean 'epochs'\?"]),
    "unknown parameter bound": (BASE, ("train.epoch = 3",), [r"in --bind 'train\.epoch = 3': Configurable 'train' "
                                                              r"doesn't have a parameter named 'epoch'\. Did you mean "
                                                              r"'epochs'\?$"]),
    "not a literal": (BASE, ("train.epochs = three",), [r"Failed to parse token 'three' \(line 1\)\. Values are "
                                                         r"Python literals"]),
    "misspelt stage": (BASE + KD + "teacher/train.epochs = 1\n", ("experiment.stages = ['teachr', 'student']",),
                       [r"no binding is scoped to 'teachr' \(teachr/\.\.\.\).* did you mean 'teacher'\?"]),
    "name outside the run folder": (BASE, ("experiment.name = '../../escape'",),
                                    [r"experiment\.name: '\.\./\.\./escape' is not a folder name"]),
    "no synthetic clips": (BASE, ("datasets.synthetic.train_samples = 0",),
                           [r"^error: datasets\.synthetic\.train_samples = 0: must be an integer >= 1$"]),
    "a model's own assert": (BASE + "backbones.ast.num_heads = 5\n", (),
                             [r"stage 'main': its model cannot be built \(AssertionError\): .*divisible"]),
    "unclosed bracket": (BASE + "experiment.stages = ['main'\n", (), [r"{file} .*open bracket or string"]),
    "string for an int": (BASE, ("train.epochs = 'three'",),
                          [r"train\.epochs = 'three' \(stage 'main'\) must be an integer >= 1; "
                           r"set at --bind \"train\.epochs = 'three'\""]),
    "float for an int": (BASE + "train.batch_size = 1.5\n", (),
                         [r"train\.batch_size = 1\.5 \(stage 'main'\) must be an integer >= 1; "
                          r"set at {file}:{line:1.5}"]),
    "optimizer type": (BASE + "optimizer.lr = 'fast'\n", (),
                       [r"optimizer\.lr = 'fast' \(stage 'main'\) must be a number > 0; set at {file}:{line:'fast'}"]),
    "missing dataset": (BASE + "train.dataset = @datasets.webdataset\ndatasets.webdataset.root = "
                               "'/nonexistent/cmkd-data'\n",
                        (), [r"/nonexistent/cmkd-data/dataset\.json: no dataset manifest here"]),
    "teacher listed after student": (BASE + KD.replace("['teacher', 'student']", "['student', 'teacher']"), (),
                                     [r"stage 'student' learns from stage 'teacher', which comes later in "
                                      r"experiment\.stages = \['student', 'teacher'\]; "
                                      r"list 'teacher' before 'student'"]),
    "misspelt teacher": (BASE + KD + "strategies.logit_kd.teacher = 'teachr'\n", (),
                         [r"stage 'student' names teacher 'teachr', which is not a stage .*did you mean 'teacher'\?"]),
    "classes differ": (BASE + KD + "student/datasets.synthetic.num_classes = 4\n", (),
                       [r"stage 'student' distils from stage 'teacher', but their datasets have different classes"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_fails_at_the_door(tmp_path, inprocess, case):
    text, binds, patterns = CASES[case]
    result, path = _cli(tmp_path, text, *binds)
    output = flat(result.output)
    assert result.exit_code == 2, f"{case}: exit {result.exit_code}: {output} {result.exception!r}"
    assert "Traceback" not in result.output and output.startswith("error:"), output
    output = result.output.strip()
    assert "\n" not in output, f"{case}: the error is one line, however long: {result.output}"
    for pattern in patterns:
        pattern = pattern.replace("{file}", re.escape(path))
        pattern = re.sub(r"\{line:([^}]*)\}", lambda m: str(_line(path, m.group(1))), pattern)
        assert re.search(pattern, output), f"{case}: /{pattern}/ not in: {output}"
    assert not (tmp_path / "runs").exists(), "nothing may be written (or trained) before the checks pass"


def test_a_teacher_checkpoint_with_other_classes_is_refused_at_the_door(tmp_path, inprocess):
    from cmkd.train import checkpoint

    teacher = tmp_path / "teacher.pt"
    checkpoint.save(str(teacher), {"classes": ["cat", "dog", "cow"], "model": {}})
    text = BASE + f"train.strategy = @strategies.logit_kd\nstrategies.logit_kd.teacher = '{teacher}'\n"
    result, _ = _cli(tmp_path, text)
    output = flat(result.output)
    assert result.exit_code == 2 and "Traceback" not in result.output, output
    assert f"teacher {teacher} was trained on classes ['cat', 'dog', 'cow']" in output
    assert "distil on the dataset the teacher was trained on" in output



def test_a_device_torch_does_not_know_is_refused_at_the_door(tmp_path, inprocess):
    result, _ = _cli(tmp_path, BASE, device="banana")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip() == "error: --device 'banana' is not a device; use auto, cpu, cuda or cuda:N"
    assert not (tmp_path / "runs").exists()
