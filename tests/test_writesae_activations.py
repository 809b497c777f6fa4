"""TopK / BatchTopK / threshold codes, checked against SAELens' own activation modules."""

import jaxtyping
import pytest
import torch

# Runtime shape checks (jaxtyping + beartype) on everything in writesae, for every test module that
# imports it first; test_writesae_sae.py::test_shape_checks_are_active asserts they are on.
with jaxtyping.install_import_hook("writesae", "beartype.beartype"):
    from writesae.activations import batch_topk_code, sparse_rows, threshold_code, topk_code

from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.topk_sae import TopK


@pytest.fixture
def pre() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(5, 3, 40)


def test_topk_matches_saelens(pre: torch.Tensor) -> None:
    code = topk_code(pre, 6)
    torch.testing.assert_close(code.dense, TopK(6)(pre), rtol=0, atol=0)
    # indices/values describe the same code
    rebuilt = torch.zeros_like(pre).scatter(-1, code.indices, code.values)
    torch.testing.assert_close(rebuilt, code.dense, rtol=0, atol=0)
    assert int((code.dense != 0).sum(-1).max()) <= 6


def test_topk_relu_after_selection() -> None:
    # All pre-activations negative: TopK selects k of them, the ReLU zeroes them all.
    code = topk_code(-torch.rand(2, 10) - 0.1, 3)
    assert code.dense.abs().sum() == 0


def test_batch_topk_matches_saelens(pre: torch.Tensor) -> None:
    code = batch_topk_code(pre, 4)
    torch.testing.assert_close(code.dense, BatchTopK(4)(pre), rtol=0, atol=0)
    # the batch keeps k per row on average, rows differ
    counts = (code.dense != 0).sum(-1)
    assert int(counts.sum()) == 4 * 15
    assert counts.min() < counts.max()
    rebuilt = torch.zeros_like(pre).scatter(-1, code.indices, code.values)
    torch.testing.assert_close(rebuilt, code.dense, rtol=0, atol=0)


def test_threshold_code(pre: torch.Tensor) -> None:
    code = threshold_code(pre, torch.tensor(0.5))
    expected = torch.where(pre > 0.5, pre, torch.zeros_like(pre))
    torch.testing.assert_close(code.dense, expected, rtol=0, atol=0)
    # a negative threshold still never keeps negative values
    assert (threshold_code(pre, torch.tensor(-1.0)).dense >= 0).all()


def test_sparse_rows_of_edited_code() -> None:
    dense = torch.zeros(3, 12)
    dense[0, [1, 5, 7]] = torch.tensor([1.0, -2.0, 3.0])
    dense[2, 11] = 4.0
    code = sparse_rows(dense)
    assert code.indices.shape == (3, 3)
    rebuilt = torch.zeros_like(dense).scatter(-1, code.indices, code.values)
    torch.testing.assert_close(rebuilt, dense, rtol=0, atol=0)
