"""The DAG's failure notifier, named in Airflow rather than in code: the Airflow Variable
``candlekeep_failure_notifier`` holds ``{"class": "dotted.path.Notifier", "kwargs": {...}}``, any
``BaseNotifier`` (Slack, SMTP, a webhook: Airflow's providers). The DAG names no vendor, and an
operator changes who is told without a deploy (docs/airflow.md).

(This folder is also Airflow's plugins folder: a module without a DAG or a plugin is only imported.)
"""

from __future__ import annotations

import importlib
import logging

from airflow.sdk import Variable

VARIABLE = "candlekeep_failure_notifier"


def notify_failure(context, dag) -> None:
    """Call the configured notifier with the failed run's ``context``; none configured: log it.

    ``dag`` is the DAG object of the DAG file: ``dag.test()`` hands DAG callbacks the serialized
    DAG, which cannot render a notifier's templates, the file's own DAG can.
    """
    spec = Variable.get(VARIABLE, default=None, deserialize_json=True)
    if not spec:
        logging.getLogger(__name__).info("no %s Variable: nobody to notify", VARIABLE)
        return
    module, _, name = spec["class"].rpartition(".")
    notifier = getattr(importlib.import_module(module), name)(**spec.get("kwargs", {}))
    if not hasattr(context.get("dag"), "get_template_env"):
        context = {**context, "dag": dag}
    notifier(context)
