"""Layer 5 of 5: training and evaluation: clips from the frame store (per clip and batched), the training loop,
metrics, the demo's pretraining, distributed set-up. Imports every layer below. Above it: the Python API
(pipeline/api.py), then the stages (stages/), then the CLI (pipeline/cli.py)."""
