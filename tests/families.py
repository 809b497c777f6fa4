"""The model families the tests run on, in one place.

`FAMILY_PRESETS` is derived from the package (`hooked_recurrent.families.FAMILIES`), so a new
family runs through every family-parametrised test without an edit here; its only test addition
is its float64 reference in `reference.py`, if its mixer is of a new kind.
"""

from hooked_recurrent.presets import PRESETS

# Every family's tiny random preset.
FAMILY_PRESETS = list(PRESETS)

# The WriteSAE protocols and stores are mixer-agnostic code paths that take seconds per model;
# they run end to end on the two families with shipped models (one delta-rule, one Mamba-2).
PROTOCOL_PRESETS = ["tiny-random:qwen3.5", "tiny-random:mamba2"]
