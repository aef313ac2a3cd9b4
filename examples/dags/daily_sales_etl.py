"""Extract yesterday's orders, aggregate them per region, load the totals."""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow import DAG
from airflow.providers.standard.operators.python import PythonOperator
from include.regions import REGIONS


def extract(ds: str, **_: object) -> list[dict[str, object]]:
    return [{"region": r, "amount": 100 * (i + 1), "day": ds} for i, r in enumerate(REGIONS)]


def aggregate(ti, **_: object) -> dict[str, int]:  # type: ignore[no-untyped-def]
    rows = ti.xcom_pull(task_ids="extract")
    totals: dict[str, int] = {}
    for row in rows:
        totals[row["region"]] = totals.get(row["region"], 0) + int(row["amount"])
    return totals


with DAG(
    dag_id="daily_sales_etl",
    start_date=datetime(2024, 1, 1),
    schedule="@daily",
    catchup=False,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
    tags=["sales", "etl"],
) as dag:
    t_extract = PythonOperator(task_id="extract", python_callable=extract)
    t_aggregate = PythonOperator(task_id="aggregate", python_callable=aggregate)
    t_extract >> t_aggregate
