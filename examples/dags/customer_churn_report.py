"""Weekly churn report, written with the TaskFlow API."""
from __future__ import annotations

from datetime import datetime

from airflow.sdk import dag, task


@dag(schedule="@weekly", start_date=datetime(2024, 1, 1), catchup=False, tags=["reporting"])
def customer_churn_report() -> None:
    @task
    def active_customers() -> int:
        return 1250

    @task
    def churned_customers() -> int:
        return 37

    @task
    def churn_rate(active: int, churned: int) -> float:
        return round(churned / max(active, 1), 4)

    churn_rate(active_customers(), churned_customers())


customer_churn_report()
