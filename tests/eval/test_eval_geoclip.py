"""The GeoCLIP baseline reproduces the real geoclip.LocationEncoder, with a (lon, lat) interface."""

import importlib.util
import warnings

import numpy as np
import pytest
import torch

from gair_model.eval import geoclip_baseline as gb

LONLAT = torch.tensor([[13.40, 52.52], [-71.06, 42.38], [151.21, -33.87], [-0.13, 51.51], [116.4, 39.9]])


@pytest.fixture(scope="module")
def reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script deprecation inside geoclip/rff
        geoclip = pytest.importorskip("geoclip")
        return geoclip.LocationEncoder().eval()  # pretrained weights from the installed package


@pytest.fixture(scope="module")
def wrapper():
    return gb.load_geoclip_location()


@torch.no_grad()
def test_wrapper_equals_real_geoclip_in_the_right_order(reference, wrapper):
    expected = reference(LONLAT[:, [1, 0]])  # GeoCLIP takes (lat, lon)
    np.testing.assert_allclose(wrapper(LONLAT).numpy(), expected.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(gb.geoclip_embed(LONLAT.numpy(), model=wrapper), expected.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(wrapper.forward_latlon(LONLAT[:, [1, 0]]).numpy(), expected.numpy(), atol=1e-5)
    # Feeding our (lon, lat) order to GeoCLIP directly is the classic bug: the embeddings differ clearly.
    swapped = reference(LONLAT)
    assert (swapped - expected).abs().max() > 100 * 1e-5
    assert not torch.allclose(wrapper(LONLAT[:, [1, 0]]), expected, atol=1e-3)


@torch.no_grad()
def test_lonlat_and_latlon_give_different_embeddings(wrapper):
    a = wrapper(LONLAT)
    b = wrapper(LONLAT[:, [1, 0]])
    cos = torch.nn.functional.cosine_similarity(a, b)
    assert a.shape == (5, 512) and (cos < 0.99).all()


def test_missing_geoclip_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "geoclip" else real(name, *a))
    with pytest.raises(gb.GeoCLIPUnavailable, match="not installed"):
        gb.load_geoclip_location()
