"""Command-line overrides that make `edge-runtime run` small enough for a test on 2 cores:
a 32 px encoder, few training steps and a small label budget."""

FAST_RUN_ARGS = [
    "--set",
    "encoder.input_size=32",
    "--set",
    "hdc.dim=2048",
    "--set",
    "adapt.steps=60",
    "--label-budget",
    "40",
    "--no-progress",
]
