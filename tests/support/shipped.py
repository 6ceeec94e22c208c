"""The label configs this project ships (label_config/*.xml), as tests read them."""

from __future__ import annotations

from pathlib import Path

LABEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "label_config"
# The default project config: <Image name="image" value="$image">, <Choices name="label">.
BINARY_CONFIG = (LABEL_CONFIG_DIR / "anomaly_binary.xml").read_text(encoding="utf-8")
FROM_NAME, TO_NAME = "label", "image"
