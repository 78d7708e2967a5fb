"""Serving the champion: its features in the online store, request scoring, batch scoring.

* ``online``: the online feature store on Redis: ``OnlineStore.publish`` writes a model version's user, item and
  ad features (and text vectors) as of the interval's end; ``OnlineStore.lookup`` turns request rows into the
  model's input; served and holdout scores for the score monitor;
* ``batch``: ``score_file``, a Parquet file of candidate pairs scored in chunks by an alias's model.

Serving runs without Airflow and never imports the retraining steps (``pipeline``, ``artifacts``).
"""
