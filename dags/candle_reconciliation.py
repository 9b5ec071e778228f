"""candle_reconciliation: each hour's candles recomputed in batch and reconciled with the stream's.

Every hour of market data: wait until the stream's watermark has passed the hour (bounded),
recompute the hour's candles from the stored trades in SQL, classify every difference between
stream and batch (late trade, missing candle, unexplained), check the stored trades and the
candles against the venue itself (trade-id gaps, the venue's own candles), repair the gaps from
the venue (``CANDLEKEEP_REPAIR``), run the data-quality checks and publish the report. The work
is in ``shared.batch.batch_run``; this file only wires it up (SPEC §6).

A manual run names its period in params (``start``, ``end``); backfills use Airflow's own
``airflow backfill create``. Rerunning a period replaces its results.

Finality (SPEC §6.2): the wait is a sensor that frees its slot between looks; each run also
reconciles the periods marked stale since they were reconciled, sends the batch's corrections on
the ``candles`` topic and emits an asset event naming the periods it certified. A failed run
calls the notifier named by the Airflow Variable ``candlekeep_failure_notifier`` (docs/airflow.md).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, PokeReturnValue, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException
from airflow.timetables.interval import CronDataIntervalTimetable
from failure_notifier import notify_failure

from shared.batch import batch_run
from shared.batch.summary import ReportSummary
from shared.config import Settings

#: Updated by every published report; the event's extra carries the summary's headline.
DQ_REPORTS = Asset(name="candlekeep_dq_reports", uri="candlekeep://dq_reports")
#: One event per run, naming the periods it certified (its own and the stale ones it redid).
CERTIFIED = Asset(name="candlekeep_certified_periods", uri="candlekeep://certified_periods")
_PARSED = Settings()  # the sensor's timing, read when the DAG is parsed


def _settings() -> tuple[Settings, str]:
    settings = Settings()
    if not settings.database_url:
        raise AirflowFailException(
            "DATABASE_URL is not set for Airflow's workers: set it to "
            "the candlekeep market-data database"
        )
    return settings, settings.database_url


def on_failure(context) -> None:
    """The notifier named by the Airflow Variable ``candlekeep_failure_notifier``, if any."""
    notify_failure(context, DAG)


@dag(
    dag_id="candle_reconciliation",
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),  # [hh:00, hh+1:00)
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "start": Param(None, type=["null", "string"], description="Manual run: period start"),
        "end": Param(None, type=["null", "string"], description="Manual run: period end"),
    },
    tags=["candlekeep", "data-quality"],
    doc_md=__doc__,
    on_failure_callback=on_failure,
)
def candle_reconciliation():
    @task(retries=0)
    def period() -> dict:
        """The run's period: params, else the data interval; none is an error."""
        ctx = get_current_context()
        try:
            start, end = batch_run.run_period_of(
                ctx["params"], ctx.get("data_interval_start"), ctx.get("data_interval_end")
            )
        except batch_run.PeriodError as exc:
            raise AirflowFailException(str(exc)) from None
        return {"start": start.isoformat(), "end": end.isoformat()}

    @task.sensor(
        mode="reschedule",  # the slot is free between looks (state up_for_reschedule)
        poke_interval=_PARSED.dq_wait_poke_interval.total_seconds(),
        # A backstop only: the sensor itself goes on after CANDLEKEEP_DQ_WAIT_TIMEOUT.
        timeout=2 * _PARSED.dq_wait_timeout.total_seconds() + 600,
    )
    def wait_for_stream(run: dict) -> PokeReturnValue:
        """Step 1: wait for the stream's watermark to pass the period's end; after
        CANDLEKEEP_DQ_WAIT_TIMEOUT go on, and the report says the stream lagged."""
        settings, url = _settings()
        ctx = get_current_context()
        first = ctx["ti"].get_first_reschedule_date(ctx)
        waited = 0.0 if first is None else (pendulum.now("UTC") - first).total_seconds()
        position = batch_run.poke_step(url, settings, run["start"], run["end"], waited)
        return PokeReturnValue(is_done=position is not None, xcom_value=position)

    @task
    def recompute(run: dict) -> dict:
        """Step 2: the period's candles from `trades`, in SQL, into `batch_candles`."""
        settings, url = _settings()
        return batch_run.recompute_step(url, settings, run["start"], run["end"])

    @task
    def reconcile(run: dict) -> dict:
        """Step 3: classify every candle key; mismatches into `candle_mismatches`."""
        settings, url = _settings()
        return batch_run.reconcile_step(url, settings, run["start"], run["end"])

    @task
    def verify(run: dict) -> dict:
        """Step 3b: trade-id gaps from the stored trades; the venue's candles and a verdict each."""
        settings, url = _settings()
        return batch_run.verify_step(url, settings, run["start"], run["end"])

    @task
    def repair(run: dict, reconciliation: dict, verification: dict) -> dict:
        """Step 3c: the open gaps' trades from the venue; if any was stored, steps 2-3b again."""
        settings, url = _settings()
        return batch_run.repair_step(
            url, settings, run["start"], run["end"], reconciliation, verification
        )

    @task
    def checks(run: dict, repaired: dict, stream: dict) -> dict:
        """Step 4: data-quality checks and the verdict (the report's summary, as JSON)."""
        settings, url = _settings()
        summary = batch_run.checks_step(
            url,
            settings,
            run["start"],
            run["end"],
            repaired["reconciliation"],
            stream,
            repaired["verification"],
            repaired["repair"],
        )
        return summary.to_json()

    @task(outlets=[DQ_REPORTS])
    def publish(summary: dict) -> dict:
        """Step 5: the `dq_reports` row and HTML page; an asset event carries the headline."""
        settings, url = _settings()
        report = ReportSummary.from_json(summary)
        published = batch_run.publish_step(url, settings, report)
        get_current_context()["outlet_events"][DQ_REPORTS].extra = report.headline()
        return published

    @task
    def reconcile_stale(run: dict, published: dict) -> list[dict]:
        """Reconcile again the periods marked stale (trades stored after they were reconciled)."""
        settings, url = _settings()
        return batch_run.reconcile_stale_step(url, settings, exclude=(run["start"], run["end"]))

    @task
    def send_corrections(stale: list[dict]) -> dict:
        """The batch candles that correct the stream's, on the `candles` topic."""
        from stream.corrections import CorrectionsNotSent, send_corrections

        settings, url = _settings()
        try:
            return send_corrections(url, settings)
        except CorrectionsNotSent as exc:
            raise RuntimeError(str(exc)) from None  # retried; the next run sends them too

    @task(outlets=[CERTIFIED])
    def certify(summary: dict, stale: list[dict], corrections: dict) -> list[dict]:
        """An asset event naming the periods this run certified (not failed)."""
        certified = batch_run.certified_periods(ReportSummary.from_json(summary), stale)
        get_current_context()["outlet_events"][CERTIFIED].extra = {
            "periods": certified,
            "corrections_sent": corrections["sent"],
        }
        return certified

    @task(retries=0)
    def verdict(summary: dict, published: dict) -> str:
        """Fail the run when the report fails (e.g. any unexplained difference)."""
        report = ReportSummary.from_json(summary)
        if report.status == "fail":
            raise AirflowFailException(
                "data quality FAILED: "
                + "; ".join(report.reasons)
                + f" (report: {published['path']})"
            )
        return report.status

    run = period()
    stream = wait_for_stream(run)
    recomputed = recompute(run)
    reconciliation = reconcile(run)
    verification = verify(run)
    # The order of the steps where no data flows.
    stream >> recomputed >> reconciliation >> verification
    summary = checks(run, repair(run, reconciliation, verification), stream)
    published = publish(summary)
    stale = reconcile_stale(run, published)
    corrections = send_corrections(stale)
    certified = certify(summary, stale, corrections)
    certified >> verdict(summary, published)


DAG = candle_reconciliation()
