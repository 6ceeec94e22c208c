"""The shipped label configs: what the backend reads from them and what Label Studio accepts."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ml_backend.label_schema import LabelConfigError, parse_label_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "label_config"
CONFIGS = sorted(CONFIG_DIR.glob("*.xml"))
SUBTYPES = ["merger", "ring", "lens", "artefact", "other"]
TASK_DATA = {"image": "/static/images/logo.svg", "cutout_id": "c1", "store": "s.h5",
             "source": "first_J1234+5678.fits", "hdu": 0, "ra": 188.5, "dec": 56.9,
             "sky_link": '<a href="https://sky.esa.int/esasky/?target=188.5%20%2B56.9" '
                         'target="_blank">Open in ESASky</a>',
             "full_link": '<a href="/data/local-files/?d=previews/full-field/c1.png" '
                          'target="_blank">Full field (uncropped)</a>'}


def _xml(path: Path) -> ET.Element:
    return ET.fromstring(path.read_text(encoding="utf-8"))


def test_all_three_configs_are_shipped():
    assert {p.name for p in CONFIGS} == {"anomaly_binary.xml", "anomaly_types.xml",
                                         "anomaly_binary_coords.xml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_backend_finds_the_anomaly_control(path):
    schema = parse_label_config(path.read_text(encoding="utf-8"), "anomaly")
    root = _xml(path)
    image = next(el for el in root.iter("Image") if el.get("name") == schema.to_name)
    control = next(el for el in root.iter("Choices") if el.get("name") == schema.from_name)
    assert image.get("value") == f"${schema.image_key}"
    assert control.get("toName") == schema.to_name
    assert control.get("choice") == "single"
    assert [c.get("value") for c in control.iter("Choice")] == ["anomaly", "normal"]
    assert schema.normal_choice == "normal"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_a_different_anomaly_label_is_reported(path):
    with pytest.raises(LabelConfigError, match="'rare'"):
        parse_label_config(path.read_text(encoding="utf-8"), "rare")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_image_tools_and_unique_hotkeys(path):
    root = _xml(path)
    (image,) = root.iter("Image")
    for attr in ("zoom", "zoomControl", "brightnessControl", "contrastControl"):
        assert image.get(attr) == "true", attr
    hotkeys = [c.get("hotkey") for c in root.iter("Choice") if c.get("hotkey")]
    assert len(hotkeys) == len(set(hotkeys))
    choice_keys = {c.get("value"): c.get("hotkey") for c in root.iter("Choice")}
    assert (choice_keys["anomaly"], choice_keys["normal"]) == ("a", "n")
    assert [t.get("toName") for t in root.iter("TextArea")] == ["image"]


def test_subtypes_show_only_for_anomaly_and_never_train_as_a_label():
    path = CONFIG_DIR / "anomaly_types.xml"
    root = _xml(path)
    schema = parse_label_config(path.read_text(encoding="utf-8"), "anomaly")
    parents = {child: parent for parent in root.iter() for child in parent}
    subtype = next(el for el in root.iter("Choices") if el.get("name") != schema.from_name)
    assert [c.get("value") for c in subtype.iter("Choice")] == SUBTYPES
    gate = parents[subtype]
    assert (gate.get("visibleWhen"), gate.get("whenTagName"), gate.get("whenChoiceValue")) == (
        "choice-selected", schema.from_name, "anomaly")
    # A sub-type answer alone is not a label; the main choice decides.
    merger_only = [{"from_name": subtype.get("name"), "type": "choices",
                    "value": {"choices": ["merger"]}}]
    assert schema.label_of(merger_only) is None
    both = [*merger_only, *schema.prediction_result(0.9)]
    assert schema.label_of(both) == 1


def test_coords_variant_shows_position_and_object():
    root = _xml(CONFIG_DIR / "anomaly_binary_coords.xml")
    shown = {el.get("value") for el in root.iter("Text")}
    # not $source: Label Studio's labelling page shows the whole task JSON for it
    assert shown == {"$ra", "$dec", "$cutout_id"}
    links = [(el.get("value"), el.get("inline"), el.get("clickableLinks"))
             for el in root.iter("HyperText")]
    assert links == [("$sky_link", "true", "true"), ("$full_link", "true", "true")]


@pytest.mark.e2e
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_label_studio_accepts_config_task_and_prediction(label_studio, path):
    client = label_studio.client
    xml = path.read_text(encoding="utf-8")
    schema = parse_label_config(xml, "anomaly")
    project = client.projects.create(title=f"config {path.stem}", label_config=xml)
    try:
        # Raises ApiError (400) when Label Studio finds the config invalid.
        client.projects.validate_label_config(id=project.id, label_config=xml)
        client.projects.import_tasks(id=project.id, request=[
            {"data": TASK_DATA, "predictions": [
                {"model_version": "v1", "score": 0.9, "result": schema.prediction_result(0.9)}]}])
        (task,) = list(client.tasks.list(project=project.id, fields="all"))
        (prediction,) = task.predictions
        assert prediction.result[0]["value"]["choices"] == ["anomaly"]
        assert prediction.score == pytest.approx(0.9)
    finally:
        client.projects.delete(id=project.id)


@pytest.mark.e2e
def test_label_studio_rejects_a_broken_config(label_studio):
    from label_studio_sdk.core.api_error import ApiError

    broken = (CONFIG_DIR / "anomaly_binary.xml").read_text(encoding="utf-8").replace(
        'toName="image" choice', 'toName="no_such_image" choice')
    with pytest.raises(ApiError) as err:
        label_studio.client.projects.create(title="broken", label_config=broken)
    assert err.value.status_code == 400
