"""Stage `report`: reports/report.html (self-contained) and report.md comparing the models."""

import _bootstrap  # noqa: F401  (puts this checkout's src/ first on sys.path)

import logging

from imgclf import champion_record, cli, runlog, tracking
from imgclf.config import MlflowConfig, ReportConfig, load_section, model_names, read_params
from imgclf.paths import METRICS_DIR, PROCESSED_DIR, REPORTS_DIR
from imgclf.report import build_report, load_inputs
from imgclf.schema import ModelFiles

log = logging.getLogger("report")


def main() -> None:
    params = read_params()
    cfg = load_section("report", ReportConfig, params)
    mlflow_cfg = load_section("mlflow", MlflowConfig, params)
    experiment = mlflow_cfg.experiment
    names = model_names(params)
    inputs = load_inputs(names, PROCESSED_DIR, METRICS_DIR)
    experiment_id = tracking.setup(experiment)
    runs = runlog.runs_of(experiment_id, {n: ModelFiles.of(n).checkpoint for n in names})
    links = {n: f"run {r.info.run_id} in experiment {experiment!r}" if r else None for n, r in runs.items()}
    registered = runs.get(mlflow_cfg.register_model or "")
    decision = champion_record.recorded(mlflow_cfg.registered_name, registered.info.run_id) if registered else None
    build_report(inputs, cfg, links, decision).write(REPORTS_DIR)
    runlog.attach_report(runs, REPORTS_DIR)
    log.info("wrote %s", REPORTS_DIR / "report.html")


if __name__ == "__main__":
    cli.run(main)
