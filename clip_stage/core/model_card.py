"""Model cards (README.md with Hub YAML front matter) for exported models, and pushing a folder to the Hub.

`merge` (LLaVA) and `export-clip` (AddressCLIP) write a card beside the weights: YAML front matter
(license, base_model, tags, pipeline_tag, ...) built with huggingface_hub's `ModelCardData`, and a body
naming the base model, vision tower, training data, recipe, metrics (from a benchmark or eval-clip JSON)
and licence. `--push-to-hub REPO` uploads the finished folder with `HfApi.create_repo` + `upload_folder`;
the token comes from the environment (`HF_TOKEN`) or the local login, never from a flag.

    card = ModelCard(title="address-llava", base_model="llava-hf/llava-1.5-7b-hf", ...)
    write_card(folder, card)
    push_folder(folder, "me/address-llava", private=True)
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clip_stage.core.fs import atomic_write_text
from clip_stage.core.outdir import looks_local

CARD_FILE = "README.md"
DEFAULT_LICENSE = "apache-2.0"


class CardError(ValueError):
    """A metrics file that cannot be read into a card, or a push that cannot start (a one-line user error)."""


@dataclass(frozen=True)
class ModelCard:
    """What a model card says; rendered by `render_card`."""

    title: str
    """Heading of the card (the model's name)."""
    summary: str
    """One paragraph: what the model does."""
    pipeline_tag: str
    """Hub task: image-text-to-text (LLaVA) or image-feature-extraction / zero-shot-image-classification (CLIP)."""
    base_model: str | None = None
    """Hub id (or path) of the model it was fine-tuned from."""
    license: str = DEFAULT_LICENSE
    """SPDX-style Hub licence id of these weights (the base model's licence also applies)."""
    tags: tuple[str, ...] = ()
    """Hub tags."""
    details: dict[str, str] = field(default_factory=dict)
    """Rows of the 'Training' table: base, vision tower, data, recipe, ..."""
    metrics: dict[str, dict[str, float | str]] = field(default_factory=dict)
    """{system or split: {metric: value}} shown as a table."""
    metrics_source: str | None = None
    """The file the metrics were read from."""
    usage: str = ""
    """A Python snippet showing how to load and prompt the model."""
    library_name: str = "transformers"
    """Hub library the folder loads with."""


def render_card(card: ModelCard) -> str:
    """README.md text: YAML front matter (huggingface_hub's ModelCardData) + Markdown body."""
    from huggingface_hub import ModelCardData

    # The Hub accepts only hub ids as base_model (a local path fails the upload and publishes the path): a model
    # trained from a local folder names it in the Training table only.
    hub_base = card.base_model if card.base_model and is_hub_id(card.base_model) else None
    data = ModelCardData(license=card.license, base_model=hub_base, tags=list(card.tags) or None,
                         pipeline_tag=card.pipeline_tag, library_name=card.library_name)
    lines = ["---", data.to_yaml(), "---", "", f"# {card.title}", "", card.summary, ""]
    if card.details:
        lines += ["## Training", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in card.details.items()]
        lines.append("")
    lines += ["## Results", ""]
    if card.metrics:
        names = list(dict.fromkeys(m for row in card.metrics.values() for m in row))
        lines += ["| | " + " | ".join(_cell(n) for n in names) + " |", "|---|" + "---|" * len(names)]
        for system, row in card.metrics.items():
            lines.append(f"| {_cell(system)} | " + " | ".join(_fmt(row.get(m)) for m in names) + " |")
        lines += ["", f"Source: `{card.metrics_source}`." if card.metrics_source else "", ""]
    else:
        lines += ["No evaluation was attached when this card was written (pass `--benchmark FILE`).", ""]
    if card.usage:
        lines += ["## Usage", "", "```python", card.usage.strip(), "```", ""]
    lines += ["## License", "", f"These weights are released under `{card.license}`"
              + (f"; the base model `{card.base_model}` keeps its own licence and terms of use, which also apply."
                 if card.base_model else "."), ""]
    return "\n".join(lines)


def is_hub_id(spec: str) -> bool:
    """`org/name` (or a bare name) that is not a path on this machine."""
    return not looks_local(spec) and not os.path.exists(os.path.expanduser(spec))


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if 0.0 <= value <= 1.0 else f"{value:.1f}"
    return _cell(value)


def write_card(folder: str | os.PathLike, card: ModelCard) -> Path:
    """Writes `folder/README.md` atomically; returns its path."""
    path = Path(folder) / CARD_FILE
    atomic_write_text(path, render_card(card))
    return path


def read_metrics(path: str | os.PathLike) -> dict[str, dict[str, float | str]]:
    """{system: {metric: value}} from `benchmark`'s benchmark.json or `eval-clip`'s metrics.json.

    benchmark.json: {system: {"kind", "table": {label: value or null}, "report": {...}}}: the "table" is what
    benchmark.md shows (unanswered questions counted wrong, a type the system cannot answer left out); an
    older file without it gives its report's "strict_metrics" (else "metrics") and median error. Failed
    systems, with "error", are listed as failed. metrics.json: a flat {metric: number}. Anything else is a
    CardError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CardError(f"{path}: cannot read metrics JSON ({e})") from e
    if not isinstance(data, dict) or not data:
        raise CardError(f"{path}: expected a JSON object of metrics")
    if all(isinstance(v, dict) and ("report" in v or "error" in v) for v in data.values()):
        out: dict[str, dict[str, float | str]] = {}
        for system, res in data.items():
            if "error" in res:
                out[system] = {"status": "failed"}
                continue
            if isinstance(res.get("table"), dict):  # exactly what benchmark.md shows
                out[system] = {name: v for name, v in res["table"].items() if v is not None}
                continue
            report = res["report"]  # an older benchmark.json: its strict metrics, as its table showed them
            metrics = report.get("strict_metrics") or report.get("metrics", {})
            row: dict[str, float | str] = {name: m["value"] for name, m in metrics.items()
                                           if isinstance(m, dict) and m.get("value") is not None}
            median = (report.get("distance") or {}).get("median_m")
            if median is not None:
                row["median error (m)"] = float(median)
            out[system] = row
        return out
    flat = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not flat:
        raise CardError(f"{path}: neither a benchmark.json (systems with 'report') nor a flat metrics.json")
    return {path.parent.name or "metrics": flat}


# --- the Hub ----------------------------------------------------------------------------------------

def add_hub_args(parser: argparse.ArgumentParser) -> None:
    """--push-to-hub / --hub-private / --benchmark / --license: the same flags on every exporting command."""
    parser.add_argument("--benchmark", default=None,
                        help="benchmark.json (address-llava benchmark) or metrics.json (eval-clip) whose numbers go "
                             "into the model card")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help=f"licence id in the card (default {DEFAULT_LICENSE})")
    parser.add_argument("--push-to-hub", "--push_to_hub", default=None, metavar="REPO",
                        help="upload the written folder to this Hub model repo (token: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--hub-private", action="store_true", help="create the Hub repo as private")


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, api=None,
                commit_message: str = "Upload with address-llava") -> str:
    """Creates `repo_id` (if needed) and uploads `folder`; returns the commit URL.

    api: an `huggingface_hub.HfApi`-like object (tests inject a stand-in); default HfApi() whose token
    comes from HF_TOKEN or the local login."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise CardError(f"--push-to-hub {repo_id!r}: expected a repo id 'namespace/name'")
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                             commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
