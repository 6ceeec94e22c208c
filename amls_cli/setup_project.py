"""`amls setup-project`: a Label Studio project wired to the backend (`project_setup`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ml_backend.config import Config, ConfigError
from ml_backend.label_schema import LabelConfigError
from ml_backend.labelstudio import API_FAILURES, LabelStudioClient, describe_failure
from ml_backend.project_setup import (
    DEFAULT_BACKEND_URL,
    DEFAULT_CONFIG,
    DEFAULT_TITLE,
    SetupRequest,
    setup_project,
)

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `setup-project` to the `amls` parser."""
    p = sub.add_parser(
        "setup-project", help="create / update a Label Studio project wired to the backend",
        description="Create (or bring up to date) a Label Studio project: label config, ML "
                    "backend connection, training on submit, webhook auth, preview storage "
                    "and the Data Manager tabs (Most anomalous first, Labelled, All tasks). Safe "
                    "to re-run. Reads "
                    "LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, BASIC_AUTH_USER/PASS and "
                    "ANOMALY_LABEL from the environment.")
    p.add_argument("--title", default=DEFAULT_TITLE,
                   help=f"project title, used to find it again (default {DEFAULT_TITLE!r})")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="label config XML (default ./label_config/anomaly_binary.xml)")
    p.add_argument("--project", type=int, help="update this project id instead")
    p.add_argument("--backend-url", default=DEFAULT_BACKEND_URL,
                   help="the backend's URL as Label Studio reaches it "
                        f"(default {DEFAULT_BACKEND_URL})")
    p.add_argument("--previews", type=Path,
                   help="preview PNG folder to register as local-files storage; must be a "
                        "subfolder of Label Studio's LOCAL_FILES_DOCUMENT_ROOT, as Label "
                        "Studio sees it")
    p.set_defaults(func=setup_project_command)


def setup_project_command(args: argparse.Namespace) -> int:
    try:
        cfg = Config.from_env()
    except ConfigError as err:
        logger.error("invalid configuration: %s", err)
        return 2
    try:
        label_config = args.config.read_text(encoding="utf-8")
    except OSError as err:
        logger.error("cannot read label config %s: %s", args.config, err)
        return 2
    basic_auth = (cfg.basic_auth_user, cfg.basic_auth_pass) if cfg.auth_enabled else None
    request = SetupRequest(title=args.title, label_config=label_config,
                           backend_url=args.backend_url, project_id=args.project,
                           previews=args.previews, basic_auth=basic_auth,
                           anomaly_label=cfg.anomaly_label)
    try:
        client = LabelStudioClient(cfg.label_studio_url, cfg.label_studio_api_key)
        result = setup_project(client, request)
    except LabelConfigError as err:
        logger.error("%s: %s", args.config, err)
        return 2
    except ValueError as err:
        logger.error("%s", err)
        return 2
    except API_FAILURES as err:
        # Label Studio refused (status + body) or could not be reached: say so, no traceback.
        logger.error("setting up project %r on %s failed: %s", args.title,
                     cfg.label_studio_url, describe_failure(err))
        return 1
    for change in result.changes or ["nothing to change: project already set up"]:
        print(f"- {change}")
    print(f"Project {result.project_id}: {result.project_url}")
    print(f"Dashboard: {args.backend_url.rstrip('/')}/dashboard/{result.project_id}")
    return 0

