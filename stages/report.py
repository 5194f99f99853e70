"""Stage `report`: reports/report.html (self-contained) and report.md comparing the models."""

import _bootstrap  # noqa: F401  (puts this checkout's src/ first on sys.path)

import logging

from imgclf import cli, tracking
from imgclf.atomic import atomic_dir, write_text
from imgclf.config import MlflowConfig, ReportConfig, load_section, model_names, read_params
from imgclf.paths import METRICS_DIR, PROCESSED_DIR, REPORTS_DIR, model_dir
from imgclf.report import build_report, load_inputs

log = logging.getLogger("report")


def main() -> None:
    params = read_params()
    cfg = load_section("report", ReportConfig, params)
    experiment = load_section("mlflow", MlflowConfig, params).experiment
    names = model_names(params)
    inputs = load_inputs(names, PROCESSED_DIR, METRICS_DIR)
    experiment_id = tracking.setup(experiment)
    runs = {n: tracking.find_run(experiment_id, tracking.file_sha256(model_dir(n) / "model.pt")) for n in names}
    links = {n: f"run {r.info.run_id} in experiment {experiment!r}" if r else None for n, r in runs.items()}
    report = build_report(inputs, cfg, links)

    with atomic_dir(REPORTS_DIR / "figures") as tmp:
        for file_name, png in report.figures.items():
            (tmp / file_name).write_bytes(png)
    write_text(REPORTS_DIR / "report.md", report.markdown)
    write_text(REPORTS_DIR / "report.html", report.html)

    import mlflow

    # The report belongs to every run it compares: attach it to each model's run.
    for name, run in runs.items():
        if run is None:
            log.warning("%s: no MLflow run found for its model file; report not attached", name)
            continue
        with mlflow.start_run(run_id=run.info.run_id):
            mlflow.log_artifact(str(REPORTS_DIR / "report.html"), artifact_path="report")
            mlflow.log_artifact(str(REPORTS_DIR / "report.md"), artifact_path="report")
            mlflow.log_artifacts(str(REPORTS_DIR / "figures"), artifact_path="report/figures")
    log.info("wrote %s", REPORTS_DIR / "report.html")


if __name__ == "__main__":
    cli.run(main)
