"""Stretches: expected values, input left unchanged, any channel count, bad specs, NaN."""

import json

import numpy as np
import pytest

from ml_backend.core.stretch import make_stretch, parse_stretch_params

RAMP = np.array([[0.0, 1.0, 2.0, 3.0, 4.0]])  # (1, 5)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"name": "linear"}, [0, 64, 128, 191, 255]),
        # clip at the 25th / 75th percentiles (1 and 3): below -> 0, above -> 255
        ({"name": "linear", "lower_percentile": 25, "upper_percentile": 75},
         [0, 0, 128, 255, 255]),
        # log: log(a*v + 1) / log(a + 1) with a = 1000 on v = 0, .25, .5, .75, 1
        ({"name": "log"}, [0, 204, 229, 244, 255]),
        # asinh: asinh(v / a) / asinh(1 / a) with a = 0.1
        ({"name": "asinh", "lower_percentile": 0, "upper_percentile": 100},
         [0, 140, 197, 231, 255]),
        ({"name": "none"}, [0, 1, 2, 3, 4]),
        ({"name": "unit"}, [0, 255, 255, 255, 255]),  # display values in [0, 1], clipped
    ],
)
def test_expected_values(spec, expected):
    out = make_stretch(spec)(RAMP)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], expected)


def test_log_and_asinh_match_their_formulas():
    v = np.linspace(0, 1, 11)
    log = make_stretch({"name": "log", "a": 100})(v[None, :])[0]
    np.testing.assert_array_equal(log, np.rint(255 * np.log(100 * v + 1) / np.log(101)))
    asinh = make_stretch({"name": "asinh", "a": 0.2, "lower_percentile": 0,
                          "upper_percentile": 100})(v[None, :])[0]
    np.testing.assert_array_equal(asinh, np.rint(255 * np.arcsinh(v / 0.2) / np.arcsinh(5)))


def test_zscale_uses_astropy_limits():
    from astropy.visualization import ZScaleInterval

    rng = np.random.default_rng(0)
    image = rng.normal(100, 5, size=(64, 64))
    image[10, 10] = 1e6  # a bright star must not set the scale
    lo, hi = ZScaleInterval().get_limits(image)
    out = make_stretch("zscale")(image)
    expected = np.rint(255 * np.clip((image - lo) / (hi - lo), 0, 1))
    np.testing.assert_array_equal(out, expected)
    assert out[10, 10] == 255


@pytest.mark.parametrize("name", ["linear", "log", "asinh", "zscale", "none", "unit"])
@pytest.mark.parametrize("shape", [(8, 9), (8, 9, 1), (8, 9, 3), (8, 9, 5)])
def test_shape_kept_and_input_unchanged(name, shape):
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 200, size=shape).astype(np.float32)
    image.flat[3] = np.nan
    before = image.copy()
    result = make_stretch(name).apply(image)
    assert result.pixels.shape == shape and result.pixels.dtype == np.uint8
    np.testing.assert_array_equal(image, before)  # NaN == NaN under assert_array_equal
    assert result.n_nonfinite == 1


def test_unit_scales_display_values_in_zero_one():
    v = np.array([[0.0, 0.25, 0.5, 1.0, 1.5, -0.2]])
    np.testing.assert_array_equal(make_stretch("unit")(v)[0], [0, 64, 128, 255, 255, 0])


def test_channels_are_independent():
    a = np.arange(20.0).reshape(4, 5)
    image = np.stack([a, 1000 * a + 7], axis=-1)
    out = make_stretch("linear")(image)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    assert out.min() == 0 and out.max() == 255


def test_nonfinite_replaced_by_channel_minimum_and_counted():
    image = np.array([[np.nan, 2.0, 4.0, np.inf, -np.inf, 6.0]])
    result = make_stretch("linear").apply(image)
    assert result.n_nonfinite == 3
    np.testing.assert_array_equal(result.pixels[0], [0, 0, 128, 0, 0, 255])


def test_all_nan_channel_is_a_clear_error():
    image = np.ones((4, 4, 2))
    image[..., 1] = np.nan
    with pytest.raises(ValueError, match="channel 1 has no finite pixel"):
        make_stretch("asinh")(image)


def test_constant_image_maps_to_zero():
    assert not make_stretch("linear")(np.full((3, 3), 7.0)).any()


@pytest.mark.parametrize("bad", [np.zeros((0, 4)), np.zeros(5), np.zeros((2, 2, 2, 2)),
                                 np.array([["a"]])])
def test_bad_arrays_rejected(bad):
    with pytest.raises(ValueError):
        make_stretch("linear")(bad)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "sqrt"}, "unknown stretch 'sqrt'"),
        ({"name": "asinh", "a": 0}, "a must be in"),
        ({"name": "asinh", "a": 2}, "a must be in"),
        ({"name": "log", "a": -1}, "a must be > 0"),
        ({"name": "linear", "lower_percentile": 90, "upper_percentile": 10}, "percentile"),
        ({"name": "linear", "upper_percentile": 101}, "percentile"),
        ({"name": "zscale", "contrast": 0}, "contrast"),
        ({"name": "linear", "a": 0.1}, "no parameter 'a'"),
        ({"name": "asinh", "a": "x"}, "finite number"),
        ({"name": "asinh", "a": float("nan")}, "finite number"),
        ({"a": 0.1}, "'name'"),
    ],
)
def test_invalid_specs_raise_at_construction(spec, message):
    with pytest.raises(ValueError, match=message):
        make_stretch(spec)


def test_spec_round_trips_through_json():
    stretch = make_stretch({"name": "asinh", "a": 0.05})
    spec = json.loads(json.dumps(stretch.spec))
    assert spec == {"name": "asinh", "a": 0.05, "lower_percentile": 0.5, "upper_percentile": 99.5}
    image = np.random.default_rng(2).gamma(2.0, size=(16, 16, 3))
    np.testing.assert_array_equal(make_stretch(spec)(image), stretch(image))


def test_parse_stretch_params():
    assert parse_stretch_params("asinh", ["a=0.2"]) == {"name": "asinh", "a": 0.2}
    with pytest.raises(ValueError, match="key=value"):
        parse_stretch_params("asinh", ["a"])
    with pytest.raises(ValueError, match="not a number"):
        parse_stretch_params("asinh", ["a=big"])


# ---- ESA's fitsbolt normalisations ------------------------------------------------------------

FITSBOLT = ["fitsbolt-linear", "fitsbolt-log", "fitsbolt-asinh", "fitsbolt-zscale",
            "fitsbolt-midtones"]


def _sky(shape=(24, 24, 2)) -> np.ndarray:
    image = np.random.default_rng(5).normal(0.0, 1.0, shape)
    image[10:14, 10:14] += 40.0  # a source
    return image


@pytest.mark.parametrize("name", FITSBOLT)
def test_fitsbolt_stretches_are_fitsbolts_own_per_channel(name):
    fitsbolt = pytest.importorskip("fitsbolt")
    stretch = make_stretch(name)
    image = _sky()
    before = image.copy()
    out = stretch(image)
    np.testing.assert_array_equal(image, before)  # input untouched
    assert out.shape == image.shape and out.dtype == np.uint8
    method = fitsbolt.NormalisationMethod[name.split("-")[1].upper()]
    for c in range(image.shape[-1]):
        (own,) = fitsbolt.normalise_images([image[..., c]], normalisation_method=method,
                                           num_workers=1, show_progress=False)
        np.testing.assert_array_equal(out[..., c], own)
    assert out.max() == 255 and out[12, 12, 0] > np.median(out[..., 0])  # the source is bright


def test_fitsbolt_parameters_reach_fitsbolt_and_are_recorded():
    pytest.importorskip("fitsbolt")
    image = _sky((24, 24))
    soft = make_stretch({"name": "fitsbolt-asinh", "scale": 5.0})
    assert soft.spec == {"name": "fitsbolt-asinh", "scale": 5.0, "clip": 99.8}
    assert not np.array_equal(soft(image), make_stretch("fitsbolt-asinh")(image))
    assert make_stretch(json.loads(json.dumps(soft.spec))).spec == soft.spec


def test_fitsbolt_stretches_handle_nan_and_constant_channels():
    pytest.importorskip("fitsbolt")
    image = _sky((24, 24, 2))
    image[0, :5, 0] = np.nan
    image[..., 1] = 3.0
    result = make_stretch("fitsbolt-log").apply(image)
    assert result.n_nonfinite == 5 and (result.pixels[..., 1] == 0).all()
    with pytest.raises(ValueError, match="no finite pixel"):
        make_stretch("fitsbolt-log")(np.full((4, 4), np.nan))


@pytest.mark.parametrize(("spec", "message"), [
    ({"name": "fitsbolt-log", "a": 0}, "a must be > 0"),
    ({"name": "fitsbolt-asinh", "clip": 120}, "clip is a percentile"),
    ({"name": "fitsbolt-linear", "a": 1}, "no parameter 'a'"),
    ({"name": "fitsbolt-sqrt"}, "unknown stretch"),
])
def test_bad_fitsbolt_specs_are_refused(spec, message):
    pytest.importorskip("fitsbolt")
    with pytest.raises(ValueError, match=message):
        make_stretch(spec)


def test_without_fitsbolt_the_error_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fitsbolt", None)  # import fitsbolt -> ImportError
    with pytest.raises(ValueError, match=r"needs ESA's fitsbolt package: pip install"):
        make_stretch("fitsbolt-asinh")
