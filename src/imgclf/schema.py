"""Column layouts of the CSV files one stage writes and another reads (no heavy imports)."""

# metrics/<model>/history.csv: one row per epoch (train stage -> report, dvc plots).
HISTORY_COLUMNS = ("epoch", "lr", "train/loss", "train/accuracy", "val/loss", "val/accuracy")

# metrics/<model>/predictions.csv: one row per test image (evaluate stage -> report, dvc plots).
PREDICTION_COLUMNS = ("index", "actual", "predicted", "confidence")
