"""A real Airflow notifier for the tests: writes what it was told to a file (a deployment names
Slack's, SMTP's or any other ``BaseNotifier`` in the same Variable)."""

from __future__ import annotations

import json

from airflow.sdk import BaseNotifier


class FileNotifier(BaseNotifier):
    template_fields = ("path",)

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def notify(self, context) -> None:
        run = context["dag_run"]
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"dag_id": run.dag_id, "run_id": run.run_id}) + "\n")
