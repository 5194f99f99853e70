"""Data: fetching (download), the IDX file format (idx), splitting and loading (dataset)."""
