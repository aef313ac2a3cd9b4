"""Nightly warehouse housekeeping: vacuum and analyze the fact tables."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from airflow import DAG
from airflow.providers.standard.operators.bash import BashOperator

SQL = Path(__file__).parent / "sql" / "vacuum.sql"

with DAG(
    "warehouse_maintenance",
    start_date=datetime(2024, 1, 1),
    schedule="0 3 * * *",
    catchup=False,
    tags=["ops"],
):
    BashOperator(task_id="show_plan", bash_command=f"cat {SQL}")
