"""The trainer's step (contrastive loss, accumulation, temperature clamp, grad clip), its
optimizer groups and schedule, and the tokenizer's edges — on a two-layer stand-in model so each
test runs in milliseconds."""

import math
import types

import open_clip
import pytest
import torch
import torch.nn.functional as F

from cnclip.train.distributed import Runtime
from cnclip.train.loop import Trainer
from cnclip.train.stages import make_optimizer, make_scheduler
from cnclip.train.tokenizer import MAX_CHARS_PER_WORD, SPECIAL_TOKENS, ChineseTokenizer, build_corpus_vocab, read_vocab

LOG_TEN = math.log(10.0)


class TinyClip(torch.nn.Module):
    """open_clip's forward contract: (image features, text features, logit scale), normalized."""

    def __init__(self, scale=LOG_TEN):
        super().__init__()
        torch.manual_seed(0)
        self.visual = torch.nn.Linear(6, 4)
        self.text = torch.nn.Embedding(30, 4)
        self.ln_final = torch.nn.LayerNorm(4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, image, text):
        img = F.normalize(self.visual(image), dim=-1)
        txt = F.normalize(self.ln_final(self.text(text).mean(1)), dim=-1)
        return img, txt, self.logit_scale.exp()


def trainer(max_logit_scale=100.0):
    return types.SimpleNamespace(rt=Runtime("cpu"), loss_fn=open_clip.ClipLoss(),
                                 cfg=types.SimpleNamespace(precision="fp32", max_logit_scale=max_logit_scale))


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 6, generator=g), "text": torch.randint(0, 30, (n, 5), generator=g)}


def step(model, micro, lr=0.0, grad_clip=None, max_logit_scale=100.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return Trainer._step(trainer(max_logit_scale), model, model, micro, optimizer, scaler, grad_clip)


def reference_loss(model, b):
    img, txt, scale = model(b["image"], b["text"])
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_step_returns_the_symmetric_contrastive_loss_detached():
    model, b = TinyClip(), batch()
    expected = reference_loss(model, b).item()
    loss = step(model, [b])
    assert not loss.requires_grad and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("start, cap, expected", [
    (math.log(200.0), 100.0, math.log(100.0)),   # above the cap: clamped to it
    (math.log(200.0), 50.0, math.log(50.0)),     # the cap comes from the config
    (-0.5, 100.0, 0.0),                          # below a scale of 1: clamped to 0
    (math.log(30.0), 100.0, math.log(30.0)),     # inside: untouched (lr 0)
])
def test_temperature_is_clamped_after_the_step(start, cap, expected):
    model = TinyClip(scale=start)
    step(model, [batch()], max_logit_scale=cap)
    assert model.logit_scale.item() == pytest.approx(expected, abs=1e-6)


def test_the_optimizer_steps_and_the_gradient_is_this_steps_only():
    model = TinyClip()
    before = model.visual.weight.detach().clone()
    step(model, [batch()], lr=0.1)
    assert not torch.equal(before, model.visual.weight)
    fresh = TinyClip()
    step(fresh, [batch(seed=2)])
    once = fresh.visual.weight.grad.clone()
    step(fresh, [batch(seed=2)])  # gradients of an earlier step must not add up
    torch.testing.assert_close(fresh.visual.weight.grad, once)


def test_grad_clip_bounds_the_update():
    model = TinyClip(scale=math.log(80.0))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(model, [batch()], lr=1.0, grad_clip=1e-3)
    moved = torch.sqrt(sum(((p.detach() - params[n]) ** 2).sum() for n, p in model.named_parameters()))
    assert 0 < moved.item() <= 1e-3 * 1.001
    free = TinyClip(scale=math.log(80.0))
    step(free, [batch()], lr=1.0)
    moved_free = torch.sqrt(sum(((p.detach() - params[n]) ** 2).sum() for n, p in free.named_parameters()))
    assert moved_free.item() > 1e-2


@pytest.mark.parametrize("sizes", [[4, 4], [2, 2, 4]])
def test_accumulated_micro_batches_give_the_large_batchs_loss_and_gradients(sizes):
    big_model, b = TinyClip(), batch(8)
    big_loss = step(big_model, [b]).item()
    model = TinyClip()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    micro = [{k: v[s:s + n] for k, v in b.items()} for s, n in zip(starts, sizes, strict=True)]
    loss = step(model, micro).item()
    assert loss == pytest.approx(big_loss, rel=1e-5)
    for (name, p), (_, q) in zip(big_model.named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert model.logit_scale.grad.abs().item() > 1e-5


def test_optimizer_groups_exclude_gains_biases_norms_and_the_temperature():
    model = TinyClip()
    model.visual.bias.requires_grad_(False)
    cfg = types.SimpleNamespace(weight_decay=0.2, lr=3e-4, betas=[0.9, 0.98], eps=1e-6)
    optimizer = make_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay, decay = optimizer.param_groups
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["ln_final.bias", "ln_final.weight", "logit_scale"]
    assert sorted(names[id(p)] for p in decay["params"]) == ["text.weight", "visual.weight"]
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.2)
    assert (decay["lr"], decay["betas"], decay["eps"]) == (3e-4, (0.9, 0.98), 1e-6)
    assert isinstance(optimizer, torch.optim.AdamW)


def test_named_norm_and_bias_matrices_get_no_decay():
    model = torch.nn.Module()
    for name in ("bn_scale", "ln_gain", "bias_table", "logit_scale_grid", "proj"):
        model.register_parameter(name, torch.nn.Parameter(torch.ones(2, 2)))
    optimizer = make_optimizer(model, types.SimpleNamespace(weight_decay=0.1, lr=1.0, betas=[0.9, 0.9], eps=1e-8))
    assert [len(g["params"]) for g in optimizer.param_groups] == [4, 1]


def lr_factors(warmup, total, steps):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, warmup, total)
    return [scheduler.lr_lambdas[0](s) for s in steps]


def test_schedule_warms_up_linearly_then_decays_to_zero():
    assert lr_factors(4, 12, [0, 1, 3, 4, 8, 12, 20]) == pytest.approx([0.25, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0], abs=1e-12)


def test_schedule_without_warmup_or_length():
    assert lr_factors(0, 10, [0, 5]) == pytest.approx([1.0, 0.5])
    assert lr_factors(3, 3, [2, 3, 4]) == pytest.approx([1.0, 1.0, 0.0], abs=1e-12)  # total == warmup: no 0/0


# --- tokenizer -------------------------------------------------------------------------------

VOCAB = SPECIAL_TOKENS + ["猫", "狗", "a", "##b", "ab", "的"]


def test_ids_are_cls_tokens_sep_then_padding():
    tok = ChineseTokenizer(VOCAB, context_length=6)
    assert tok("猫的狗").tolist() == [[2, 5, 10, 6, 3, 0]]
    assert tok(["猫猫猫猫猫猫猫", "狗"]).tolist() == [[2, 5, 5, 5, 5, 3], [2, 6, 3, 0, 0, 0]]
    assert tok("猫猫猫猫", context_length=4).tolist() == [[2, 5, 5, 3]]
    assert tok("猫").dtype == torch.long


def test_unknown_words_and_the_word_length_cap():
    tok = ChineseTokenizer(VOCAB + ["x", "##x"], context_length=4)
    assert tok.tokenize("鱼") == ["[UNK]"]
    assert tok.tokenize("AB") == ["ab"]  # lowercased
    assert tok.tokenize("x" * MAX_CHARS_PER_WORD) == ["x"] + ["##x"] * (MAX_CHARS_PER_WORD - 1)
    assert tok.tokenize("x" * (MAX_CHARS_PER_WORD + 1)) == ["[UNK]"]


def test_missing_special_tokens_are_named():
    with pytest.raises(ValueError, match=r"^vocab lacks the special tokens \[CLS\], \[MASK\]$"):
        ChineseTokenizer(["[PAD]", "[UNK]", "[SEP]", "猫"])


def test_ids_follow_the_vocab_order():
    vocab = ["猫", "[SEP]", "[MASK]", "[CLS]", "[UNK]", "[PAD]"]
    tok = ChineseTokenizer(vocab, context_length=4)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (5, 4, 3, 1)
    assert tok("猫鱼").tolist() == [[3, 0, 4, 1]]
    assert tok("").tolist() == [[3, 1, 5, 5]]


def test_save_writes_what_hf_reads(tmp_path):
    import json

    tok = ChineseTokenizer(VOCAB, context_length=7)
    tok.save(tmp_path / "t")
    assert (tmp_path / "t" / "vocab.txt").read_text(encoding="utf-8") == "\n".join(VOCAB) + "\n"
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config == {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
                      "strip_accents": None, "model_max_length": 7, "pad_token": "[PAD]", "unk_token": "[UNK]",
                      "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    again = ChineseTokenizer.from_file(tmp_path / "t" / "vocab.txt", context_length=7)
    assert again.vocab == VOCAB and again.vocab_size == len(VOCAB) and again.context_length == 7


def test_read_vocab_keeps_order_and_blank_tokens(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]  \n\n猫\t\n狗\n", encoding="utf-8")
    assert read_vocab(path) == ["[PAD]", "", "猫", "狗"]
    path.write_text("[PAD]\n猫", encoding="utf-8")
    assert read_vocab(path) == ["[PAD]", "猫"]


def test_corpus_vocab_orders_by_count_and_marks_word_pieces():
    # words: 猫 猫 狗 abc | 猫 ab -> 猫 3, a 2, ##b 2, ##c 1, 狗 1; ties by token
    assert build_corpus_vocab(["猫猫狗 abc", "猫 ab"]) == SPECIAL_TOKENS + ["猫", "##b", "a", "##c", "狗"]
    assert build_corpus_vocab(["猫猫狗 abc", "猫 ab"], min_count=2) == SPECIAL_TOKENS + ["猫", "##b", "a"]
    assert build_corpus_vocab(["[PAD]"]) == SPECIAL_TOKENS + ["##a", "##d", "[", "]", "p"]


def test_chinese_clips_context_length_is_the_default(tmp_path):
    assert ChineseTokenizer(VOCAB)("猫").shape == (1, 52)
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    assert ChineseTokenizer.from_file(tmp_path / "vocab.txt").context_length == 52


def test_control_characters_are_cleaned_not_unknown():
    assert ChineseTokenizer(VOCAB).tokenize("猫\x07狗\x00") == ["猫", "狗"]


class BiasedClip(TinyClip):
    """A model that also returns a logit bias (open_clip's SigLIP-style 4th output)."""

    def forward(self, image, text):
        return (*super().forward(image, text), torch.tensor(0.0))


@pytest.mark.parametrize("sizes", [[8], [4, 4]])
def test_a_fourth_model_output_is_ignored(sizes):
    b = batch(8)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    micro = [{k: v[s:s + n] for k, v in b.items()} for s, n in zip(starts, sizes, strict=True)]
    assert step(BiasedClip(), micro).item() == pytest.approx(step(TinyClip(), [b]).item(), rel=1e-5)


@pytest.mark.parametrize("sizes", [[8], [4, 4]])
def test_bf16_autocast_runs_on_the_runtimes_device(sizes):
    b = batch(8)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    micro = [{k: v[s:s + n] for k, v in b.items()} for s, n in zip(starts, sizes, strict=True)]
    model = TinyClip()
    t = trainer()
    t.cfg.precision = "bf16"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = Trainer._step(t, model, model, micro, optimizer, torch.amp.GradScaler("cuda", enabled=False), None)
    assert loss.item() == pytest.approx(reference_loss(TinyClip(), b).item(), rel=0.05)


class Moved:
    """A batch tensor that records where the step moves it."""

    def __init__(self, tensor, seen):
        self.tensor, self.seen = tensor, seen

    def to(self, device, non_blocking=False):
        self.seen.append(torch.device(device))
        return self.tensor


class FakeDDP:
    """DistributedDataParallel's surface: forward, and no_sync() for passes that must not all-reduce."""

    def __init__(self, model, passes):
        self.model, self.passes, self.in_no_sync = model, passes, False

    def __call__(self, image, text):
        if torch.is_grad_enabled():
            self.passes.append("no_sync" if self.in_no_sync else "sync")
        return self.model(image, text)

    def no_sync(self):
        ddp = self

        class Context:
            def __enter__(self):
                ddp.in_no_sync = True

            def __exit__(self, *exc):
                ddp.in_no_sync = False

        return Context()


def test_batches_go_to_the_device_and_only_the_last_pass_all_reduces():
    seen, passes = [], []
    b = batch(9)
    micro = [{k: Moved(v[s:s + 3], seen) for k, v in b.items()} for s in (0, 3, 6)]
    model = TinyClip()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    Trainer._step(trainer(), FakeDDP(model, passes), model, micro, optimizer,
                  torch.amp.GradScaler("cuda", enabled=False), None)
    assert seen == [torch.device("cpu")] * 6
    assert passes == ["no_sync", "no_sync", "sync"]
    reference = TinyClip()
    step(reference, [b])
    torch.testing.assert_close(model.logit_scale.grad, reference.logit_scale.grad, rtol=1e-4, atol=1e-7)


class RecordingClip(TinyClip):
    """Records the dtype its image tower computes in, per forward pass."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def forward(self, image, text):
        self.dtypes.append(self.visual(image).dtype)
        return super().forward(image, text)


@pytest.mark.parametrize("sizes", [[8], [4, 4]])
def test_every_pass_runs_under_the_configured_precision(sizes):
    b = batch(8)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    micro = [{k: v[s:s + n] for k, v in b.items()} for s, n in zip(starts, sizes, strict=True)]
    model, t = RecordingClip(), trainer()
    t.cfg.precision = "bf16"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    Trainer._step(t, model, model, micro, optimizer, torch.amp.GradScaler("cuda", enabled=False), None)
    passes = 1 if len(sizes) == 1 else 2 * len(sizes)  # accumulation: a cached pass and a gradient pass each
    assert model.dtypes == [torch.bfloat16] * passes


def test_save_makes_missing_parent_folders(tmp_path):
    ChineseTokenizer(VOCAB).save(tmp_path / "export" / "text")
    assert (tmp_path / "export" / "text" / "vocab.txt").is_file()


def test_an_unreadable_vocab_is_one_line_naming_the_file_and_why(tmp_path):
    from cnclip.train.tokenizer import TokenizerError, read_vocab

    with pytest.raises(TokenizerError) as err:
        read_vocab(tmp_path / "vocab.txt")
    assert str(err.value) == f"{tmp_path / 'vocab.txt'}: cannot read the vocab (No such file or directory)"
    (tmp_path / "bad.txt").write_bytes(b"[PAD]\n\xff\n")
    with pytest.raises(TokenizerError, match=r"bad.txt: cannot read the vocab \('utf-8' codec can't decode"):
        read_vocab(tmp_path / "bad.txt")
