"""`cmkd teacher-logits --views K --student GIN --stage NAME`: the view settings read from the student stage's
config, so the store matches the replay run of that config by construction; a flag still overrides one."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import gin
import pytest
from helpers import TINY_AST, read_jsonl, write_gin
from typer.testing import CliRunner

from cmkd import components, config
from cmkd.cli import app

# The teacher and the student differ in what the store must match (scoped: student/...), and the student's
# batch size is a macro, as in the shipped recipes; num_workers comes from the dataset's own binding.
STUDENT_GIN = """
experiment.name = 'eq'
experiment.stages = ['teacher', 'student']
STUDENT_BATCH = 4
train.dataset = @datasets.synthetic
datasets.synthetic.num_classes = 4
datasets.synthetic.train_samples = 10
datasets.synthetic.eval_samples = 4
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.shard_size = 4
datasets.synthetic.num_workers = 0
train.epochs = 2
train.batch_size = 2
train.deterministic = True
train.log_every = 1
train.loggers = []
teacher/train.epochs = 1
student/train.batch_size = %STUDENT_BATCH
student/train.seed = 3
student/train.mixup = 0.5
student/train.freqm = 8
student/train.timem = 12
student/train.strategy = @strategies.replay_kd
"""


def _run(runs: Path, gin_file: str, *bindings: str) -> dict:
    from cmkd.experiment import run_experiment
    from cmkd.train.distributed import DistEnv

    gin.clear_config()
    components.load_all()
    try:
        return run_experiment(str(runs), config.parse([gin_file], bindings), DistEnv())
    finally:
        gin.clear_config()


def _views(teacher: Path, data: Path, out: Path, *extra: str):
    args = ["teacher-logits", str(teacher), str(data), "--views", "2", "--device", "cpu", "--output", str(out), *extra]
    return CliRunner().invoke(app, args, terminal_width=300)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The student's gin file (replaying from ``store``) and its trained teacher stage."""
    tmp = tmp_path_factory.mktemp("student")
    data, runs, store = tmp / "data", tmp / "runs", tmp / "store"
    gin_file = write_gin(tmp / "student.gin", TINY_AST, STUDENT_GIN, f"datasets.synthetic.root = '{data}'",
                         f"strategies.replay_kd.store = '{store}'")
    _run(runs, gin_file, "experiment.stages = ['teacher']")
    return dict(tmp=tmp, data=data, runs=runs, store=store, gin=gin_file, teacher=runs / "eq" / "teacher")


def test_a_store_made_from_the_student_config_is_accepted_by_its_replay_run(made: dict, tmp_path: Path) -> None:
    res = _views(made["teacher"], made["data"], made["store"], "--student", made["gin"], "--stage", "student")
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())  # rich wraps long lines
    gin_file = re.escape(made["gin"])
    assert f"view settings (stage 'student' of {made['gin']})" in said
    lines = Path(made["gin"]).read_text().splitlines()
    for setting, binding in (("seed = 3", "student/train.seed"), ("batch_size = 4", "student/train.batch_size"),
                             ("mixup = 0.5", "student/train.mixup"), ("freqm = 8", "student/train.freqm"),
                             ("timem = 12", "student/train.timem"),
                             ("num_workers = 0", "datasets.synthetic.num_workers")):
        line = next(n for n, text in enumerate(lines, 1) if text.startswith(binding + " ="))
        assert re.search(rf"{setting} \({gin_file}:{line}[,)]", said), (setting, said)
    # a macro-bound setting names the line that uses the macro and the line that gives the value
    macro = next(n for n, text in enumerate(lines, 1) if text.startswith("STUDENT_BATCH ="))
    assert re.search(rf"batch_size = 4 \({gin_file}:\d+, %STUDENT_BATCH bound at {gin_file}:{macro}\)", said), said
    assert "world_size = 1 (default of --world-size)" in said
    assert "mixup_alpha = 10.0 (default of train.mixup_alpha)" in said

    runs = tmp_path / "runs"
    shutil.copytree(made["teacher"], runs / "eq" / "teacher")
    _run(runs, made["gin"])  # the very config the store was made from: it replays, no flag retyped
    steps = read_jsonl(runs / "eq" / "student" / "steps.jsonl")
    assert len(steps) == 6 and all(r["loss_kd"] > 0 and r["kd_skipped"] == 0 for r in steps)  # 2 epochs x 3 steps


def test_a_flag_overrides_the_config_and_the_replay_run_names_what_differs(made: dict, tmp_path: Path) -> None:
    from cmkd.distill.view_store import ViewStoreError

    other = tmp_path / "freqm4"
    res = _views(made["teacher"], made["data"], other, "--student", made["gin"], "--freqm", "4")  # stage: the last
    assert res.exit_code == 0, res.output
    assert "freqm = 4 (--freqm)" in " ".join(res.output.split())
    runs = tmp_path / "runs"
    shutil.copytree(made["teacher"], runs / "eq" / "teacher")
    with pytest.raises(ViewStoreError, match=r"made for other settings than this run — freqm: store 4, run 8\. "):
        _run(runs, made["gin"], f"strategies.replay_kd.store = '{other}'")
    assert not (runs / "eq" / "student" / "checkpoints").exists()


def test_a_run_folder_is_read_by_the_saved_config_rules(made: dict, tmp_path: Path) -> None:
    """A stage folder's config.gin (the whole experiment's: the teacher ran alone, the student's settings are
    bound in its scope) is data: read, and refused once it imports a module nobody trusted."""
    res = _views(made["teacher"], made["data"], tmp_path / "a", "--student", str(made["teacher"]), "--stage",
                 "student", "-b", "student/train.timem = 10", "--num-workers", "0")
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert f"view settings (stage 'student' of {made['teacher'] / 'config.gin'})" in said
    assert "freqm = 8" in said and "timem = 10 (--bind 'student/train.timem = 10')" in said
    res = _views(made["teacher"], made["data"], tmp_path / "macro", "--student", str(made["teacher"]), "--stage",
                 "student", "-b", "STUDENT_BATCH = 2", "--num-workers", "0")
    assert res.exit_code == 0, res.output
    assert "%STUDENT_BATCH bound at --bind 'STUDENT_BATCH = 2')" in " ".join(res.output.split())

    edited = tmp_path / "edited"
    shutil.copytree(made["teacher"], edited)
    saved = (edited / "config.gin").read_text()
    (edited / "config.gin").write_text("import helpers_nobody_trusts\n" + saved)
    res = _views(made["teacher"], made["data"], tmp_path / "b", "--student", str(edited))
    flat = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in flat, res.output
    assert "refused line 1: 'import helpers_nobody_trusts': module 'helpers_nobody_trusts' is not" in flat
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("extra, says", [
    (["--student", "no/such.gin"], "gin file 'no/such.gin' not found"),
    (["--student", "{gin}", "--stage", "studnet"], "--stage 'studnet': {gin} has no such stage; experiment.stages = "
                                                  "['teacher', 'student'] (did you mean 'student'?)"),
    (["--stage", "student"], "give --student GIN_OR_RECIPE too"),
    (["--student", "{gin}", "-b", "student/train.freqm = 'x'"], "train.freqm = 'x' (stage 'student') must be"),
    # the replay run would refuse the store only after the teacher scored it all (ViewStore.check_epochs)
    (["--student", "{gin}", "-b", "student/train.epochs = 3"], "--views 2: stage 'student' of {gin} trains 3 epochs "
     "(train.epochs, --bind 'student/train.epochs = 3') and its replay run refuses a store with fewer views than "
     "epochs; pass --views 3, or bind strategies.replay_kd.cycle = True for that stage"),
    # a teacher's run folder ran with experiment.stages = ['teacher']: its last stage is the teacher's own
    (["--student", "{teacher}"], "--student {teacher}/config.gin: stage 'teacher' is the teacher's own stage"),
    (["--student", "{teacher}"], "pass --stage <student stage>"),
])
def test_bad_input_is_one_error_line(made: dict, tmp_path: Path, extra: list[str], says: str) -> None:
    names = dict(gin=made["gin"], teacher=made["teacher"])
    res = _views(made["teacher"], made["data"], tmp_path / "views", *[e.format(**names) for e in extra])
    flat = " ".join(res.output.split())
    assert res.exit_code == 2 and flat.count("error:") == 1 and "Traceback" not in flat, res.output
    assert says.format(**names) in flat, res.output
    assert not (tmp_path / "views").exists()


def test_the_stage_epochs_and_replay_cycle_are_read(made: dict) -> None:
    from cmkd.commands import view_flags
    from cmkd.train.read_stage import read_view_settings

    components.load_all()
    read = read_view_settings([made["gin"]], ["student/train.epochs = 5"], "student")
    assert (read.epochs.value, read.cycle.value, read.experiment) == (5, False, "eq")
    with pytest.raises(ValueError, match=r"pass --views 5, or bind strategies\.replay_kd\.cycle = True"):
        view_flags.check_views(4, read)
    view_flags.check_views(5, read)
    cycled = read_view_settings([made["gin"]], ["student/train.epochs = 5", "strategies.replay_kd.cycle = True"])
    assert cycled.cycle.value is True
    view_flags.check_views(2, cycled)  # epoch e replays view e mod 2: the run accepts the store
    assert gin.config_str() == ""


def test_student_without_views_is_refused(made: dict) -> None:
    res = CliRunner().invoke(app, ["teacher-logits", str(made["teacher"]), str(made["data"]), "--student",
                                   made["gin"]], terminal_width=300)
    assert res.exit_code == 2 and "without --views nothing uses them" in " ".join(res.output.split()), res.output


@pytest.mark.parametrize("extra, said", [
    (["--freqm", "4"], "--freqm: these set up --views K"),  # a view setting without --views
    (["--topk", "5", "--seed", "1"], "--seed, --topk: these set up --views K"),
    (["--views", "2", "--split", "eval"], "--split: not used with --views K"),  # a clean-logits option with --views
    (["--views", "2", "--amp"], "--amp: not used with --views K"),
])
def test_an_option_the_mode_does_not_use_is_refused(made: dict, extra: list, said: str) -> None:
    res = CliRunner().invoke(app, ["teacher-logits", str(made["teacher"]), str(made["data"]), *extra],
                             terminal_width=300)
    assert res.exit_code == 2 and said in " ".join(res.output.split()), res.output
    assert not (Path(made["data"]) / "teacher_logits").exists() or "--views" in extra  # refused before scoring


def test_the_docs_show_what_the_command_prints_for_the_shipped_recipe() -> None:
    """docs/distillation.md shows step 2's settings for gin/fsd50k/cnn_to_ast.gin: the same lines as read now."""
    from docs_examples import ROOT, blocks

    from cmkd.commands import view_flags

    page = blocks(ROOT / "docs" / "distillation.md")
    shown = next(b.code for b in page
                 if b.lang == "text" and b.code.startswith("view settings (stage 'student' of gin/fsd50k/"))
    step2 = next(b.code for b in page if b.lang == "bash" and "--student gin/fsd50k/cnn_to_ast.gin" in b.code)
    views = int(re.search(r"--views (\d+)", step2).group(1))
    components.load_all()
    _, lines, read = view_flags.resolve(dict(world_size=4), ["gin/fsd50k/cnn_to_ast.gin"],
                                        ["DATA_ROOT='s3://bucket/fsd50k'"], "student", views=views)
    assert shown.splitlines() == lines
    assert views == read.epochs.value  # K = the student stage's epochs: its replay run accepts the store
    assert gin.config_str() == ""  # the caller's (empty) config is back
