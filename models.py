"""SimMIM models: Swin / SwinV2 / ViT encoders with a mask token, the SimMIM wrapper and the model builders.

The encoders are timm's backbones; we only add what SimMIM needs: a learned mask token that replaces the embeddings
of masked patches right after the patch embedding, an output reshaped to a feature map, and fused attention (which
the scripts use on GPUs).

    model = build_simmim('swin_base')              # 192px, window 6: the paper's Swin-B
    loss = model(images, mask)                     # images (B, 3, 192, 192), mask (B, 48, 48) with 1 = masked
    pictures = model.reconstruct(images, mask)     # (B, 3, 192, 192), same normalisation as the input
    classifier = build_classifier('swin_base', num_classes=1000)   # 224px, window 7, for fine-tuning
    report = load_pretrained(classifier, torch.load('ckpt.pth', weights_only=True))   # window 6 -> 7 tables resized
    pooled, feature_map = extract_features(classifier, images)
"""
import difflib
import functools
import json
import math
import os
import pickle
import re
import urllib.error

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import ImageNetInfo
from timm.layers import trunc_normal_
from timm.models import adapt_input_conv
from timm.models.beit import Beit
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2, WindowAttention as WindowAttentionV2

# ---------------------------------------------------------------------------------------------------------------------
# Named models. `window_div`: the default window is img_size // window_div, which gives the official windows
# (Swin-T/S/B: 6 at 192px, 7 at 224px; Swin-L and SwinV2: 12 at 192px, 14 at 224px). `drop_path`: the official
# (pretrain, fine-tune) stochastic depth rates.

SWIN, SWINV2, VIT = 'swin', 'swinv2', 'vit'
MODELS = {
    'swin_tiny': dict(family=SWIN, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_div=32,
                      drop_path=(0.0, 0.1)),
    'swin_small': dict(family=SWIN, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_div=32,
                       drop_path=(0.0, 0.1)),
    'swin_base': dict(family=SWIN, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_div=32,
                      drop_path=(0.0, 0.1)),
    'swin_large': dict(family=SWIN, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_div=16,
                       drop_path=(0.0, 0.2)),
    'swinv2_tiny': dict(family=SWINV2, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_div=16,
                        drop_path=(0.1, 0.1)),
    'swinv2_small': dict(family=SWINV2, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_div=16,
                         drop_path=(0.1, 0.1)),
    'swinv2_base': dict(family=SWINV2, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_div=16,
                        drop_path=(0.1, 0.1)),
    'swinv2_large': dict(family=SWINV2, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_div=16,
                         drop_path=(0.1, 0.2)),
    'vit_small': dict(family=VIT, embed_dim=384, depth=12, num_heads=6, drop_path=(0.1, 0.1)),
    'vit_base': dict(family=VIT, embed_dim=768, depth=12, num_heads=12, drop_path=(0.1, 0.1)),
    'vit_large': dict(family=VIT, embed_dim=1024, depth=24, num_heads=16, drop_path=(0.1, 0.2)),
}


# ---------------------------------------------------------------------------------------------------------------------
# Encoders

def apply_mask_token(x, mask, mask_token):
    """Replace the embeddings of masked patches: x (B, ..., C), mask (B, ...) with 1 = masked, mask_token (1, 1, C)."""
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the patch grid {tuple(x.shape[:-1])}: "
                         f"make the mask with model_patch_size = the encoder's patch size and the same image size")
    w = mask.unsqueeze(-1).type_as(x)
    return x * (1 - w) + mask_token.to(x.dtype) * w


class FusedWindowAttentionV2(WindowAttentionV2):
    """timm's SwinV2 window attention (cosine attention, log-spaced continuous position bias) through
    scaled_dot_product_attention; same parameters and outputs, without materialising the attention matrix."""

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv_bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1. / 0.01)).exp()
        q = F.normalize(q, dim=-1) * logit_scale
        k = F.normalize(k, dim=-1)
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = 16 * torch.sigmoid(table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1))
        bias = bias.unsqueeze(0)  # (1, nH, N, N)
        if mask is not None:  # shifted windows: (nW, N, N) of 0 / -100, windows are batch-major
            nw = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.view(1, nw, 1, N, N)).expand(B_ // nw, -1, -1, -1, -1)
            bias = bias.reshape(-1, self.num_heads, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0,
                                           dropout_p=self.attn_drop.p if self.training else 0.)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, C)))


def use_fused_attention(model, enable=True):
    """Turn scaled_dot_product_attention on (or off) in every attention layer; timm leaves it off for Swin. The
    scripts turn it off on CPUs, where the explicit softmax was measured faster (README: Performance)."""
    for m in model.modules():
        if isinstance(m, WindowAttentionV2):
            m.__class__ = FusedWindowAttentionV2 if enable else WindowAttentionV2
        elif hasattr(m, 'fused_attn'):
            m.fused_attn = enable
    return model


class MaskedSwin:
    """Adds SimMIM's mask token to timm's Swin / SwinV2 (mixed in first): forward(x, mask) -> (B, C, H/32, W/32)."""

    def __init__(self, **kwargs):
        super().__init__(num_classes=0, **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, std=.02)
        use_fused_attention(self)

    def forward(self, x, mask=None):
        x = self.patch_embed(x)  # (B, H/4, W/4, C), after the patch norm
        if mask is not None:
            x = apply_mask_token(x, mask, self.mask_token)
        x = self.norm(self.layers(x))
        return x.permute(0, 3, 1, 2)


class SwinEncoder(MaskedSwin, SwinTransformer):
    pass


class SwinV2Encoder(MaskedSwin, SwinTransformerV2):
    pass


class ViTEncoder(Beit):
    """The paper's ViT (timm's BEiT: no absolute position embedding, one relative position bias shared by all blocks,
    layer scale, q/v biases) with a mask token: forward(x, mask) -> (B, C, H/16, W/16), the cls token dropped."""

    def __init__(self, **kwargs):
        super().__init__(num_classes=0, global_pool='', use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
                         **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        # The official SimMIM ViT's init: every linear layer, the patch embedding and both tokens from N(0, 0.02)
        # truncated at +-0.02 (an effective std of 0.0108; timm's BEiT truncates at +-2 and leaves the patch
        # embedding at PyTorch's default), biases 0, then BEiT's rescaling of each block's output projections.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_(m.weight, std=.02, a=-.02, b=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for token in (self.cls_token, self.mask_token):
            trunc_normal_(token, std=.02, a=-.02, b=.02)
        self.fix_init_weight()
        use_fused_attention(self)

    def forward(self, x, mask=None):
        x = self.patch_embed(x)  # (B, N, C)
        if mask is not None:
            x = apply_mask_token(x, mask.flatten(1), self.mask_token)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias()
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, shared_rel_pos_bias=rel_pos_bias, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        x = self.norm(x)[:, 1:]
        h, w = self.patch_embed.grid_size
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)


# ---------------------------------------------------------------------------------------------------------------------
# SimMIM

class SimMIM(nn.Module):
    """An encoder and a one-layer decoder (1x1 conv + PixelShuffle) regressing the raw pixels of masked patches.

    encoder(x, mask) must return (B, C, H/stride, W/stride). The loss is the L1 distance on masked pixels only,
    averaged over masked pixels and channels. With norm_target_window > 0 the target is each pixel normalised by the
    mean and std of its (odd) window, as the SwinV2 SimMIM configs of microsoft/Swin-Transformer do (window 47).
    """

    def __init__(self, encoder, encoder_stride, norm_target_window=0):
        super().__init__()
        if norm_target_window and (norm_target_window % 2 == 0 or norm_target_window < 3):
            raise ValueError(f"the target normalisation window must be odd and at least 3 (a window of 1 pixel has no "
                             f"spread), got {norm_target_window}")
        self.encoder = encoder
        self.encoder_stride = encoder_stride
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.norm_target_window = norm_target_window
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, encoder_stride ** 2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(encoder_stride),
        )

    def reconstruct(self, x, mask):
        """x (B, in_chans, H, W), mask (B, H/p, W/p) -> predicted pixels (B, in_chans, H, W) everywhere, in x's
        normalisation (a model regressing locally normalised pixels: mapped back with x's local mean and std)."""
        out = self.decoder(self.encoder(x, mask))
        if not self.norm_target_window:
            return out
        mean, std = local_stats(x.float(), self.norm_target_window)
        return out.float() * std + mean

    def forward(self, x, mask):
        """-> the scalar loss, computed in float32."""
        x_rec = self.decoder(self.encoder(x, mask)).float()
        x = x.float()
        m = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2).unsqueeze(1).type_as(x)
        if self.norm_target_window:
            mean, std = local_stats(x, self.norm_target_window)
            x = (x - mean) / std
        return ((x - x_rec).abs() * m).sum() / (m.sum() + 1e-5) / self.in_chans


def local_stats(x, window):
    """The mean and unbiased std (+ 1e-6 in the variance) of each pixel's window x window neighbourhood inside the
    image: the target normalisation of norm_target_window."""
    pool = dict(kernel_size=window, stride=1, padding=window // 2)
    mean = F.avg_pool2d(x, count_include_pad=False, **pool)
    mean_sq = F.avg_pool2d(x ** 2, count_include_pad=False, **pool)
    count = F.avg_pool2d(torch.ones_like(x[:, :1]), count_include_pad=True, **pool) * window ** 2
    var = ((mean_sq - mean ** 2) * count / (count - 1)).clamp(min=0)
    return mean, (var + 1e-6) ** 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Builders

def model_kwargs(name, img_size, pretrain, **overrides):
    """The timm constructor arguments of a named model at img_size, with overrides applied and checked."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    cfg = dict(MODELS[name])
    family, window_div, drop_path = cfg.pop('family'), cfg.pop('window_div', None), cfg.pop('drop_path')
    img_size = img_size or (224 if family == VIT or not pretrain else 192)
    kw = dict(img_size=img_size, drop_path_rate=drop_path[0 if pretrain else 1], **cfg)
    if family == VIT:
        kw.update(patch_size=16, init_values=0.1)
    else:
        kw.update(patch_size=4, window_size=img_size // window_div)
    if family == VIT and overrides.get('window_size') is not None:
        raise ValueError(f"{name} has no window size (Swin models have one): leave it out")
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if family != SWIN:  # timm's Swin narrows its attention to heads x (width // heads); SwinV2 and BEiT cannot
        for i, h in enumerate((kw['num_heads'],) if family == VIT else kw['num_heads']):
            if kw['embed_dim'] * 2 ** i % h:
                raise ValueError(f"{name}'s width {kw['embed_dim'] * 2 ** i}" + (f" in stage {i}" if i else '') +
                                 f" is not divisible by its {h} attention heads: choose heads that divide it")
    if family != VIT:
        if len(kw['num_heads']) != len(kw['depths']):
            raise ValueError(f"{len(kw['depths'])} stages (depths {tuple(kw['depths'])}) need as many head counts, "
                             f"got num_heads {tuple(kw['num_heads'])}")
        check_swin_sizes(kw['img_size'], kw['patch_size'], len(kw['depths']), kw['window_size'])
    elif kw['img_size'] % kw['patch_size']:
        raise ValueError(f"image size {kw['img_size']} is not divisible by the patch size {kw['patch_size']}")
    return family, kw


def check_swin_sizes(img_size, patch_size, num_stages, window_size):
    """Every stage's resolution must be divisible by its window (or be at most the window, which then shrinks)."""
    stride = patch_size * 2 ** (num_stages - 1)
    if img_size % stride:
        raise ValueError(f"image size {img_size} is not divisible by the encoder stride {stride} "
                         f"(patch size x 2^(stages-1)); use a multiple of {stride}")
    for i in range(num_stages):
        res = img_size // patch_size // 2 ** i
        if res > window_size and res % window_size:
            raise ValueError(f"window size {window_size} does not divide stage {i}'s resolution {res} at image size "
                             f"{img_size}; pick a window that divides {res} (the default is image size / 32 for "
                             f"Swin-T/S/B and / 16 for Swin-L and SwinV2)")


def build_encoder(name, img_size=None, pretrain=True, **overrides):
    """The masked encoder of a named model and its output stride."""
    family, kw = model_kwargs(name, img_size, pretrain, **overrides)
    if family == VIT:
        return ViTEncoder(**kw), kw['patch_size']
    encoder = (SwinEncoder if family == SWIN else SwinV2Encoder)(**kw)
    return encoder, kw['patch_size'] * 2 ** (len(kw['depths']) - 1)


def build_simmim(name, img_size=None, norm_target_window=0, use_checkpoint=False, **overrides):
    """A SimMIM model for pretraining, by default at the official size (192px for Swin, 224px for ViT).
    overrides: any architecture field (window_size, embed_dim, depths, num_heads, depth, patch_size, in_chans,
    drop_path_rate, mlp_ratio, ...); None values are ignored."""
    encoder, stride = build_encoder(name, img_size, pretrain=True, **overrides)
    encoder.set_grad_checkpointing(use_checkpoint)
    return SimMIM(encoder, stride, norm_target_window)


def build_classifier(name, img_size=224, num_classes=1000, use_checkpoint=False, **overrides):
    """The fine-tuning classifier of a named model: timm's Swin / SwinV2, or BEiT-style ViT with per-block relative
    position bias, mean pooling and fc_norm (the official fine-tune configs)."""
    family, kw = model_kwargs(name, img_size, pretrain=False, **overrides)
    if family == VIT:
        model = Beit(num_classes=num_classes, global_pool='avg', use_abs_pos_emb=False, use_rel_pos_bias=True, **kw)
    else:
        model = (SwinTransformer if family == SWIN else SwinTransformerV2)(num_classes=num_classes, **kw)
    model.set_grad_checkpointing(use_checkpoint)
    return use_fused_attention(model)


def extract_features(model, x):
    """(pooled (B, C), last feature map (B, C, h, w)) from a SimMIM encoder, a SimMIM model or a classifier."""
    model = getattr(model, 'encoder', model)
    if isinstance(model, (MaskedSwin, ViTEncoder)):
        fmap = model(x)
        return fmap.mean((2, 3)), fmap
    tokens = model.forward_features(x)
    if isinstance(model, Beit):  # (B, 1 + N, C): the cls token, then the patch grid
        h, w = model.patch_embed.grid_size
        return model.forward_head(tokens, pre_logits=True), tokens[:, 1:].transpose(1, 2).reshape(len(x), -1, h, w)
    return model.forward_head(tokens, pre_logits=True), tokens.permute(0, 3, 1, 2)  # Swin: (B, h, w, C)


def probe_head(fc):
    """A linear probe's head: BatchNorm without affine parameters (the features standardised), then fc, initialised
    as MAE's (weights N(0, 0.01), biases 0)."""
    trunc_normal_(fc.weight, std=.01)
    nn.init.zeros_(fc.bias)
    return nn.Sequential(nn.BatchNorm1d(fc.in_features, affine=False, eps=1e-6), fc)


def fold_probe_head(state):
    """A state dict with a probe_head -> the same classifier with a plain linear head (the BatchNorm folded in)."""
    head = 'head.fc.' if 'head.fc.1.weight' in state else 'head.'
    if head + '1.weight' not in state:
        return state
    state = dict(state)
    scale, mean = (state.pop(head + '0.running_var') + 1e-6).rsqrt(), state.pop(head + '0.running_mean')
    state.pop(head + '0.num_batches_tracked', None)
    weight = state.pop(head + '1.weight') * scale
    state[head + 'weight'], state[head + 'bias'] = weight, state.pop(head + '1.bias') - weight @ mean
    return state


def class_names(num_classes, names=None):
    """names, else ImageNet-1k's for 1000 classes (timm's; the first name of each); 'class i' for the outputs past
    them (a classifier of more outputs than named classes)."""
    if not names and num_classes == 1000:
        return list(imagenet_names())
    names = list(names or [])
    return names + [f'class {i}' for i in range(len(names), num_classes)]


@functools.lru_cache(maxsize=1)
def imagenet_names():
    """ImageNet-1k's class names (timm's; the first of each), read once."""
    info = ImageNetInfo()
    return tuple(info.index_to_description(i).split(',')[0] for i in range(1000))


def preprocessing(saved, num_classes):
    """timm's pretrained_cfg of a model saved with these fields (img_size, in_chans, mean, std, crop_pct, classes;
    a mean and std not saved are None: data.normalization's defaults, ImageNet's)."""
    chans, size = saved.get('in_chans') or 3, saved['img_size']
    as_tuple = lambda v: v and tuple(v)
    return dict(input_size=(chans, size, size), mean=as_tuple(saved.get('mean')), std=as_tuple(saved.get('std')),
                interpolation='bicubic', crop_pct=saved.get('crop_pct') or 0.875, num_classes=num_classes,
                label_names=tuple(class_names(num_classes, saved.get('classes'))) if num_classes else None)


def checkpoint_args(checkpoint):
    """The scripts' flags of a checkpoint (read_checkpoint's dict): its saved 'args' (ours), else read off its weights
    and the pretrained_cfg of an export (size, mean, std, crop, class names; with our 'intensity')."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"a {type(checkpoint).__name__}, not a checkpoint (a dict of weights)")
    if isinstance(checkpoint.get('args'), dict):
        return checkpoint['args']
    try:
        arch = infer_arch(to_timm_layout(checkpoint)[0])
    except (KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"not a Swin, SwinV2 or ViT checkpoint that this code knows (no {e})") from None
    cfg = checkpoint.get('pretrained_cfg')
    if isinstance(cfg, dict) and 'input_size' in cfg:
        arch.update(in_chans=cfg['input_size'][0], img_size=cfg['input_size'][-1], mean=list(cfg['mean']),
                    std=list(cfg['std']), crop_pct=cfg.get('crop_pct'), intensity=checkpoint.get('intensity'),
                    classes=list(cfg['label_names']) if cfg.get('label_names') else None)
    return arch


# ---------------------------------------------------------------------------------------------------------------------
# Loading pretrained weights

def _spline_weights(xs, xt):
    """Matrix W (len(xt), len(xs)) with W @ y = the not-a-knot cubic spline through (xs, y) evaluated at xt (linear
    interpolation below 4 points). Float64."""
    n = len(xs)
    if n < 4:
        return torch.stack([torch.from_numpy(np.interp(xt.numpy(), xs.numpy(), np.eye(n)[i])) for i in range(n)], 1)
    h = xs[1:] - xs[:-1]
    A, B = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):  # continuity of the first derivative: rows for the second derivatives M
        A[i, i - 1:i + 2] = torch.stack([h[i - 1], 2 * (h[i - 1] + h[i]), h[i]])
        B[i, i - 1:i + 2] = 6 * torch.stack([1 / h[i - 1], -1 / h[i - 1] - 1 / h[i], 1 / h[i]])
    A[0, :3] = torch.stack([h[1], -(h[0] + h[1]), h[0]])  # not-a-knot: third derivative continuous at x1, x(n-2)
    A[-1, -3:] = torch.stack([h[-1], -(h[-2] + h[-1]), h[-2]])
    M = torch.linalg.solve(A, B)  # second derivatives as linear maps of y
    W = torch.zeros(len(xt), n, dtype=torch.float64)
    for r, t in enumerate(xt):
        i = int(torch.clamp(torch.searchsorted(xs, t, right=True) - 1, 0, n - 2))
        a, b = xs[i + 1] - t, t - xs[i]
        W[r] = (M[i] * a ** 3 + M[i + 1] * b ** 3) / (6 * h[i]) - (M[i] * a + M[i + 1] * b) * h[i] / 6
        W[r, i] += a / h[i]
        W[r, i + 1] += b / h[i]
    return W


def _source_positions(src, dst):
    """Where the src x src table's rows sit on the dst grid: the official geometric progression when growing (the
    step grows from 1 by a factor q found by bisection so that the outermost entry reaches dst // 2), else uniform."""
    if dst <= src:
        return torch.linspace(-(dst // 2), dst // 2, src, dtype=torch.float64)
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        lo, hi = (lo, q) if (1 - q ** (src // 2)) / (1 - q) > dst // 2 else (q, hi)
    steps = [q ** i for i in range(src // 2)]
    right = torch.tensor(steps, dtype=torch.float64).cumsum(0)
    return torch.cat([-right.flip(0), torch.zeros(1, dtype=torch.float64), right])


def resize_rel_pos_table(table, rows, extra=0):
    """Resize a relative position bias table (L, heads) of a (2w-1)^2 grid (+ `extra` trailing cls rows, kept) to
    `rows` rows, by the official cubic interpolation: tables pretrained with window 6 / 12 fine-tune at 7 / 14."""
    src, dst = math.isqrt(table.shape[0] - extra), math.isqrt(rows - extra)
    xs, xt = _source_positions(src, dst), torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float64)
    W = _spline_weights(xs, xt)
    grid = table[:src * src].double().view(src, src, -1)
    grid = torch.einsum('ij,kjh->kih', W, grid)  # along x (columns)
    grid = torch.einsum('ij,jkh->ikh', W, grid)  # along y (rows)
    return torch.cat([grid.reshape(dst * dst, -1).to(table.dtype), table[table.shape[0] - extra:]])


BUFFERS = ('relative_position_index', 'attn_mask', 'relative_coords_table', 'k_bias')  # rebuilt by the model


class PickledCheckpoint(ValueError):
    """A checkpoint holding pickled Python objects, read without allow_pickle."""


class UnreadableCheckpoint(ValueError):
    """A file that is no readable checkpoint: truncated, corrupted or of another kind."""


def read_checkpoint(path, allow_pickle=False):
    """A .pth / .pt / .bin / .safetensors file, a Hugging Face model folder (model.safetensors or pytorch_model.bin,
    with config.json) or a published name (PUBLISHED: downloaded once) -> a dict. Pickled objects (the official
    checkpoints' yacs config) are refused (PickledCheckpoint) unless allow_pickle: unpickling runs the file's code."""
    if not os.path.exists(path):
        cached = download(path)
        try:
            return read_checkpoint(cached, allow_pickle)
        except PickledCheckpoint:
            raise
        except Exception as e:
            raise DownloadError(f"the downloaded '{path}' in {cached} cannot be read ({_first_line(e)}): delete it to "
                                f"download it again") from None
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in ('model.safetensors', 'pytorch_model.bin')]
        found = [f for f in files if os.path.isfile(f)]
        if not found:
            raise FileNotFoundError(f"'{path}' is a folder without model.safetensors or pytorch_model.bin")
        checkpoint = read_checkpoint(found[0], allow_pickle)
        config = os.path.join(path, 'config.json')
        if os.path.isfile(config):
            with open(config) as f:
                checkpoint = dict(model=checkpoint, hf_config=json.load(f))
        return checkpoint
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file  # installed with timm
            return load_file(path)
        return torch.load(path, map_location='cpu', weights_only=not allow_pickle)
    except OSError:  # unreadable, not damaged
        raise
    except Exception as e:  # torch's text for a file that is no checkpoint advises weights_only=False: not shown
        found = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        if found:
            raise PickledCheckpoint(f"'{path}' holds pickled Python objects ({found[1]}), as official SimMIM "
                                    f"checkpoints store their config; loading them (allow_pickle=True) runs code from "
                                    f"the file") from None
        other = isinstance(e, (pickle.UnpicklingError, KeyError, UnicodeDecodeError))  # not a pickle or a zip of one
        why = 'not a PyTorch file' if other else _first_line(e)
        raise UnreadableCheckpoint(f"cannot load checkpoint '{path}' ({why}); it is truncated, corrupted or not a "
                                   f"PyTorch checkpoint") from None


# Published SimMIM weights by name: mmpretrain's (the seed's tables; each file's name ends in the first 8 hex digits of
# its SHA-256; paths relative to MMPRETRAIN) and transformers' on the Hugging Face hub. name -> (what it is, its files).
MMPRETRAIN = 'https://download.openmmlab.com/mmselfsup/1.x/simmim/'
_B100, _B800 = 'simmim_swin-base_8xb256-amp-coslr-100e_in1k-192', 'simmim_swin-base_16xb128-amp-coslr-800e_in1k-192'
_L800 = 'simmim_swin-large_16xb128-amp-coslr-800e_in1k-192'
_B100_FT, _B800_FT = 'swin-base_ft-8xb256-coslr-100e_in1k', 'swin-base_ft-8xb256-coslr-100e_in1k-224'
_L800_FT = 'swin-large_ft-8xb256-coslr-ws14-100e_in1k-224'
_HF = 'https://huggingface.co/microsoft/swin-base-simmim-window6-192/resolve/main/'
PUBLISHED = {
    'simmim_swin-base-w6_8xb256-amp-coslr-100e_in1k-192px': (
        'Swin-B pretrained 100 epochs, 192px, window 6', f'{_B100}/{_B100}_20220829-0e15782d.pth'),
    'simmim_swin-base-w6_16xb128-amp-coslr-800e_in1k-192px': (
        'Swin-B pretrained 800 epochs, 192px, window 6', f'{_B800}/{_B800}_20220916-a0e931ac.pth'),
    'simmim_swin-large-w12_16xb128-amp-coslr-800e_in1k-192px': (
        'Swin-L pretrained 800 epochs, 192px, window 12', f'{_L800}/{_L800}_20220916-4ad216d3.pth'),
    'swin-base-w6_simmim-100e-pre_8xb256-coslr-100e_in1k-192px': (
        'Swin-B ImageNet-1k classifier, 100-epoch pretraining, 192px: top-1 82.7',
        f'{_B100}/{_B100_FT}/{_B100_FT}_20220829-9cf23aa1.pth'),
    'swin-base-w6_simmim-800e-pre_8xb256-coslr-100e_in1k-192px': (
        'Swin-B ImageNet-1k classifier, 800-epoch pretraining (the file is named 224px): top-1 83.8',
        f'{_B800}/{_B800_FT}/{_B800_FT}_20221208-155cc6e6.pth'),
    'swin-large-w14_simmim-800e-pre_8xb256-coslr-100e_in1k': (
        'Swin-L ImageNet-1k classifier, 800-epoch pretraining, 224px, window 14: top-1 84.8',
        f'{_L800}/{_L800_FT}/{_L800_FT}_20220916-d4865790.pth'),
    'microsoft/swin-base-simmim-window6-192': (
        'Swin-B pretrained 100 epochs, 192px, window 6 (transformers)', _HF + 'config.json', _HF + 'pytorch_model.bin'),
}


class DownloadError(OSError):
    """A published checkpoint that could not be downloaded whole, or read once downloaded."""


def _first_line(error):
    """An error's text, up to its first line end or sentence end, at most 200 characters."""
    return re.split(r'\n|(?<=\w)\. ', str(error) or type(error).__name__)[0][:200]


def download(name, progress=os.environ.get('RANK', '0') == '0'):
    """A published name -> its file (a folder for several files) in torch's hub cache, downloaded the first time.
    Each file goes to a hidden temporary name beside its place, is checked (the SHA-256 its name carries, else that
    it loads), and only then takes its name: a failed or killed download leaves nothing under that name."""
    if name not in PUBLISHED:
        close = difflib.get_close_matches(name, PUBLISHED, n=3, cutoff=0.4)
        raise FileNotFoundError(f"'{name}' does not exist, nor is it a published name" + (
            f"; close ones: {', '.join(close)}" if close else " (models.PUBLISHED lists them)"))
    urls = [url if '://' in url else MMPRETRAIN + url for url in PUBLISHED[name][1:]]
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    folder = os.path.join(folder, name.replace('/', '--')) if len(urls) > 1 else folder
    for url in urls:
        path = os.path.join(folder, url.rsplit('/', 1)[1])
        if os.path.isfile(path):
            continue
        digest = re.search(r'-([0-9a-f]{8})\.\w+$', url)
        partial = os.path.join(folder, f'.{os.getpid()}.{os.path.basename(path)}')  # the extension kept for loading
        try:
            os.makedirs(folder, exist_ok=True)
            torch.hub.download_url_to_file(url, partial, digest and digest[1], progress)
            if not digest:  # a cut connection goes unnoticed by the download: the file must load
                with open(partial) as f:
                    json.load(f) if path.endswith('.json') else read_checkpoint(partial)
            os.replace(partial, path)
        except Exception as e:
            reason = _first_line(getattr(e, 'reason', None) or e)
            fetch = f"download it yourself and pass the path (or put the file, named as in the URL, into {folder})"
            if len(urls) > 1:
                fetch = f"download its files into one folder yourself and pass the folder (or put them, named as in " \
                        f"the URLs, into {folder})"
            if isinstance(e, urllib.error.HTTPError):
                raise DownloadError(f"cannot download '{name}': {url} answered {e.code} {e.reason}; {fetch}") from None
            if isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError)):
                raise DownloadError(f"cannot download '{name}' from {url} ({reason}): where there is a network, "
                                    f"{fetch}") from None
            if isinstance(e, OSError):  # here: a full disk, an unwritable cache
                raise DownloadError(f"cannot store '{name}' in {folder} ({reason}): make room there, or set "
                                    f"TORCH_HOME to another folder") from None
            what = f"cut short or altered: its SHA-256 does not start with {digest[1]}" if 'invalid hash' in reason \
                else reason
            raise DownloadError(f"the download of '{name}' from {url} is not the published file ({what}): deleted; "
                                f"try again, or {fetch}") from None
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return folder if len(urls) > 1 else path


def _shift_downsample(state):
    """Microsoft, mmpretrain and Hugging Face keep PatchMerging at the end of stage i, timm at the start of i + 1."""
    return {re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m[1]) + 1}.downsample', k): v
            for k, v in state.items()}


def _from_mmpretrain(state):
    """mmpretrain's SwinTransformer merges 2x2 patches with nn.Unfold: channel-major, offsets in the order (0,0),
    (0,1), (1,0), (1,1); Microsoft and timm concatenate whole patches (0,0), (1,0), (0,1), (1,1). Undo both."""
    out = {}
    for k, v in state.items():
        k = re.sub(r'^(backbone|neck)\.', '', k)
        k = re.sub(r'^stages\.', 'layers.', re.sub(r'^norm3\.', 'norm.', k))
        k = k.replace('attn.w_msa.', 'attn.').replace('patch_embed.projection', 'patch_embed.proj')
        k = k.replace('ffn.layers.0.0', 'mlp.fc1').replace('ffn.layers.1', 'mlp.fc2')
        if '.downsample.reduction.' in k:
            out_dim, in_dim = v.shape
            v = v.reshape(out_dim, in_dim // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3]].reshape(out_dim, in_dim)
        elif '.downsample.norm.' in k:
            v = v.reshape(-1, 4).t()[[0, 2, 1, 3]].reshape(-1)
        out[k] = v
    return _shift_downsample(out)


def _from_huggingface(state):
    """transformers' Swin names (v4, as on the hub), with q, k, v as three Linear layers."""
    rename = [('embeddings.patch_embeddings.projection', 'patch_embed.proj'), ('embeddings.norm', 'patch_embed.norm'),
              ('embeddings.mask_token', 'mask_token'), ('encoder.layers.', 'layers.'), ('layernorm_before', 'norm1'),
              ('layernorm_after', 'norm2'), ('attention.output.dense', 'attn.proj'), ('attention.self.', 'attn.'),
              ('intermediate.dense', 'mlp.fc1'), ('output.dense', 'mlp.fc2')]
    out = {}
    for k, v in state.items():
        k = re.sub(r'^swin\.layernorm\.', 'norm.', re.sub(r'^classifier\.', 'head.fc.', k))
        k = re.sub(r'^swin\.', '', k)
        for old, new in rename:
            k = k.replace(old, new)
        out[k] = v
    for k in [k for k in out if '.attn.query.' in k]:
        base, kind = k.split('.attn.query.')
        out[f'{base}.attn.qkv.{kind}'] = torch.cat([out.pop(f'{base}.attn.{n}.{kind}')
                                                    for n in ('query', 'key', 'value')])
    return _shift_downsample(out)


def to_timm_layout(checkpoint):
    """Any supported checkpoint -> (state dict in timm's key names, plus 'mask_token' and 'decoder.*' for SimMIM
    models, layout name). Layouts: ours / timm, microsoft/SimMIM (pretrain and fine-tuned, Swin and ViT), mmpretrain
    (SimMIM pretrain and classifiers), Hugging Face transformers (Swin SimMIM and classifiers)."""
    state = checkpoint
    for wrapper in ('model', 'state_dict'):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith(BUFFERS)}
    if any(k.startswith('backbone.') for k in state):
        return _from_mmpretrain(state), 'mmpretrain'
    if any(k.startswith(('swin.', 'classifier.')) for k in state):
        return _from_huggingface(state), 'huggingface'
    state = {k[len('encoder.'):] if k.startswith('encoder.') else k: v for k, v in state.items()}
    if any(k.startswith('layers.0.downsample.') for k in state):  # Swin, Microsoft's order
        state = _shift_downsample(state)
        state = {('head.fc.' + k[5:] if k.startswith('head.') and not k.startswith('head.fc.') else k): v
                 for k, v in state.items()}
        return state, 'microsoft'
    return state, 'timm'


def infer_arch(state):
    """The scripts' architecture flags read off a state dict in timm's layout: model, embed_dim, depths, num_heads
    (one number each for ViT), patch_size, in_chans, window_size (Swin), img_size (ViT's grid; Swin's from its
    window), num_classes (classifiers)."""
    proj = state['patch_embed.proj.weight']
    arch = dict(embed_dim=proj.shape[0], in_chans=proj.shape[1], patch_size=proj.shape[2])
    head = state.get('head.fc.weight', state.get('head.weight'))
    if head is not None:
        arch['num_classes'] = head.shape[0]
    if any(k.startswith('blocks.') for k in state):
        table = state.get('rel_pos_bias.relative_position_bias_table',
                          state.get('blocks.0.attn.relative_position_bias_table'))
        grid = (math.isqrt(table.shape[0] - 3) + 1) // 2
        arch.update(family=VIT, depths=(1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.')),),
                    num_heads=(table.shape[1],), img_size=grid * arch['patch_size'])
    else:
        stages = 1 + max(int(k.split('.')[1]) for k in state if k.startswith('layers.'))
        depths = tuple(1 + max(int(k.split('.')[3]) for k in state if k.startswith(f'layers.{i}.blocks.'))
                       for i in range(stages))
        v2 = 'layers.0.blocks.0.attn.logit_scale' in state
        heads = tuple(state[f'layers.{i}.blocks.0.attn.' + ('logit_scale' if v2 else 'relative_position_bias_table')]
                      .shape[0 if v2 else 1] for i in range(stages))
        arch.update(family=SWINV2 if v2 else SWIN, depths=depths, num_heads=heads)
        if not v2:
            rows = state['layers.0.blocks.0.attn.relative_position_bias_table'].shape[0]
            arch['window_size'] = (math.isqrt(rows) + 1) // 2
    family = arch.pop('family')
    same = [n for n, c in MODELS.items() if c['family'] == family and c['embed_dim'] == arch['embed_dim']
            and c.get('depths', (c.get('depth'),)) == arch['depths']]
    arch['model'] = same[0] if same else next(n for n, c in MODELS.items() if c['family'] == family)
    if 'window_size' in arch:  # the official sizes: window 6 / 12 at 192px, 7 / 14 at 224px
        arch['img_size'] = arch['window_size'] * MODELS[arch['model']]['window_div']
    return arch


def arch_kwargs(arch):
    """Architecture fields as the scripts save them (model, window_size, patch_size, embed_dim, in_chans, drop_path,
    depths, num_heads; absent or None: the model's) -> build_* keyword arguments."""
    vit = MODELS[arch['model']]['family'] == VIT
    stages = lambda v: v and (v[0] if vit else tuple(v))
    return dict(window_size=arch.get('window_size'), patch_size=arch.get('patch_size'),
                embed_dim=arch.get('embed_dim'), in_chans=arch.get('in_chans'), drop_path_rate=arch.get('drop_path'),
                num_heads=stages(arch.get('num_heads')), **{'depth' if vit else 'depths': stages(arch.get('depths'))})


def load_pretrained(model, checkpoint):
    """Load a checkpoint of any supported layout (see to_timm_layout) into a classifier or a SimMIM model. Into a
    classifier: drops the decoder and the mask token (a SimMIM model keeps them). Resizes relative position tables to
    the model's window / grid, copies ViT's shared table into every block, adapts the patch embedding (and a decoder)
    to another number of input channels as timm does, refuses another architecture.
    -> report {'loaded', 'resized', 'missing', 'dropped'} (lists of key names), 'adapted' ([key, 'a -> b channels'])."""
    state, _ = to_timm_layout(checkpoint)
    target = model.state_dict()
    vit = isinstance(model, Beit)
    if 'encoder.mask_token' in target:  # into a SimMIM model (continued pretraining): keep the decoder too
        state = {('encoder.' + k if 'encoder.' + k in target else k): v for k, v in state.items()}
    if vit and 'rel_pos_bias.relative_position_bias_table' in state and 'rel_pos_bias.relative_position_bias_table' \
            not in target:  # pretrained with one shared table, fine-tuned with one per block
        shared = state.pop('rel_pos_bias.relative_position_bias_table')
        state.update({f'blocks.{i}.attn.relative_position_bias_table': shared.clone()
                      for i in range(len(model.blocks))})
    dropped = [k for k in state if k not in target and (k.startswith(('decoder.', 'mask_token', 'head.'))
                                                        or vit and k.startswith('norm.'))]
    dropped += [k for k in state if k.startswith('head.') and k in target and state[k].shape != target[k].shape]
    state = {k: v for k, v in state.items() if k not in dropped}
    adapted = []  # another number of input channels: the patch embedding adapted as timm does, the decoder's output too
    proj = next((k for k in ('patch_embed.proj.weight', 'encoder.patch_embed.proj.weight') if k in target), None)
    if proj in state and state[proj].shape[1] != target[proj].shape[1]:
        source, chans = state[proj].shape[1], target[proj].shape[1]
        w = state[proj]  # from RGB timm's rule; else the mean filter, for the same response to equal channels
        state[proj] = adapt_input_conv(chans, w) if source == 3 else w.mean(1, keepdim=True).repeat(1, chans, 1, 1) * (
            source / chans)
        adapted = [proj, f'{source} -> {chans} channels']
        for k in ('decoder.0.weight', 'decoder.0.bias'):
            if k in state and k in target:  # (channels x stride^2 outputs, ...): grey = the channels' mean
                v = state[k].unflatten(0, (source, -1))
                v = v.mean(0, keepdim=True) if chans == 1 else v[[c % source for c in range(chans)]]
                state[k] = v.flatten(0, 1)
    resized = []
    for k, v in state.items():
        if k.endswith('relative_position_bias_table') and k in target and v.shape != target[k].shape \
                and v.shape[1:] == target[k].shape[1:]:
            state[k] = resize_rel_pos_table(v, target[k].shape[0], extra=3 if vit else 0)
            resized.append(k)
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items()
                  if k in target and v.shape != target[k].shape]
    unexpected = [k for k in state if k not in target]
    missing = [k for k in target if k not in state and not k.endswith(BUFFERS)]
    new_ok = ('head.', 'fc_norm.', 'decoder.', 'mask_token', 'encoder.mask_token')
    problems = mismatched + [f"{k} not in the model" for k in unexpected] + \
        [f"{k} not in the checkpoint" for k in missing if not k.startswith(new_ok)]
    if problems:
        raise ValueError(f"the checkpoint does not fit {type(model).__name__} ({len(problems)} problems; first: "
                         f"{'; '.join(problems[:4])}): build the model with the architecture it was trained with")
    model.load_state_dict(state, strict=False)
    return dict(loaded=sorted(state), resized=resized, missing=missing, dropped=dropped, adapted=adapted)


# ---------------------------------------------------------------------------------------------------------------------
# Use from Python

def load_model(checkpoint, allow_pickle=False):
    """A checkpoint (a file, a Hugging Face folder or a published name) -> its model with its weights, in eval mode:
    a classifier at its own size (an encoder without head: num_classes 0), or from pretraining weights with a decoder
    the SimMIM model (extract_features reads its encoder, reconstruct draws). model.pretrained_cfg: its preprocessing
    (see preprocessing: None for what the checkpoint does not say) and 'intensity'."""
    checkpoint = read_checkpoint(checkpoint, allow_pickle)
    arch = {k: v for k, v in checkpoint_args(checkpoint).items() if v is not None}
    state = fold_probe_head(to_timm_layout(checkpoint)[0])
    family, kw = MODELS[arch['model']]['family'], arch_kwargs(arch)
    if any(k.endswith('decoder.0.weight') for k in state):
        model = build_simmim(arch['model'], arch.get('img_size'), arch.get('norm_target_window') or 0, **kw)
        arch['num_classes'] = 0
    else:  # a classifier, or an encoder without head (an export)
        if family == VIT:  # mean pooling and a new norm (the official fine-tuning), or the final norm kept
            kw['use_fc_norm'] = 'fc_norm.weight' in state
        elif family == SWINV2:
            kw['pretrained_window_sizes'] = arch.get('pretrained_window_sizes')
        arch['num_classes'] = arch.get('num_classes') or 0
        model = build_classifier(arch['model'], arch.get('img_size'), arch['num_classes'], **kw)
    load_pretrained(model, state)
    size = getattr(model, 'encoder', model).patch_embed.img_size[0]
    model.pretrained_cfg = dict(preprocessing(dict(arch, img_size=size), arch['num_classes']),
                                intensity=arch.get('intensity') or 'type')
    return model.eval()
