"""Training configs: validation errors name the file and the key; the shipped recipes load."""

import pytest

from cnclip.train.config import ConfigError, load_config, parse_config
from conftest import REPO

BASE = {
    "output_dir": "runs/x", "model": "cn-tiny", "data": {"train": "shards/*.tar"}, "batch_size": 8,
    "stage1": {"steps": 10, "lr": 1e-4}, "stage2": {"steps": 10, "lr": 2e-5},
}


def with_(**changes):
    data = {**BASE}
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def test_shipped_recipes_load_with_the_paper_settings():
    demo = load_config(REPO / "recipes" / "train-demo.yaml")
    assert demo.model == "cn-tiny" and demo.stage1.steps > 0 and demo.stage2.steps > 0
    vit = load_config(REPO / "recipes" / "train-vit-b-16.yaml")
    assert vit.model == "cn-ViT-B-16" and vit.tokenizer.context_length == 52 and vit.max_logit_scale == 100
    assert (vit.stage1.lr, vit.stage1.warmup, vit.stage1.weight_decay) == (1e-4, 5000, 1e-3)
    assert vit.stage2.lr == 2e-5 and vit.global_batch_size == 32768
    # The global batch holds whatever the process count: accumulation makes up the difference.
    assert [vit.accumulation(n) for n in (128, 64, 32)] == [1, 2, 4]
    assert vit.global_batch(32) == 32768


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"bogus": 1}, "cfg.yaml: bogus: unknown key"),
        ({"stage1": {"lr": "fast"}}, "cfg.yaml: stage1.lr: Input should be a valid number"),
        ({"stage1": {"steps": None}}, "cfg.yaml: stage1: Value error, give exactly one of steps or samples"),
        ({"data": {"train": None}}, "give data.train (shard patterns), data.corpus (a corpus recipe) or data.manifest_dir"),
        ({"data": {"corpus": "recipes/demo.yaml"}}, "give one of data.train (shard patterns) or data.corpus"),
        ({"precision": "fp8"}, "cfg.yaml: precision: Input should be 'fp32', 'bf16' or 'fp16'"),
        ({"data": {"shuffle_buffer": -1}}, "cfg.yaml: data.shuffle_buffer: Input should be greater than or equal to 0"),
        ({"eval": {"sets": [{"name": "a", "kind": "zeroshot", "data": "x.tar"}]}},
         "cfg.yaml: eval.sets[0]: Value error, a zeroshot set needs classnames"),
        ({"global_batch_size": 100}, "global_batch_size (100) is not a multiple of batch_size (8)"),
        ({"stage1": {"patience": 2}}, "stage1.patience needs a retrieval set in eval.sets"),
        ({"stage1": {"patience": 2}, "eval": {"sets": [{"name": "v", "data": "v.tar"}]}},
         "stage1.patience needs eval.every"),
        ({"init": {"clip": "a.pt", "image": "b.pt"}}, "init.clip loads both towers"),
    ],
)
def test_errors_name_file_and_key(changes, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(with_(**changes), "cfg.yaml")
    assert expected in str(info.value)


def test_yaml_problems_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_samples_convert_to_steps_and_overrides_merge(tmp_path):
    cfg = parse_config(with_(stage1={"steps": None, "samples": 1000}))
    assert cfg.stage1.total_steps(global_batch=64) == 16  # ceil(1000 / 64)
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(BASE), encoding="utf-8")
    merged = load_config(path, {"stage2": {"lr": 3e-5}, "data": {"workers": 0}})
    assert merged.stage2.lr == 3e-5 and merged.stage2.steps == 10 and merged.data.workers == 0
    assert merged.data.train == "shards/*.tar"
