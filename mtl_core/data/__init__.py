"""Data: the warehouse schema, the synthetic shop, extraction into snapshots, and importing real logs.

Owns everything that writes the SQL warehouse or reads its source tables. Only the shop writes the
``truth_*`` tables; ``judge.oracle`` is the one reader of them. Must not import learning, the judge, the
registry or Airflow. Modules:

* ``warehouse``: the SQLAlchemy schema (SQLite or PostgreSQL) and bulk writes;
* ``shop``: the synthetic shop and its generative process (with known ground truth);
* ``corruption``: deliberate bad batches, for the validation tests and the demo;
* ``extract``: a data interval of the warehouse into a Parquet snapshot with a manifest;
* ``stored_values``: values the warehouse stores against its schema, named by table and column when an
  extraction stops on them;
* ``log_formats`` and ``import_logs``: external behaviour logs (Taobao layout or a YAML mapping) into the
  warehouse.
"""
