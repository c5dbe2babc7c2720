"""The model card an export carries holds the run's own numbers: its corpus's funnel, both stages'
settings and its last evaluations, as the run's files and funnel.json have them."""

import json

import yaml
from typer.testing import CliRunner

from cnclip.train.cli import app
from cnclip.train.model_card import run_evals


def _front_and_body(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    front, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_the_card_holds_the_funnel_config_and_evaluations_of_the_run(searchable_corpus, tmp_path):
    root = searchable_corpus.parent
    run = root / "run"
    result = CliRunner().invoke(app, ["export", str(run / "checkpoints" / "stage2-final.pt"),
                                      str(tmp_path / "exported"), "--license", "apache-2.0"])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "exported" / "README.md").read_text(encoding="utf-8")
    front, body = _front_and_body(card)
    assert (front["license"], front["language"], front["library_name"]) == ("apache-2.0", ["zh"], "open_clip")
    assert "clip" in front["tags"] and str(root) not in card and str(tmp_path) not in card

    # evaluations: the last record of each set in the run's log.jsonl (the run ends at stage 2's end)
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    last = {}
    for record in logged:
        if record["event"] == "eval":
            last[record["set"]] = record
    assert last and all(r["stage"] == 2 for r in last.values())
    results = {r["dataset"]["name"]: {m["type"]: m["value"] for m in r["metrics"]}
               for r in front["model-index"][0]["results"]}
    assert set(results) == set(last)
    for name, record in last.items():
        assert results[name]["mean_recall"] == record["mean_recall"]
        assert results[name]["image_to_text_R@1"] == record["image_to_text_R@1"]
        assert f"### {name} (stage 2, step {record['step']})" in body
        assert f"| mean_recall | {record['mean_recall']!r} |" in body
        assert f"| text_to_image_R@5 | {record['text_to_image_R@5']!r} |" in body

    # the data funnel: funnel.json of the manifest_dir the run's config names
    funnel = json.loads((searchable_corpus / "funnel.json").read_text(encoding="utf-8"))
    assert (f"{funnel['input_rows']} input rows, {funnel['samples']} samples, {funnel['rejected']} rejected"
            in body)
    for row in funnel["stages"]:
        assert f"| {row['stage']} | {row['in']} | {row['out']} | {sum(row['rejected'].values())} |" in body
    for reason, rows in funnel["rejected_by_reason"].items():
        assert f"| {reason} | {rows} |" in body

    # both stages' settings, from the config the run recorded
    config = json.loads((run / "run.json").read_text(encoding="utf-8"))["config"]
    for key in ("steps", "lr", "warmup", "weight_decay", "betas"):
        assert f"| {key} | {json.dumps(config['stage1'][key])} | {json.dumps(config['stage2'][key])} |" in body
    assert f"Model `{config['model']}`" in body


def test_evaluations_after_the_exported_checkpoint_are_not_its_results(tmp_path):
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"event": "eval", "stage": 1, "step": 0, "set": "val", "mean_recall": 1.0},
        {"event": "eval", "stage": 1, "step": 50, "set": "val", "mean_recall": 2.0},
        {"event": "eval", "stage": 2, "step": 10, "set": "val", "mean_recall": 3.0},
    ]) + "\n{\"event\": \"ev", encoding="utf-8")  # a line cut short by a crash
    assert run_evals(tmp_path, 1, 50)["val"]["mean_recall"] == 2.0
    assert run_evals(tmp_path, 2, 10)["val"]["mean_recall"] == 3.0
    assert run_evals(tmp_path, 1, 49)["val"]["mean_recall"] == 1.0
