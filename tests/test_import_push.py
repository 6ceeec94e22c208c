"""`amls import push`: batching, idempotence, local-files storage, predictions; one live e2e."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import astropy
import numpy as np
import pytest
import requests
from astropy.io import fits
from astropy.wcs import WCS

from amls_cli import main
from import_tools.push import push
from ml_backend.labelstudio import LabelStudioClient
from ml_backend.task_rows import append_tasks, read_tasks, tasks_path
from tests.support.shipped import BINARY_CONFIG, FROM_NAME, TO_NAME

M13 = Path(astropy.__file__).parent / "io/fits/hdu/compressed/tests/data/m13.fits"
LABEL_CONFIG = BINARY_CONFIG


def make_client() -> LabelStudioClient:
    """Our client over a fake SDK that records the calls push makes (`client.sdk.created`,
    `.storages`, `.batches`); created tasks are listed back like a project's."""
    created: list[dict] = []
    storages: list[str] = []
    batches: list[int] = []

    def import_tasks(id: int, request: list[dict]) -> None:
        batches.append(len(request))
        created.extend(request)

    client = LabelStudioClient("http://label-studio.invalid", "token")
    client.sdk = SimpleNamespace(
        created=created, storages=storages, batches=batches,
        projects=SimpleNamespace(import_tasks=import_tasks,
                                 get=lambda id: SimpleNamespace(label_config=LABEL_CONFIG)),
        tasks=SimpleNamespace(list=lambda project, page_size: [
            SimpleNamespace(data=t["data"]) for t in created]),
        import_storage=SimpleNamespace(local=SimpleNamespace(
            list=lambda project: [SimpleNamespace(path=p) for p in storages],
            create=lambda project, path, title, use_blob_urls: storages.append(path))))
    return client


def import_cutouts(root: Path, n: int, docroot: Path | None = None) -> Path:
    """n catalogue cutouts of m13 into <root>/s.h5, previews under <docroot>/previews."""
    docroot = docroot or root / "docroot"
    root.mkdir(parents=True, exist_ok=True)
    wcs = WCS(fits.getheader(M13)).celestial
    sky = wcs.pixel_to_world(np.linspace(30, 270, n), np.linspace(40, 260, n))
    catalog = root / "cat.csv"
    catalog.write_text("ra,dec,id\n" + "".join(
        f"{s.ra.deg},{s.dec.deg},c{i:03d}\n" for i, s in enumerate(sky)))
    assert main(["import", "fits", str(M13), "--catalog", str(catalog), "--size", "24",
                 "--store", str(root / "s.h5"), "--previews", str(docroot / "previews"),
                 "--document-root", str(docroot)]) == 0
    return root / "s.h5"


def test_push_batches_registers_storage_once_and_is_idempotent(tmp_path):
    store = import_cutouts(tmp_path, 7)
    client = make_client()
    summary = push(client, 1, [store], batch_size=3, document_root=tmp_path / "docroot")
    assert summary.created == 7 and client.sdk.batches == [3, 3, 1]
    assert client.sdk.storages == [str((tmp_path / "docroot" / "previews").resolve())]
    assert {t["data"]["cutout_id"] for t in client.sdk.created} == {f"c{i:03d}" for i in range(7)}
    assert client.sdk.created[0]["data"]["image"] == "/data/local-files/?d=previews/c000.png"
    again = push(client, 1, [store], batch_size=3, document_root=tmp_path / "docroot")
    assert again.created == 0 and again.already_in_project == 7
    assert len(client.sdk.created) == 7 and len(client.sdk.storages) == 1


def test_push_skips_task_rows_without_a_stored_cutout(tmp_path):
    store = import_cutouts(tmp_path, 3)
    row = dict(read_tasks(tasks_path(store))["c000"], cutout_id="ghost")
    append_tasks(tasks_path(store), [row])
    client = make_client()
    summary = push(client, 1, [store])
    assert summary.created == 3 and summary.not_in_store == 1
    assert "ghost" not in {t["data"]["cutout_id"] for t in client.sdk.created}
    assert client.sdk.storages == []  # no document root given: nothing to register


def test_push_sends_an_id_in_two_stores_once(tmp_path):
    first = import_cutouts(tmp_path / "a", 3)
    second = import_cutouts(tmp_path / "b", 4)
    client = make_client()
    summary = push(client, 1, [first, second])
    assert (summary.created, summary.repeated) == (4, 3)
    assert client.sdk.created[0]["data"]["store"] == str(first.resolve())


def test_push_with_predictions_scores_the_store(tmp_path):
    import torch

    from ml_backend.core.checkpoint import ModelMeta, save_model_dir
    from ml_backend.core.config import TrainConfig
    from ml_backend.core.model import build_model
    from ml_backend.core.scoring import score_store
    from ml_backend.core.store import CutoutStore

    store_path = import_cutouts(tmp_path, 4)
    cfg = TrainConfig(pretrained=False, image_size=32)
    torch.manual_seed(0)
    model = build_model(cfg, 1)
    with CutoutStore.open(store_path) as store:
        meta = ModelMeta(version="amls-test-1", parent=None, created="2026-01-01T00:00:00Z",
                         config=cfg.to_dict(), image_size=32, channels=1, stretch=store.stretch)
        expected = dict(zip(store.ids(), score_store(store, model.eval(), meta), strict=True))
    model_dir = save_model_dir(tmp_path / "model", ema=model, student=model, meta=meta)
    client = make_client()
    push(client, 1, [store_path], model_dir=model_dir, prelabel=True)
    assert len(client.sdk.created) == 4
    for task in client.sdk.created:
        [prediction] = task["predictions"]
        score = expected[task["data"]["cutout_id"]]
        assert prediction["model_version"] == "amls-test-1"
        assert prediction["score"] == pytest.approx(score, abs=1e-5)
        choice = "anomaly" if score >= 0.5 else "normal"
        assert prediction["result"] == [{"from_name": FROM_NAME, "to_name": TO_NAME,
                                         "type": "choices", "value": {"choices": [choice]}}]
    again = make_client()  # by default the score comes without a pre-selected choice
    push(again, 1, [store_path], model_dir=model_dir)
    assert [t["predictions"][0]["result"] for t in again.sdk.created] == [[]] * 4


def test_push_needs_credentials(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    assert main(["import", "push", "--project", "1", "--store", str(tmp_path / "s.h5")]) == 2
    assert "LABEL_STUDIO_API_KEY" in capsys.readouterr().err


@pytest.mark.e2e
def test_live_push_previews_render_and_second_push_adds_nothing(label_studio, tmp_path):
    root = label_studio.document_root
    store = import_cutouts(tmp_path, 5, docroot=root)
    project = label_studio.client.projects.create(title="amls import e2e",
                                                  label_config=LABEL_CONFIG)
    client = LabelStudioClient(label_studio.url, label_studio.token)
    first = push(client, project.id, [store], batch_size=2, document_root=root)
    second = push(client, project.id, [store], batch_size=2, document_root=root)
    assert (first.created, second.created, second.already_in_project) == (5, 0, 5)
    tasks = list(label_studio.client.tasks.list(project=project.id))
    assert len(tasks) == 5
    headers = {"Authorization": f"Token {label_studio.token}"}
    for task in tasks:
        response = requests.get(label_studio.url + task.data["image"], headers=headers,
                                timeout=30)
        assert response.status_code == 200, response.text[:200]
        assert response.content.startswith(b"\x89PNG")
