"""The AnomalyMatch demo: find bent-tailed radio galaxies among FIRST cutouts in Label Studio.

    python -m demo.run_demo                  # starts everything, Ctrl-C stops it
    python -m demo.run_demo --headless-check # set up, check the project, stop (for tests)

Everything it writes lives under ``--data-dir`` (default ``./demo-data``): the sampled PNGs,
the cutout store and previews, Label Studio's database, the models and the server logs.

Steps: sample FIRST galaxies (``firstgalaxydata``; Bent is the rare class, about 6 % of the
sample) -> ``amls import images`` -> start Label Studio (``.ls-venv/bin/label-studio``) and
``amls serve`` (training jobs in-process, no Redis) -> ``amls setup-project`` ->
``amls import push`` -> print the URL and what to do next; wait until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from demo.local_servers import (
    http_ok,
    label_studio_command,
    label_studio_env,
    port_is_free,
    start_process,
    stop_process,
    wait_for,
)

logger = logging.getLogger("demo")

REPO = Path(__file__).resolve().parent.parent
RARE_CLASS = "Bent"
FIRST_FOLDER = "galaxy_data/all/"
FIRST_CLASSES = ("Bent", "Compact", "FRI", "FRII")
PROJECT_TITLE = "AnomalyMatch demo: FIRST radio galaxies"
# The binary decision with RA, Dec and a sky link beside the image (FIRST names are positions).
DEMO_CONFIG = Path("label_config") / "anomaly_binary_coords.xml"
LS_START_TIMEOUT_S = 300.0
BACKEND_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Sample:
    """The sampled cutouts: id -> FIRST class."""

    classes: dict[str, str]

    @property
    def n_rare(self) -> int:
        return sum(c == RARE_CLASS for c in self.classes.values())


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    token: str


class Stop(Exception):
    """SIGINT / SIGTERM arrived: shut the children down."""


# ---- data --------------------------------------------------------------------------------

def first_zip() -> Path:
    import firstgalaxydata

    path = Path(firstgalaxydata.__file__).parent / "galaxy_data.zip"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall firstgalaxydata")
    return path


def sample_first(images_dir: Path, *, n_normal: int, rare_fraction: float,
                 seed: int) -> Sample:
    """Write a random FIRST subsample as ``images_dir/<RA>_<DEC>.png`` and return its classes.

    `n_normal` images come from Compact, FRI and FRII together; Bent images are added so that
    they make up `rare_fraction` (0 < f < 1) of the sample. The file names keep only the
    position: the original names end in the class, which would give the answer away.
    """
    if not 0.0 < rare_fraction < 1.0:
        raise ValueError(f"rare fraction must be in (0, 1), got {rare_fraction}")
    with zipfile.ZipFile(first_zip()) as archive:
        by_class: dict[str, list[tuple[str, str]]] = {c: [] for c in FIRST_CLASSES}
        for name in sorted(archive.namelist()):
            if not (name.startswith(FIRST_FOLDER) and name.endswith(".png")):
                continue
            cls, filename = name[len(FIRST_FOLDER):].split("/", 1)
            cutout_id = "_".join(filename.split("_")[:2])  # RA_DEC, degrees
            by_class[cls].append((cutout_id, name))
        rng = random.Random(seed)
        normals = [m for c in FIRST_CLASSES if c != RARE_CLASS for m in by_class[c]]
        if n_normal > len(normals):
            raise ValueError(f"only {len(normals)} normal images exist, asked for {n_normal}")
        n_rare = max(1, round(n_normal * rare_fraction / (1.0 - rare_fraction)))
        n_rare = min(n_rare, len(by_class[RARE_CLASS]))
        chosen = {m: cls for cls in FIRST_CLASSES for m in by_class[cls]}
        picked = rng.sample(normals, n_normal) + rng.sample(by_class[RARE_CLASS], n_rare)
        images_dir.mkdir(parents=True, exist_ok=True)
        classes = {}
        for cutout_id, name in picked:
            target = images_dir / f"{cutout_id}.png"
            if not target.exists():
                target.write_bytes(archive.read(name))
            classes[cutout_id] = chosen[(cutout_id, name)]
    return Sample(classes)


def check_sample_params(path: Path, params: dict[str, float]) -> None:
    """Refuse to mix samples: the store keeps every image it ever imported."""
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != params:
            raise ValueError(f"{path.parent} holds a sample made with {before}; delete the "
                             f"folder to use {params}")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(params), encoding="utf-8")


def write_truth(path: Path, sample: Sample) -> None:
    """`id,label` CSV (anomaly / normal) for `amls evaluate` after the demo."""
    lines = ["id,label"] + [f"{cid},{'anomaly' if cls == RARE_CLASS else 'normal'}"
                            for cid, cls in sorted(sample.classes.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_positions(path: Path, sample: Sample) -> None:
    """`id,ra,dec` CSV for `amls import images --positions`: FIRST's file names are the
    positions (``<RA>_<DEC>``, degrees), so the tasks get RA/Dec and a sky link."""
    lines = ["id,ra,dec"] + [f"{cid},{cid.split('_')[0]},{cid.split('_')[1]}"
                             for cid in sorted(sample.classes)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def credentials(path: Path) -> Credentials:
    """Demo login and API token, created once and kept (Label Studio's database keeps them)."""
    if path.exists():
        return Credentials(**json.loads(path.read_text(encoding="utf-8")))
    creds = Credentials("demo@localhost", secrets.token_urlsafe(9), secrets.token_hex(20))
    path.write_text(json.dumps(creds.__dict__, indent=1), encoding="utf-8")
    path.chmod(0o600)
    return creds


# ---- processes ---------------------------------------------------------------------------

@contextlib.contextmanager
def children() -> Iterator[list[subprocess.Popen]]:
    """A list to put started processes in; all are stopped on exit, Ctrl-C and SIGTERM."""
    procs: list[subprocess.Popen] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise Stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield procs
    finally:
        for s in old:  # a second Ctrl-C must not interrupt the clean-up
            signal.signal(s, signal.SIG_IGN)
        for proc in reversed(procs):
            stop_process(proc)
        for s, handler in old.items():
            signal.signal(s, handler)


def amls(*args: str, env: dict[str, str]) -> None:
    """Run an `amls` subcommand with this interpreter; raise if it fails."""
    cmd = [sys.executable, "-m", "amls_cli", *args]
    done = subprocess.run(cmd, env=env, cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`amls {' '.join(args[:2])}` failed with status {done.returncode}")


# ---- the demo ----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    data = args.data_dir.resolve()
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for port in (args.ls_port, args.backend_port):
        if not port_is_free(port):
            raise RuntimeError(f"port {port} is in use; pick another with --ls-port / "
                               "--backend-port")
    if not args.ls_bin.exists():
        raise FileNotFoundError(f"Label Studio not found at {args.ls_bin}; run `make install` "
                                "for .ls-venv or pass --ls-bin")

    check_sample_params(data / "sample.json", {"n_normal": args.n_normal,
                                               "rare_fraction": args.rare_fraction,
                                               "seed": args.seed})
    sample = sample_first(data / "images", n_normal=args.n_normal,
                          rare_fraction=args.rare_fraction, seed=args.seed)
    write_truth(data / "truth.csv", sample)
    write_positions(data / "positions.csv", sample)
    counts = Counter(sample.classes.values())
    print(f"Sample: {len(sample.classes)} FIRST radio galaxies "
          f"({', '.join(f'{c} {counts[c]}' for c in FIRST_CLASSES)}).")
    print(f"The rare class to look for is {RARE_CLASS} (bent-tailed radio galaxies): "
          f"{sample.n_rare} of {len(sample.classes)} "
          f"({100 * sample.n_rare / len(sample.classes):.1f} %). Ground truth: "
          f"{data / 'truth.csv'}")

    store, previews = data / "first.h5", data / "previews"
    # The demo's own servers: no Redis (jobs in-process), no basic auth, and none of the
    # caller's Label Studio settings leaking into the demo instance.
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("REDIS_URL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS")
                and not k.startswith("LABEL_STUDIO_")}
    # FIRST sources sit in the middle sixth of each cutout: the model sees the central half
    # (benchmarks/RESULTS.md, "Centre crop"), and the previews are framed on the same half.
    crop = base_env.get("AMLS_CENTER_CROP", "0.5")
    amls("import", "images", str(data / "images"), "--store", str(store), "--previews",
         str(previews), "--document-root", str(data), "--channels", "1",
         "--preview-stretch", "log", "--preview-crop", crop,
         "--positions", str(data / "positions.csv"), env=base_env)

    creds = credentials(data / "credentials.json")
    ls_url = f"http://127.0.0.1:{args.ls_port}"
    backend_url = f"http://127.0.0.1:{args.backend_port}"
    ls_env = label_studio_env(base_env, data / "label-studio", data, username=creds.username,
                              password=creds.password, token=creds.token)
    backend_env = {**base_env,
                   "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": creds.token,
                   "MODEL_DIR": str(data / "models"), "AMLS_STORE_ROOTS": str(data),
                   "AMLS_CENTER_CROP": crop}
    with children() as procs:
        procs.append(start_process(
            label_studio_command(args.ls_bin, args.ls_port, data / "label-studio"),
            ls_env, logs / "label-studio.log", cwd=REPO))
        procs.append(start_process(
            [sys.executable, "-m", "amls_cli", "serve", "--host", "127.0.0.1",
             "--port", str(args.backend_port)], backend_env, logs / "backend.log", cwd=REPO))
        print("Waiting for Label Studio (the first start migrates its database, "
              "a minute or two) ...")
        wait_for(lambda: http_ok(f"{ls_url}/health"), LS_START_TIMEOUT_S, "Label Studio",
                 procs[0], logs / "label-studio.log")
        wait_for(lambda: http_ok(f"{backend_url}/health"), BACKEND_START_TIMEOUT_S,
                 "amls serve", procs[1], logs / "backend.log")

        project_id, project_url = set_up(ls_url, creds.token, backend_url, previews)
        # The token goes through the environment, not argv (which `ps` shows).
        amls("import", "push", "--project", str(project_id), "--store", str(store),
             "--document-root", str(data),
             env={**base_env, "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": creds.token})
        if args.headless_check:
            return check(ls_url, creds.token, project_id, len(sample.classes))

        print(f"\nLabel Studio: {project_url}\n"
              f"Login: {creds.username} / {creds.password}   "
              f"(also in {data / 'credentials.json'})\n"
              "Next: label 5 anomalies (bent tails) and 20 normals (hotkeys a / n),\n"
              "open the 'Most anomalous first' tab and watch the queue reorder after each\n"
              "training cycle (the backend trains on every submission; progress in "
              f"{logs / 'backend.log'}).\nCtrl-C stops everything.")
        while all(p.poll() is None for p in procs):
            time.sleep(1.0)
        dead = next(p for p in procs if p.poll() is not None)
        raise RuntimeError(f"{dead.args[0]} exited with status {dead.returncode}; see {logs}")


def set_up(ls_url: str, token: str, backend_url: str, previews: Path) -> tuple[int, str]:
    """`amls setup-project` in-process: project, backend link, storage, view."""
    from ml_backend.labelstudio import LabelStudioClient
    from ml_backend.project_setup import SetupRequest, setup_project

    client = LabelStudioClient(ls_url, token)
    request = SetupRequest(title=PROJECT_TITLE,
                           label_config=(REPO / DEMO_CONFIG).read_text(encoding="utf-8"),
                           backend_url=backend_url, previews=previews)
    result = setup_project(client, request)
    for change in result.changes:
        print(f"- {change}")
    return result.project_id, result.project_url


def check(ls_url: str, token: str, project_id: int, n_images: int) -> int:
    """--headless-check: every image is a task and the backend is connected; 0 if so."""
    from ml_backend.label_schema import VIEW_TITLE
    from ml_backend.labelstudio import LabelStudioClient

    sdk = LabelStudioClient(ls_url, token).sdk
    n_tasks = sdk.projects.get(id=project_id).task_number
    backends = list(sdk.ml.list(project=project_id))
    views = [(v.data or {}).get("title") for v in sdk.views.list(project=project_id)]
    ok = n_tasks == n_images and len(backends) == 1 and VIEW_TITLE in views
    print(f"headless check: project {project_id}: {n_tasks} tasks for {n_images} images, "
          f"{len(backends)} ML backend(s), views {views}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demo.run_demo", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, default=REPO / "demo-data",
                   help="where everything is written (default ./demo-data)")
    p.add_argument("--ls-bin", type=Path, default=REPO / ".ls-venv" / "bin" / "label-studio",
                   help="label-studio executable (default .ls-venv/bin/label-studio)")
    p.add_argument("--ls-port", type=int, default=8080)
    p.add_argument("--backend-port", type=int, default=9090)
    p.add_argument("--n-normal", type=int, default=600,
                   help="Compact + FRI + FRII images in the sample (default 600)")
    p.add_argument("--rare-fraction", type=float, default=0.06,
                   help=f"share of {RARE_CLASS} images in the sample (default 0.06)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--headless-check", action="store_true",
                   help="set everything up, check the project, stop and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return run(args)
    except Stop as why:
        print(f"\n{why}: stopped Label Studio and the backend.")
        return 0
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        logger.error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
