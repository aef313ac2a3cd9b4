-- Reclaim space and refresh planner statistics on the fact tables.
VACUUM (ANALYZE) fact_orders;
VACUUM (ANALYZE) fact_payments;
