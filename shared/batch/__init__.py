"""The batch run's steps as plain functions (SPEC §6): recompute, reconcile, data-quality
checks and the report. The DAG and ``candlekeep reconcile`` are thin shells around them."""
