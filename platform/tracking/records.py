"""How the richer tracking records reach MLflow: params, text, step images, tables, dataset inputs.

The tracker journals every record before sending it (platform/tracking/mlflow_tracker.py), and a
record may be sent more than once: a process killed after a delivery but before its watermark is
replayed by the next tracker or `selfflow sync`. Each function here is therefore idempotent
against what the run already holds:
- params: only keys the run does not have yet (MLflow params cannot change value);
- text: overwrites the same artifact file;
- image: one image per (key, step), like metrics (MLflow names each upload with a fresh UUID, so a
  resend would otherwise show twice on the step slider);
- table: replaces the artifact file (MLflow's `log_table` would append to an existing one);
- dataset input: MLflow stores one input per (dataset name, digest) and run.

Limits: MLflow keeps param keys to 250 characters and values to 6,000, tag values to 8,000.
`param_items` and `tag_value` shorten what is longer and say so in the value.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
from pathlib import Path
from typing import Any, Mapping

MAX_PARAM_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAM_BATCH = 100  # MLflow's log_batch limit on params per call
_IMAGE_FILE = re.compile(r"^(?P<key>.+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[0-9a-f-]+\+compressed\.webp$")
_NAME_CHARS = re.compile(r"[^/\w.\- :]")  # MLflow's allowed characters in param, metric and tag names


def shorten(text: str, limit: int, where: str = "") -> str:
    """`text` cut to `limit` characters, ending with a note of how much was cut (and where the rest is)."""
    if len(text) <= limit:
        return text
    note = f" ...[{len(text)} chars; cut" + (f", full text in {where}" if where else "") + "]"
    return text[:limit - len(note)] + note


def param_key(key: str) -> str:
    """A gin binding's name as an MLflow param key: characters MLflow refuses become '_'; a key over
    250 characters keeps its start and a hash of the whole (two long keys stay distinct)."""
    key = _NAME_CHARS.sub("_", key.strip())
    if len(key) > MAX_PARAM_KEY:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = f"{key[:MAX_PARAM_KEY - 9]}~{digest}"
    return key


def param_items(params: Mapping[str, object], where: str = "") -> dict[str, str]:
    """{MLflow param key: value within MLflow's limits} (`where` names the full config for cut values)."""
    return {param_key(key): shorten(str(value), MAX_PARAM_VALUE, where) for key, value in params.items()}


def tag_value(value: object) -> str:
    return shorten(str(value), MAX_TAG_VALUE)


def send_params(client, run_id: str, params: Mapping[str, str]) -> int:
    """Log the params the run does not have yet; returns how many were sent."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    items = [Param(key, value) for key, value in params.items() if key not in existing]
    for start in range(0, len(items), PARAM_BATCH):
        client.log_batch(run_id, params=items[start:start + PARAM_BATCH])
    return len(items)


def send_text(client, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, text, artifact_file)


def image_steps(client, run_id: str) -> set[tuple[str, int]]:
    """(key, step) of every step image the run holds (MLflow stores them as
    images/<key with / as ~>+step+<step>+timestamp+<ms>+<uuid>[+compressed].{png,webp})."""
    found = set()
    for item in client.list_artifacts(run_id, "images"):
        match = _IMAGE_FILE.match(posixpath.basename(item.path))
        if match:  # the compressed copy is written last: its presence means the image is complete
            found.add((match["key"].replace("~", "/"), int(match["step"])))
    return found


def send_image(client, run_id: str, path: str, key: str, step: int, timestamp: int,
               present: set[tuple[str, int]] | None) -> bool:
    """One step image from a PNG on disk; False (nothing sent) when `present` already has (key, step)."""
    from PIL import Image

    if present is not None and (key, int(step)) in present:
        return False
    if not Path(path).exists():
        raise FileNotFoundError(f"image file {path} no longer exists")
    with Image.open(path) as image:
        image.load()
        client.log_image(run_id, image.convert("RGB"), key=key, step=int(step), timestamp=int(timestamp),
                         synchronous=True)
    if present is not None:
        present.add((key, int(step)))
    return True


def send_table(client, run_id: str, columns: Mapping[str, list], artifact_file: str) -> bool:
    """The table as MLflow's table artifact (the UI's table view). MLflow's `log_table` appends to a
    file the run already has, so a file already there is replaced instead, in the same format
    (pandas' split-oriented JSON) and with the same tag: a replay leaves one copy, a newer table wins.
    Returns whether `log_table` itself wrote it."""
    import pandas as pd
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    folder = posixpath.dirname(artifact_file) or None
    if artifact_file not in {item.path for item in client.list_artifacts(run_id, folder)}:
        client.log_table(run_id, data=dict(columns), artifact_file=artifact_file)
        return True
    client.log_text(run_id, pd.DataFrame(dict(columns)).to_json(orient="split", index=False, date_format="iso"),
                    artifact_file)
    logged = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in logged:
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(logged + [entry]))
    return False


def send_dataset(client, run_id: str, dataset: Mapping[str, Any]) -> None:
    """A dataset input: {name, digest, source_type, source, schema?, profile?, context}."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    entity = Dataset(name=str(dataset["name"]), digest=str(dataset["digest"]),
                     source_type=str(dataset["source_type"]), source=str(dataset["source"]),
                     schema=dataset.get("schema"), profile=dataset.get("profile"))
    tags = [InputTag("mlflow.data.context", str(dataset["context"]))] if dataset.get("context") else []
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=tags)])
