"""The attribute classifiers (paper 2.2): training, thresholds and metrics of the reward and
the judges; the model itself and its save/load are in ``rl4med.models.classifier``."""
