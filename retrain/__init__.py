"""Training and active-learning retraining (torch and Ultralytics live here only, in the `train` extra)."""
