"""Export a dashboard in the batch format Neuronpedia imports SAE features from.

Neuronpedia builds its feature pages from the output of SAEDashboard's ``NeuronpediaRunner``: a
folder of ``batch-{i}.json`` files. Neuronpedia's own converter
(``utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py`` in its
repository) turns such a folder into the export that a Neuronpedia instance loads from its admin
panel (``features/``, ``activations/``, ``model.jsonl``, ``source.jsonl``, ...). SAEDashboard itself
cannot run WriteSAEs (it reads ``W_dec`` rows as residual directions, and its releases cannot be
installed next to a transformers that has Qwen3.5), so this module writes the same files from a
`DashboardData`.

Each batch file is ``{"model_id", "layer", "sae_set", "sae_id_suffix", "features": [...]}`` and each
feature carries the fields the converter reads:

=============================================  ==============================================================
field                                          WriteSAE content
=============================================  ==============================================================
``feature_index``                              the atom's index
``activations``                                top firing contexts: ``tokens`` (strings), ``values`` (the
                                               atom's code per token), ``qualifying_token_index`` (the firing
                                               token), ``bin_min = -1``, ``bin_max`` = max code,
                                               ``bin_contains = -1`` (SAEDashboard's "top activations" group)
``pos_str``, ``pos_values``                    tokens whose logits a retrieval of the atom raises most: the
                                               value factor through ``W_O[h]`` and ``W_U`` (`readout`)
``neg_str``, ``neg_values``                    the tokens it lowers most
``frac_nonzero``                               firing frequency
``freq_hist_data_bar_values`` / ``_heights``   activation histogram: bin centres / counts
``logits_hist_data_bar_values`` / ``_heights`` histogram of the value factor's logit effect over the vocabulary
``n_prompts_total``, ``n_tokens_in_prompt``,   the token source (rows, row length, name)
``dataset``
neuron alignment, correlations,                empty lists (SAEDashboard fields with no WriteSAE counterpart)
``decoder_weights_dist``
=============================================  ==============================================================

Explanations are left empty: Neuronpedia's auto-interpretation fills them after import. To
publish, run Neuronpedia's converter on the folder, e.g.::

    python convert-saedashboard-to-neuronpedia-export.py --saedashboard-output-dir=DIR/neuronpedia \\
        --model-name=MODEL --layer-num=LAYER --neuronpedia-source-set-id=SAE_SET ...

and load the resulting export from the admin panel of a Neuronpedia instance (or send it to the
Neuronpedia team).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hooked_recurrent.files import atomic_write_text

from .data import AtomRecord, DashboardData, Histogram

__all__ = ["export_neuronpedia", "feature_json"]

# SAEDashboard fields that have no WriteSAE counterpart; Neuronpedia's converter reads them all.
_EMPTY_LISTS = (
    "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
    "decoder_weights_dist",
)


def _significant(x: float) -> float:
    """``x`` to 5 significant digits (codes are in the model's units, often far below 1)."""
    return float(f"{x:.5g}")


def _bars(histogram: Histogram) -> tuple[list[float], list[int]]:
    edges = histogram.edges
    centres = [_significant((edges[j] + edges[j + 1]) / 2) for j in range(len(histogram.counts))]
    return centres, list(histogram.counts)


def feature_json(record: AtomRecord, meta: dict[str, Any]) -> dict[str, Any]:
    """One atom as a feature of a SAEDashboard/Neuronpedia batch file (see the module docstring)."""
    readout = record.value_tokens[0]
    freq_values, freq_heights = _bars(record.activations)
    logit_values, logit_heights = _bars(record.logit_effects)
    feature: dict[str, Any] = {name: [] for name in _EMPTY_LISTS}
    feature.update({
        "feature_index": record.index,
        "pos_str": [t for t, _ in readout["top"]],
        "pos_values": [_significant(v) for _, v in readout["top"]],
        "neg_str": [t for t, _ in readout["bottom"]],
        "neg_values": [_significant(v) for _, v in readout["bottom"]],
        "frac_nonzero": record.frequency,
        "freq_hist_data_bar_values": freq_values,
        "freq_hist_data_bar_heights": freq_heights,
        "logits_hist_data_bar_values": logit_values,
        "logits_hist_data_bar_heights": logit_heights,
        "n_prompts_total": meta["n_sequences"],
        "n_tokens_in_prompt": meta["seq_len"],
        "dataset": str(meta["source"]),
        "activations": [
            {
                "tokens": c.tokens,
                "values": [_significant(v) for v in c.values],
                "qualifying_token_index": c.center,
                "bin_min": -1,
                "bin_max": record.max_activation,
                "bin_contains": -1,
            }
            for c in record.contexts
        ],
    })
    return feature


def export_neuronpedia(
    data: DashboardData,
    out_dir: str | os.PathLike,
    *,
    model_id: str | None = None,
    sae_set: str | None = None,
    features_per_batch: int = 128,
) -> Path:
    """Write ``batch-0.json``, ``batch-1.json``, ... for Neuronpedia's converter.

    Args:
        data: A built dashboard.
        out_dir: The folder (created; files of the same names are replaced atomically).
        model_id: Neuronpedia's id of the model (default: the model's name).
        sae_set: The source set name (default ``writesae-h{head}-{kind}``; Neuronpedia prefixes
            the layer).
        features_per_batch: Atoms per batch file.

    Returns:
        The folder.
    """
    if features_per_batch < 1:
        raise ValueError(f"features_per_batch must be >= 1 (got {features_per_batch})")
    meta = data.meta
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = {
        "model_id": model_id or str(meta["model"]),
        "layer": int(meta["layer"]),
        "sae_set": sae_set or f"writesae-h{meta['head']}-{meta['kind']}",
        "sae_id_suffix": "",
    }
    records = sorted(data.atoms, key=lambda r: r.index)
    for i, start in enumerate(range(0, len(records), features_per_batch)):
        batch = dict(header, features=[feature_json(r, meta) for r in records[start : start + features_per_batch]])
        atomic_write_text(out / f"batch-{i}.json", json.dumps(batch))
    return out
