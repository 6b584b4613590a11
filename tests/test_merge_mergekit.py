"""`stillroom.prune.merge` against mergekit itself (dev extras): the same SLERP per tensor, the same linear
fallback for nearly parallel tensors, the same per-layer t from an anchor list."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
mk_slerp = pytest.importorskip("mergekit.merge_methods.slerp")
mk_config = pytest.importorskip("mergekit.config")

from stillroom.prune.merge import slerp, t_at  # noqa: E402


@pytest.mark.parametrize("t", [0.0, 0.17, 0.5, 0.83, 1.0])
@pytest.mark.parametrize("shape", [(7,), (16, 8), (4, 3, 5)])
def test_slerp_equals_mergekit_on_random_tensors(t, shape):
    g = torch.Generator().manual_seed(hash((t, shape)) % 2**31)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    # mergekit batches tensors along a leading axis (one t per tensor): a batch of one is one tensor.
    want = mk_slerp.slerp(torch.tensor([t]), a.unsqueeze(0), b.unsqueeze(0)).squeeze(0)
    assert torch.allclose(slerp(t, a, b), want, atol=1e-6)


def test_nearly_parallel_tensors_fall_back_to_linear_like_mergekit():
    a = torch.randn(32, generator=torch.Generator().manual_seed(0))
    b = 2.0 * a + 1e-5 * torch.randn(32, generator=torch.Generator().manual_seed(1))
    want = mk_slerp.slerp(torch.tensor([0.3]), a.unsqueeze(0), b.unsqueeze(0)).squeeze(0)
    assert torch.allclose(slerp(0.3, a, b), want, atol=1e-6)
    assert torch.allclose(slerp(0.3, a, b), 0.7 * a + 0.3 * b, atol=1e-6)


@pytest.mark.parametrize("schedule", [[0.0, 1.0], [0.0, 0.5, 0.3, 1.0], [0.2, 0.9, 0.4]])
def test_layer_schedule_equals_mergekit_gradient(schedule):
    for i in range(11):
        x = i / 10
        assert t_at(schedule, x) == pytest.approx(mk_config.evaluate_setting("w", schedule, x, validate=float))
