"""Trade feeds: produce canonical trade messages to Kafka."""
