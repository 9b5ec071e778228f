"""The streaming worker and the trade feeds: Kafka in and out; PostgreSQL
through ``shared.store`` (SPEC §4, §5)."""
