"""The model card an export carries (`DIR/README.md`, Hugging Face's layout: YAML front matter,
then Markdown): the data funnel of the corpus the run trained on, both stages' settings, the
evaluation results and how to load the folder.

Everything comes from what the run itself wrote, never from memory: the resolved config the
checkpoint carries, the run's `log.jsonl` (its evaluations; the last of each set at or before the
exported checkpoint's stage and step) and the corpus's `funnel.json` (found through the config's
`data.manifest_dir`, or the manifest_dir of its `data.corpus` recipe). What cannot be read is said
in the card, not guessed. The results are also in the front matter's `model-index`, exactly as
logged, for tools that read cards. Paths appear by file name only: the card travels with the
folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

TAGS = ["clip", "chinese-clip", "cnclip", "zero-shot-image-classification", "image-text-retrieval"]
_PATH_KEYS = {"output_dir", "train", "corpus", "manifest_dir", "image", "text", "clip", "vocab", "data",
              "classnames", "templates"}


def _read_json(path: Path) -> Optional[dict]:
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def run_evals(run_dir: Path, stage: int, step: int) -> dict[str, dict]:
    """set name -> its last eval record at or before (stage, step), from the run's log.jsonl
    (lines cut short by a crash are skipped)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return {}
    last: dict[str, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if (isinstance(record, dict) and record.get("event") == "eval" and isinstance(record.get("set"), str)
                and (record.get("stage", 0), record.get("step", 0)) <= (stage, step)):
            last[record["set"]] = record
    return last


def corpus_funnel(config: dict) -> tuple[Optional[dict], str]:
    """(funnel.json of the run's corpus or None, where it was looked for / why not)."""
    data = config.get("data", {})
    manifest_dir = data.get("manifest_dir")
    if manifest_dir is None and data.get("corpus"):
        try:
            from cnclip.corpus.recipe import load_recipe

            manifest_dir = load_recipe(data["corpus"]).manifest_dir
        except Exception as err:  # noqa: BLE001 - a recipe moved or changed since: the card says so
            return None, f"the run's corpus recipe {Path(data['corpus']).name} cannot be read ({type(err).__name__})"
    if manifest_dir is None:
        return None, "the run trained on shard patterns (data.train), which name no corpus manifests"
    if "://" in str(manifest_dir):
        try:
            from cnclip.corpus.runtime import storage

            return json.loads(storage.read_text(f"{str(manifest_dir).rstrip('/')}/funnel.json")), str(manifest_dir)
        except Exception as err:  # noqa: BLE001 - offline or gone: the card says so
            return None, f"{manifest_dir}/funnel.json cannot be read ({type(err).__name__})"
    funnel = _read_json(Path(manifest_dir) / "funnel.json")
    return funnel, f"{Path(manifest_dir).name}/funnel.json" + ("" if funnel else " cannot be read")


def _shown(key: str, value: Any) -> Any:
    """A config value as the card shows it: paths by their file name."""
    if key in _PATH_KEYS and isinstance(value, str):
        return value.rstrip("/").rpartition("/")[2] or value
    if key in _PATH_KEYS and isinstance(value, list):
        return [_shown(key, v) for v in value]
    if isinstance(value, dict):
        return {k: _shown(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shown(key, v) for v in value]
    return value


def _funnel_section(funnel: Optional[dict], where: str) -> list[str]:
    if funnel is None:
        return ["## Training data", "", f"No data funnel: {where}.", ""]
    lines = ["## Training data", "",
             f"Corpus `{funnel.get('name')}` (built by cnclip; {where}): {funnel.get('input_rows')} input rows, "
             f"{funnel.get('samples')} samples, {funnel.get('rejected')} rejected.", "",
             "| stage | in | out | rejected |", "|---|---:|---:|---:|"]
    for row in funnel.get("stages", []):
        rejected = sum(row.get("rejected", {}).values())
        lines.append(f"| {row.get('stage')} | {row.get('in')} | {row.get('out')} | {rejected} |")
    reasons = sorted(funnel.get("rejected_by_reason", {}).items(), key=lambda item: (-item[1], item[0]))
    if reasons:
        lines += ["", "| reject reason | rows |", "|---|---:|"] + [f"| {r} | {n} |" for r, n in reasons]
    return lines + [""]


def _config_section(config: dict) -> list[str]:
    stages = [config.get("stage1", {}), config.get("stage2", {})]
    keys = list(dict.fromkeys(k for s in stages for k in s))
    lines = ["## Training", "", f"Model `{_shown('model', config.get('model'))}`, trained in two stages (the "
             "Chinese CLIP paper's recipe): stage 1 with the image tower locked, stage 2 with both towers.", "",
             "| setting | stage 1 | stage 2 |", "|---|---|---|"]
    lines += [f"| {k} | {json.dumps(stages[0].get(k))} | {json.dumps(stages[1].get(k))} |" for k in keys]
    rest = {k: _shown(k, v) for k, v in config.items() if k not in ("stage1", "stage2")}
    lines += ["", "The whole resolved config (paths by file name):", "", "```yaml",
              yaml.safe_dump(rest, allow_unicode=True, sort_keys=False).rstrip(), "```", ""]
    return lines


def _number(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _eval_section(evals: dict[str, dict]) -> list[str]:
    if not evals:
        return ["## Evaluation", "", "The run logged no evaluation up to this checkpoint.", ""]
    lines = ["## Evaluation", "", "The last evaluation of each set up to the exported checkpoint, from the run's "
             "log.jsonl (retrieval: Recall@K in percent, mean recall = the mean of the six; zero-shot: accuracy).", ""]
    for name, record in evals.items():
        metrics = {k: v for k, v in record.items() if k not in ("time", "event", "stage", "step", "set")}
        lines += [f"### {name} (stage {record.get('stage')}, step {record.get('step')})", "",
                  "| metric | value |", "|---|---:|"] + [f"| {k} | {_number(v)} |" for k, v in metrics.items()] + [""]
    return lines


def _model_index(name: str, evals: dict[str, dict]) -> list[dict]:
    results = []
    for set_name, record in evals.items():
        metrics = [{"type": k, "value": v} for k, v in record.items()
                   if isinstance(v, float) and k != "time"]  # the scores; counts (images, texts) stay in the body
        task = "zero-shot-image-classification" if "top1" in record else "image-text-retrieval"
        results.append({"task": {"type": task}, "dataset": {"name": set_name, "type": set_name}, "metrics": metrics})
    return [{"name": name, "results": results}] if results else []


LOADING = """## How to load

```python
import json, open_clip
d = "path/to/this/folder"
text_cfg = json.load(open(f"{d}/open_clip_config.json", encoding="utf-8"))["model_cfg"]["text_cfg"]
model, _, preprocess = open_clip.create_model_and_transforms(
    f"local-dir:{d}", text_cfg={**text_cfg, "hf_model_name": d})   # the text tower's config is in this folder
tokenizer = open_clip.get_tokenizer(f"local-dir:{d}")
```

open_clip resolves `text_cfg.hf_model_name` (`"."`, this folder) from the working directory, so
from inside the folder `open_clip.create_model_and_transforms("local-dir:.")` alone works too. With
cnclip installed: `cnclip.embed.encoder.load_encoder(d)`, or
`open_clip.create_model_and_transforms(f"local-dir:{d}", **cnclip.train.export.open_clip_kwargs(d))`.
"""


def model_card(config: dict, state: dict, run_dir: Optional[Path], license: str = "other") -> str:
    """The card's text for a checkpoint's `state` of the run with resolved `config`."""
    stage, step = int(state.get("stage") or 0), int(state.get("step") or 0)
    # A Chinese-CLIP checkpoint has no cnclip run behind it: no stage, no run log to read.
    foreign = state.get("stage") is None
    evals = run_evals(run_dir, stage, step) if run_dir is not None and not foreign else {}
    funnel, where = corpus_funnel(config)
    name = str(config.get("name", "cnclip"))
    front = {"license": license, "language": ["zh"], "library_name": "open_clip", "tags": TAGS,
             "pipeline_tag": "zero-shot-image-classification"}
    if index := _model_index(name, evals):
        front["model-index"] = index
    body = [f"# {name}", "",
            (f"A Chinese-CLIP (cn_clip) checkpoint converted by cnclip (its step {step})." if foreign else
             f"A Chinese CLIP model trained with cnclip: checkpoint stage {stage}, step {step}"
             f"{'' if state.get('stage_complete') else ' (the stage was not finished)'}.")
            + " An open_clip `local-dir:` model; this folder can be moved.", ""]
    body += _funnel_section(funnel, where) + _config_section(config) + _eval_section(evals)
    front_matter = yaml.safe_dump(front, allow_unicode=True, sort_keys=False)
    return "---\n" + front_matter + "---\n\n" + "\n".join(body) + "\n" + LOADING
