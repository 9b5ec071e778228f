"""The streaming worker and the trade feeds: Kafka in and out, PostgreSQL sink (SPEC §4, §5)."""
