"""Recall definitions on hand-made embeddings; a learnable set is learnt, a shuffled one is not."""

import pytest
import torch

from cnclip.train.evaluate import retrieval_metrics
from cnclip.train.loop import train
from cnclip.train.runlog import read_log
from test_train_support import class_names, shape_samples, tiny_config, write_shards


def unit(*rows):
    t = torch.tensor(rows, dtype=torch.float)
    return t / t.norm(dim=1, keepdim=True)


def test_recall_definitions_with_several_captions_per_image():
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    # Image 0 has two captions: one points at image 1 (a miss at R@1), one at itself.
    texts = unit([0.1, 1, 0], [1, 0.1, 0], [0, 1, 0], [0.6, 0, 1])
    owner = torch.tensor([0, 0, 1, 2])
    m = retrieval_metrics(images, texts, owner)
    # text->image R@1: caption 0 ranks image 1 first (miss); the others hit.
    assert m["text_to_image_R@1"] == pytest.approx(75.0)
    # image->text R@1: each image's most similar caption is one of its own (image 0's is caption 1),
    # so all hit although image 0's other caption is closer to image 1.
    assert m["image_to_text_R@1"] == pytest.approx(100.0)
    assert m["text_to_image_R@5"] == m["image_to_text_R@10"] == 100.0  # fewer than K candidates
    assert m["mean_recall"] == pytest.approx((75 + 100 + 100 + 100 + 100 + 100) / 6)
    assert (m["images"], m["texts"]) == (3, 4)


def test_images_without_captions_are_not_image_to_text_queries():
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    texts = unit([1, 0.1, 0], [0.1, 1, 0])  # image 2 has no caption: still a text->image candidate
    m = retrieval_metrics(images, texts, torch.tensor([0, 1]))
    assert m["image_to_text_R@1"] == m["text_to_image_R@1"] == 100.0  # not 66.7: image 2 is no query
    assert m["mean_recall"] == 100.0 and (m["images"], m["texts"]) == (3, 2)


def test_a_retrieval_set_without_captions_is_an_error(tmp_path):
    import webdataset as wds

    from cnclip.train.config import EvalSet
    from cnclip.train.evaluate import evaluate_set
    from cnclip.train.factory import transforms
    from cnclip.train.models import create_model
    from cnclip.train.tokenizer import BERT_BASE_CHINESE_VOCAB, ChineseTokenizer

    with wds.TarWriter(str(tmp_path / "labels.tar")) as writer:  # a zero-shot layout: images and classes only
        for i, sample in enumerate(shape_samples(4, seed=1)):
            writer.write({"__key__": f"k{i}", "jpg": sample["jpg"], "cls": str(sample["cls"])})
    with pytest.raises(ValueError, match="a retrieval set needs captions"):
        retrieval_metrics(unit([1, 0]), torch.empty(0, 2), torch.empty(0, dtype=torch.long))
    model, _ = create_model("cn-tiny", vocab_size=21128, workdir=tmp_path)
    eval_set = EvalSet(name="val", data=str(tmp_path / "labels.tar"))
    with pytest.raises(ValueError, match=r"eval.sets\[val\]: no captions .* a retrieval set needs them") as err:
        evaluate_set(model, ChineseTokenizer.from_file(BERT_BASE_CHINESE_VOCAB), eval_set, transforms(model)[1],
                     device=torch.device("cpu"))
    assert "\n" not in str(err.value)


def test_top_k_recall_matches_a_full_sort():
    torch.manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(60, 8), dim=1)
    owner = torch.randint(0, 50, (90,))  # some images with several captions, images 50-59 with none
    texts = torch.nn.functional.normalize(images[owner] + 0.8 * torch.randn(90, 8), dim=1)
    m = retrieval_metrics(images, texts, owner)
    sims = texts @ images.T
    ranked_images = sims.argsort(dim=1, descending=True)
    queries = sorted(set(owner.tolist()))
    ranked_texts = sims.T[queries].argsort(dim=1, descending=True)
    for k in (1, 5, 10):
        t2i = (ranked_images[:, :k] == owner[:, None]).any(1).float().mean().item() * 100
        i2t = (owner[ranked_texts[:, :k]] == torch.tensor(queries)[:, None]).any(1).float().mean().item() * 100
        assert m[f"text_to_image_R@{k}"] == pytest.approx(t2i) and m[f"image_to_text_R@{k}"] == pytest.approx(i2t)


def test_chance_recall_for_random_embeddings():
    torch.manual_seed(0)
    images, texts = torch.nn.functional.normalize(torch.randn(500, 32), dim=1), None
    texts = torch.nn.functional.normalize(torch.randn(500, 32), dim=1)
    m = retrieval_metrics(images, texts, torch.arange(500))
    assert m["text_to_image_R@10"] == pytest.approx(2.0, abs=1.5)  # 10 / 500


@pytest.fixture(scope="module")
def shape_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("learnable")
    train_samples = shape_samples(384, seed=11)
    learnable = write_shards(root / "train", train_samples, per_shard=96)
    shuffled = write_shards(root / "shuffled", train_samples, per_shard=96, shuffle_captions=True, seed=1)
    heldout = write_shards(root / "eval", shape_samples(192, seed=12), per_shard=192, with_cls=True)
    (root / "classes.txt").write_text("\n".join(class_names()), encoding="utf-8")
    # Prompts in the training captions' style (the built-in ones are photo-style ImageNet prompts).
    (root / "templates.txt").write_text("画着{}的图片\n浅色背景上的{}\n这是一个{}\n", encoding="utf-8")
    return root, learnable, shuffled, heldout


def run(root, shards, heldout):
    cfg = tiny_config(root, shards, batch_size=32, log_every=20,
                      eval={"sets": [{"name": "val", "data": heldout},
                                     {"name": "zs", "kind": "zeroshot", "data": heldout,
                                      "classnames": str(root.parent / "classes.txt"),
                                      "templates": str(root.parent / "templates.txt")}]},
                      stage1={"steps": 50, "lr": 2e-3}, stage2={"steps": 100, "lr": 1e-3})
    summary = train(cfg)
    return summary["stages"][2]["evals"][-1]["sets"], summary


# 192 held-out images: chance mean recall = (1 + 5 + 10) / 3 / 192 * 100 ≈ 2.8%; zero-shot chance 1/24.
CHANCE_RECALL = 100 * (1 + 5 + 10) / 3 / 192


def test_learnable_set_far_above_chance(shape_sets):
    root, learnable, _, heldout = shape_sets
    final, summary = run(root / "learnable", learnable, heldout)
    assert final["val"]["mean_recall"] > 6 * CHANCE_RECALL, final
    assert final["zs"]["top1"] > 5 * 100 / 24, final
    # The before/after figures: recall rose from chance during training.
    before = summary["stages"][1]["evals"][0]["sets"]["val"]["mean_recall"]
    assert before < 2.5 * CHANCE_RECALL < final["val"]["mean_recall"]
    assert read_log(root / "learnable" / "run", "eval")[-1]["set"] == "zs"


def test_shuffled_captions_stay_at_chance(shape_sets):
    root, _, shuffled, heldout = shape_sets
    final, _ = run(root / "shuffled", shuffled, heldout)
    assert final["val"]["mean_recall"] < 2.5 * CHANCE_RECALL, final
    assert final["zs"]["top1"] < 2.5 * 100 / 24, final
