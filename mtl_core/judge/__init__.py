"""Judging models: metrics, evaluation on the holdout, the oracle, AUC differences, the gate's decision.

Pure decisions, no MLflow: ``gate.decide`` turns a comparison into a verdict, and ``registry.decisions``
writes it down. ``metrics`` imports nothing of the project (the training loop uses it for early stopping);
``oracle`` is the only reader of the shop's truth outside the simulator. Modules:

* ``metrics``: AUC, log loss, calibration error, a small logistic fit;
* ``evaluate``: models scored per task on a split, champion against challenger on the same rows;
* ``delong``: the AUC difference of two models on the same rows with DeLong's variance (what the gate reads);
* ``bootstrap``: the paired bootstrap interval of an AUC difference (the benchmarks' gaps to the oracle);
* ``oracle``: the shop's true probabilities behind the labels;
* ``gate``: the promotion rule as a pure function of the comparison and the settings.
"""
