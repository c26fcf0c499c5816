"""Models and training.

model, checkpoint and training import torch (worker and CLI only); config, evaluation and
baseline do not, so the API services can use them.
"""
