#!/usr/bin/env bash
# Creates the three databases of the stack on one PostgreSQL server, each owned by its own login role:
#   airflow   - Airflow's metadata database (and the Celery result backend)
#   mlflow    - the MLflow tracking server's backend store
#   warehouse - the shop's warehouse that the DAG extracts from (Connection mtl_warehouse)
# One role per database, and no CONNECT for PUBLIC, so a leaked MLflow password does not open the warehouse.
#
# The postgres image runs this once, from /docker-entrypoint-initdb.d, when its data volume is empty. To change
# a password afterwards, ALTER ROLE it by hand (or drop the postgres-data volume and start afresh).
# Passwords come from the environment (docker/.env); psql's :'var' quoting keeps any character in them safe.
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?set AIRFLOW_DB_PASSWORD in docker/.env}"
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD in docker/.env}"
: "${WAREHOUSE_DB_PASSWORD:?set WAREHOUSE_DB_PASSWORD in docker/.env}"
WAREHOUSE_DB_USER="${WAREHOUSE_DB_USER:-mtl_warehouse}"
WAREHOUSE_DB_NAME="${WAREHOUSE_DB_NAME:-warehouse}"

create_database() {
    local role="$1" database="$2" password="$3"
    echo "init-databases: role ${role}, database ${database}"
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
        -v role="${role}" -v database="${database}" -v password="${password}" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"database" OWNER :"role";
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
SQL
}

create_database airflow airflow "${AIRFLOW_DB_PASSWORD}"
create_database mlflow mlflow "${MLFLOW_DB_PASSWORD}"
create_database "${WAREHOUSE_DB_USER}" "${WAREHOUSE_DB_NAME}" "${WAREHOUSE_DB_PASSWORD}"
