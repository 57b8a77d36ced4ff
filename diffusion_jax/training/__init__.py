"""Training: the train state and optimizer (`state.py`), the sharded train step (`step.py`)."""
