"""What each of the two training stages trains, with which optimizer and learning-rate schedule.

Stage 1 (LiT) locks the whole image tower, its projection `visual.proj` included (as Chinese-CLIP's
`--freeze-vision` does), kept in eval mode so BatchNorm statistics stay frozen (open_clip's
`freeze_bn_stats` swaps in FrozenBatchNorm2d modules, which would change the state dict between
stages), and trains the text tower, the text projection and the temperature. Stage 2
unlocks everything with a fresh optimizer and schedule at stage 2's learning rate.

Kept apart from loop.py, which only calls these at each stage's start (and set_stage_mode after
every evaluation), so a stage's recipe reads without the loop's bookkeeping.
"""

from __future__ import annotations

import math

import torch


def set_stage_mode(model: torch.nn.Module, stage: int) -> None:
    """Which parameters train, and train/eval mode, for a stage (call after every model.train())."""
    if stage == 1:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
        for name, param in model.named_parameters():
            if not name.startswith("visual."):
                param.requires_grad = True
    else:
        for param in model.parameters():
            param.requires_grad = True
    model.train()
    if stage == 1:
        model.visual.eval()  # frozen BN statistics (and no dropout) in the locked tower


def make_optimizer(model: torch.nn.Module, stage_cfg) -> torch.optim.Optimizer:
    # open_clip_train's rule: no weight decay on gains, biases, norms and the temperature.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in params if not exclude(n, p)], "weight_decay": stage_cfg.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=stage_cfg.lr, betas=tuple(stage_cfg.betas), eps=stage_cfg.eps)


def make_scheduler(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:  # linear warm-up, then cosine decay to 0 at the stage's end
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
