"""The model families the tests run on, in one place.

`FAMILY_PRESETS` is derived from the package (`hooked_recurrent.families.FAMILIES`), so a new
family runs through every family-parametrised test without an edit here; its only test addition
is its float64 reference in `reference.py`, if its mixer is of a new kind.
"""

from hooked_recurrent.presets import PRESETS

# Every family's tiny random preset.
FAMILY_PRESETS = list(PRESETS)

# The two families with shipped models (one delta rule, one Mamba-2). What takes seconds per model
# and repeats a check that every family passes in another form (the WriteSAE protocols and stores
# end to end; the float64 variants of the edit tests, whose float32 variants run on every family)
# runs on these only.
CORE_PRESETS = ["tiny-random:qwen3.5", "tiny-random:mamba2"]
