"""The final table of `cmkd run`: each stage's role (teacher / student (KD) / same model, no KD), and
the demo's three stages that fill it."""

from __future__ import annotations

import gin

from cmkd import components, config
from cmkd.experiment import comparison_table, stage_roles

components.load_all()


def _summary(backbone: str, teachers: list[str], best: float, last: float) -> dict:
    return dict(backbone=backbone, params=1000, strategy="LogitKD" if teachers else "Supervised", metric="accuracy",
                best=dict(eval_accuracy=best, epoch=3), last=dict(eval_accuracy=last), seconds=1.0, teachers=teachers)


def test_roles_name_the_teacher_the_kd_student_and_its_baseline():
    summaries = {
        "teacher": _summary("EfficientNetBackbone", [], 0.9, 0.85),
        "student": _summary("AST", ["runs/demo/teacher/checkpoints/best.pt"], 0.7, 0.65),
        "ast_alone": _summary("AST", [], 0.6, 0.55),
        "other": _summary("Other", [], 0.1, 0.1),
    }
    assert stage_roles(summaries) == {"teacher": "teacher", "student": "student (KD)",
                                      "ast_alone": "same model, no KD", "other": ""}
    table = comparison_table("demo", summaries)
    assert [c.header for c in table.columns] == ["stage", "role", "model", "best", "epoch", "last", "time"]
    from rich.console import Console

    console = Console(width=80, record=True)
    console.print(table)
    text = console.export_text()
    for cell in ("ast_alone", "same model, no KD", "student (KD)", "EfficientNet 0.00 M", "0.5500"):
        assert cell in text.replace("\n", " ") or all(w in text for w in cell.split()), cell  # fits 80 columns


def test_demo_trains_the_students_model_alone_as_a_third_stage():
    try:
        config.parse(["demo.gin"])
        assert list(gin.query_parameter("experiment.stages")) == ["teacher", "student", "ast_alone"]
        q = gin.query_parameter
        assert q("ast_alone/classifier.backbone").selector == q("student/classifier.backbone").selector
        for param in ("classifier.pooler", "heads.linear.norm", "optimizer.lr", "train.batch_size"):
            assert q(f"ast_alone/{param}") == q(f"student/{param}"), param  # the student's settings
        assert q("student/train.strategy").selector == "strategies.logit_kd"
        assert "ast_alone/train.strategy" not in gin.config_str()  # trained without a teacher
    finally:
        gin.clear_config()
