"""SimMIM models: Swin / SwinV2 / ViT encoders with a mask token, the SimMIM wrapper, builders,
the optimizer's parameter groups and the conversion of other code's weights. No file I/O.

    config = model_config('swin_base')        # 192px, window 6: the paper's Swin-B
    model = build_simmim(config)              # or build_simmim('swin_base', img_size=192)
    loss = model(images, mask)                # images (B, 3, 192, 192), mask (B, 48, 48): 1 masked
    pictures = model.reconstruct(images, mask)    # (B, 3, 192, 192), normalised as the input
    classifier = build_classifier('swin_base', num_classes=1000)   # 224px, window 7
    report = load_pretrained(classifier, to_timm_layout(torch.load('ckpt.pth'))[0])  # 6 -> 7
    pooled, feature_map = extract_features(classifier, images)
"""
import dataclasses
import functools
import math
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from timm.layers import trunc_normal_
from timm.models import adapt_input_conv
from timm.models.beit import Beit, Block as BeitBlock
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block
from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2

# ---------------------------------------------------------------------------------------------
# Named models. The default window is img_size // window_div: the official windows (Swin-T/S/B
# 6 at 192px and 7 at 224px; Swin-L and SwinV2 12 and 14). drop_path: the official (pretraining,
# fine-tuning) stochastic depth. timm: the timm model each one is. SwinV2-H and -G: the SwinV2
# paper's widths and depths, heads of 32 channels, a LayerNorm on the main branch every 6 blocks
# of a stage (extra_norm; its placement as mmpretrain's), windows and drop path as SwinV2-L's.

SWIN, SWINV2, VIT = 'swin', 'swinv2', 'vit'
MODELS = {
    'swin_tiny': dict(family=SWIN, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      window_div=32, drop_path=(0.0, 0.1), timm='swin_tiny_patch4_window7_224'),
    'swin_small': dict(family=SWIN, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                       window_div=32, drop_path=(0.0, 0.1), timm='swin_small_patch4_window7_224'),
    'swin_base': dict(family=SWIN, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      window_div=32, drop_path=(0.0, 0.1), timm='swin_base_patch4_window7_224'),
    'swin_large': dict(family=SWIN, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                       window_div=16, drop_path=(0.0, 0.2), timm='swin_large_patch4_window7_224'),
    'swinv2_tiny': dict(family=SWINV2, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                        window_div=16, drop_path=(0.1, 0.1), timm='swinv2_tiny_window8_256'),
    'swinv2_small': dict(family=SWINV2, embed_dim=96, depths=(2, 2, 18, 2),
                         num_heads=(3, 6, 12, 24), window_div=16, drop_path=(0.1, 0.1),
                         timm='swinv2_small_window8_256'),
    'swinv2_base': dict(family=SWINV2, embed_dim=128, depths=(2, 2, 18, 2),
                        num_heads=(4, 8, 16, 32), window_div=16, drop_path=(0.1, 0.1),
                        timm='swinv2_base_window8_256'),
    'swinv2_large': dict(family=SWINV2, embed_dim=192, depths=(2, 2, 18, 2),
                         num_heads=(6, 12, 24, 48), window_div=16, drop_path=(0.1, 0.2),
                         timm='swinv2_large_window12_192'),
    'swinv2_huge': dict(family=SWINV2, embed_dim=352, depths=(2, 2, 18, 2),
                        num_heads=(11, 22, 44, 88), window_div=16, drop_path=(0.1, 0.2),
                        timm=None, extra_norm=6),
    'swinv2_giant': dict(family=SWINV2, embed_dim=512, depths=(2, 2, 42, 4),
                         num_heads=(16, 32, 64, 128), window_div=16, drop_path=(0.1, 0.2),
                         timm=None, extra_norm=6),
    'vit_small': dict(family=VIT, embed_dim=384, depths=(12,), num_heads=(6,), drop_path=(0.1, 0.1),
                      timm='beit_base_patch16_224'),
    'vit_base': dict(family=VIT, embed_dim=768, depths=(12,), num_heads=(12,), drop_path=(0.1, 0.1),
                     timm='beit_base_patch16_224'),
    'vit_large': dict(family=VIT, embed_dim=1024, depths=(24,), num_heads=(16,),
                      drop_path=(0.1, 0.2), timm='beit_large_patch16_224'),
}


# ---------------------------------------------------------------------------------------------
# The config a checkpoint carries

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model's architecture and the preprocessing of its images: what a checkpoint carries so
    that its model can be built and used again. Made by model_config(). No mean and std (None):
    images of other than 1 or 3 channels, not given them."""
    model: str                # a name in MODELS: the family and the defaults
    img_size: int
    patch_size: int
    embed_dim: int            # of the first stage
    depths: tuple             # blocks per stage; ViT: (blocks,)
    num_heads: tuple          # per stage; ViT: (heads,)
    window_size: int          # Swin and SwinV2; ViT: None
    in_chans: int
    mean: tuple               # of 0-1 pixels
    std: tuple
    intensity: object         # how deeper images become 0-1: data.load_image's rule
    crop_pct: float           # evaluation: resize to img_size / crop_pct, center crop
    num_classes: int          # 0: an encoder
    classes: tuple            # label names, or None
    fc_norm: bool             # ViT classifier: mean pooling + a new norm (else the final norm)
    pretrained_window_sizes: tuple   # SwinV2 classifier: its pretraining's windows, or None
    norm_target_window: int   # SimMIM: regress pixels normalised over this window; 0: raw


FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
SHAPE = ('model', 'img_size', 'window_size', 'patch_size', 'embed_dim', 'depths', 'num_heads',
         'in_chans')


def model_config(model=None, pretrain=True, **given):
    """A ModelConfig of a named model: the fields given (None: not given), the others the named
    model's or the defaults: 192px Swin pretraining, else 224px; 3 channels, ImageNet's mean and
    std (one channel: their average), the 'type' intensity rule, crop 0.875, no head; swin_base.
    Sizes that do not fit are a ValueError."""
    model = model or 'swin_base'
    if model not in MODELS:
        raise ValueError(f"unknown model '{model}'; choose one of: {', '.join(MODELS)}")
    unknown = set(given) - set(FIELDS)
    if unknown:
        raise ValueError(f"no such model field: {', '.join(sorted(unknown))}")
    named, given = MODELS[model], {k: v for k, v in given.items() if v is not None}
    vit = named['family'] == VIT
    if vit and 'window_size' in given:
        raise ValueError(f"{model} has no window size (Swin models have one): leave it out")
    size = given.get('img_size') or (224 if vit or not pretrain else 192)
    c = dict(img_size=size, patch_size=16 if vit else 4, embed_dim=named['embed_dim'],
             depths=named['depths'], num_heads=named['num_heads'],
             window_size=None if vit else size // named['window_div'], in_chans=3,
             intensity='type', crop_pct=0.875, num_classes=0, classes=None, fc_norm=True,
             pretrained_window_sizes=None, norm_target_window=0)
    c.update(given)
    grey = c['in_chans'] == 1
    if 'mean' not in given and 'std' not in given and c['in_chans'] in (1, 3):
        c['mean'] = [sum(IMAGENET_DEFAULT_MEAN) / 3] if grey else IMAGENET_DEFAULT_MEAN
        c['std'] = [sum(IMAGENET_DEFAULT_STD) / 3] if grey else IMAGENET_DEFAULT_STD
    for k in ('depths', 'num_heads', 'mean', 'std', 'classes', 'pretrained_window_sizes'):
        if isinstance(c.get(k), int):  # ViT: one depth, one head count
            c[k] = (c[k],)
        c[k] = None if c.get(k) is None else tuple(c[k])
    config = ModelConfig(model=model, **c)
    check(config)
    return config


def check(config):
    """ValueError for a config whose sizes or normalisation do not fit."""
    c, vit = config, MODELS[config.model]['family'] == VIT
    n, given = c.in_chans, c.mean is not None or c.std is not None
    if given and (not c.mean or not c.std or {len(c.mean), len(c.std)} != {n} or min(c.std) <= 0):
        raise ValueError(f"images of {n} channels need a mean and a std for each channel, std "
                         f"above 0 (the defaults are ImageNet's, for 3 or 1 channels)")
    sizes = dict(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim,
                 in_chans=c.in_chans, window_size=1 if vit else c.window_size,
                 depth=min(c.depths), heads=min(c.num_heads))
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"{c.model}'s {name.replace('_', ' ')} must be at least 1, got {size}")
    number = isinstance(c.intensity, (int, float)) and c.intensity > 0
    rule = c.intensity in ('type', 'image', 'percentile') or number
    if not (0 < c.crop_pct <= 1 and c.num_classes >= 0 and rule):
        raise ValueError(f"crop_pct must be in (0, 1], num_classes at least 0, intensity 'type', "
                         f"'image', 'percentile' or a number above 0; got {c.crop_pct}, "
                         f"{c.num_classes}, {c.intensity!r}")
    if vit and (len(c.depths) != 1 or len(c.num_heads) != 1):
        raise ValueError(f"{c.model} takes one depth and one head count, got depths "
                         f"{c.depths}, heads {c.num_heads}")
    if len(c.num_heads) != len(c.depths):
        raise ValueError(f"{len(c.depths)} stages (depths {c.depths}) need as many head counts, "
                         f"got num_heads {c.num_heads}")
    if MODELS[c.model]['family'] != SWIN:  # timm's Swin narrows heads to width // heads
        for i, h in enumerate(c.num_heads):
            width = c.embed_dim * (1 if vit else 2 ** i)
            if width % h:
                stage = f" in stage {i}" if i else ''
                raise ValueError(f"{c.model}'s width {width}{stage} is not divisible by its {h} "
                                 f"attention heads: choose heads that divide it")
    if vit and c.img_size % c.patch_size:
        raise ValueError(f"image size {c.img_size} is not divisible by the patch size "
                         f"{c.patch_size}")
    if not vit:
        check_swin_sizes(c.img_size, c.patch_size, len(c.depths), c.window_size)


def check_swin_sizes(img_size, patch_size, num_stages, window_size):
    """Every stage's resolution must be divisible by its window (or be at most the window)."""
    stride = patch_size * 2 ** (num_stages - 1)
    if img_size % stride:
        raise ValueError(f"image size {img_size} is not divisible by the encoder stride {stride} "
                         f"(patch size x 2^(stages-1)); use a multiple of {stride}")
    for i in range(num_stages):
        res = img_size // patch_size // 2 ** i
        if res > window_size and res % window_size:
            raise ValueError(f"window size {window_size} does not divide stage {i}'s resolution "
                             f"{res} at image size {img_size}; pick a window that divides {res} "
                             f"(the default is image size / 32 for Swin-T/S/B and / 16 for "
                             f"Swin-L and SwinV2)")


def inherit(saved, given, keys):
    """The fields of a model made from a saved one: given's (None: not given), else saved's for
    keys. From another family not its architecture; for other channels not its normalisation and
    intensity (their data's), except the channel average of mean and std for grey images."""
    fields = dict(given)
    family = lambda name: MODELS.get(name, {}).get('family')
    other_family = given.get('model') and family(given['model']) != family(saved.get('model'))
    other_chans = given.get('in_chans') and given['in_chans'] != (saved.get('in_chans') or 3)
    for k in keys:
        value = saved.get(k)
        if other_family and k in SHAPE:
            continue
        if other_chans and k in ('mean', 'std', 'intensity'):
            grey = value and given['in_chans'] == 1 and k != 'intensity'
            value = [sum(value) / len(value)] if grey else None
        if fields.get(k) is None:
            fields[k] = value
    return fields


def pretrained_cfg(config):
    """timm's pretrained_cfg of config: its preprocessing and label names; and our intensity."""
    c = config
    names = tuple(class_names(c.num_classes, c.classes)) if c.num_classes else None
    return dict(input_size=(c.in_chans, c.img_size, c.img_size), mean=c.mean, std=c.std,
                interpolation='bicubic', crop_pct=c.crop_pct, num_classes=c.num_classes,
                label_names=names, intensity=c.intensity)


def class_names(num_classes, names=None):
    """names, else ImageNet-1k's for 1000 classes (timm's, the first of each); 'class i' for the
    outputs past them."""
    if not names and num_classes == 1000:
        return list(imagenet_names())
    names = list(names or [])
    return names + [f'class {i}' for i in range(len(names), num_classes)]


@functools.lru_cache(maxsize=1)
def imagenet_names():
    info = ImageNetInfo()
    return tuple(info.index_to_description(i).split(',')[0] for i in range(1000))


# ---------------------------------------------------------------------------------------------
# Encoders

def apply_mask_token(x, mask, mask_token):
    """x (B, ..., C) with the patches of mask (B, ...; 1 = masked) replaced by token (1, 1, C)."""
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the patch grid "
                         f"{tuple(x.shape[:-1])}: make the mask with model_patch_size = the "
                         f"encoder's patch size and the same image size")
    w = mask.unsqueeze(-1).type_as(x)
    return x * (1 - w) + mask_token.to(x.dtype) * w


class FusedWindowAttentionV2(WindowAttentionV2):
    """timm's SwinV2 window attention (cosine attention, continuous position bias) through
    scaled_dot_product_attention: same parameters and outputs, no attention matrix kept."""

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias).reshape(B_, N, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1. / 0.01)).exp()
        q = F.normalize(q, dim=-1) * logit_scale
        k = F.normalize(k, dim=-1)
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        bias = 16 * torch.sigmoid(bias).unsqueeze(0)  # (1, nH, N, N)
        if mask is not None:  # shifted windows: (nW, N, N) of 0 / -100, windows batch-major
            nw = mask.shape[0]
            bias = bias.unsqueeze(1) + mask.view(1, nw, 1, N, N)
            bias = bias.expand(B_ // nw, -1, -1, -1, -1).reshape(-1, self.num_heads, N, N)
        dropout = self.attn_drop.p if self.training else 0.
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0,
                                           dropout_p=dropout)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, C)))


def use_fused_attention(model, enable=True):
    """scaled_dot_product_attention on (or off) in every attention layer; timm leaves it off for
    Swin. The scripts turn it off on CPUs, where the explicit softmax was measured faster."""
    for m in model.modules():
        if isinstance(m, WindowAttentionV2):
            m.__class__ = FusedWindowAttentionV2 if enable else WindowAttentionV2
        elif hasattr(m, 'fused_attn'):
            m.fused_attn = enable
    return model


class NormedBlockV2(SwinTransformerV2Block):
    """A SwinV2 block, then a LayerNorm on the main branch (SwinV2-H and -G)."""

    def forward(self, x):
        return self.norm3(super().forward(x))


def add_extra_norms(model, every):
    """SwinV2-H and -G: a LayerNorm after every `every`-th block of each stage (norm3)."""
    for stage in getattr(model, 'encoder', model).layers:
        for i, block in enumerate(stage.blocks):
            if (i + 1) % every == 0:
                block.__class__ = NormedBlockV2
                block.norm3 = nn.LayerNorm(block.dim)
    return model


def blocks(model):
    """The transformer blocks of a SimMIM model, an encoder or a classifier (FSDP shards each)."""
    kinds = (SwinTransformerBlock, SwinTransformerV2Block, BeitBlock)
    return [m for m in model.modules() if isinstance(m, kinds)]


class MaskedSwin:
    """SimMIM's mask token in timm's Swin / SwinV2 (mixed in first):
    forward(x, mask) -> (B, C, H/32, W/32)."""

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
    """The paper's ViT (timm's BEiT: no absolute position embedding, one relative position bias
    shared by all blocks, layer scale, q/v biases) with a mask token:
    forward(x, mask) -> (B, C, H/16, W/16), the cls token dropped."""

    def __init__(self, **kwargs):
        super().__init__(num_classes=0, global_pool='', use_abs_pos_emb=False,
                         use_shared_rel_pos_bias=True, **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        # The official init: linear layers, patch embedding and tokens from N(0, 0.02) truncated
        # at +-0.02 (std 0.0108; timm's BEiT truncates at +-2 and leaves the patch embedding at
        # PyTorch's default), biases 0, then BEiT's rescaling of the blocks' output projections.
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
        bias = self.rel_pos_bias()
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, shared_rel_pos_bias=bias,
                                                      use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=bias)
        x = self.norm(x)[:, 1:]
        h, w = self.patch_embed.grid_size
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)


# ---------------------------------------------------------------------------------------------
# SimMIM

class SimMIM(nn.Module):
    """An encoder and a one-layer decoder (1x1 conv + PixelShuffle) regressing the raw pixels of
    masked patches. encoder(x, mask) returns (B, C, H/stride, W/stride). The loss is the L1
    distance on masked pixels, averaged over them and the channels. With norm_target_window the
    target is each pixel normalised by its (odd) window's mean and std, as microsoft/Swin-
    Transformer's SwinV2 SimMIM configs do (window 47)."""

    def __init__(self, encoder, encoder_stride, norm_target_window=0):
        super().__init__()
        if norm_target_window and (norm_target_window % 2 == 0 or norm_target_window < 3):
            raise ValueError(f"the target normalisation window must be odd and at least 3 (a "
                             f"window of 1 pixel has no spread), got {norm_target_window}")
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
        """x (B, C, H, W), mask (B, H/p, W/p) -> predicted pixels (B, C, H, W) in x's
        normalisation (locally normalised targets: mapped back with x's local mean and std)."""
        out = self.decoder(self.encoder(x, mask))
        if not self.norm_target_window:
            return out
        mean, std = local_stats(x.float(), self.norm_target_window)
        return out.float() * std + mean

    def forward(self, x, mask):
        """-> the scalar loss, computed in float32."""
        x_rec = self.decoder(self.encoder(x, mask)).float()
        x = x.float()
        p = self.patch_size
        m = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).type_as(x)
        if self.norm_target_window:
            mean, std = local_stats(x, self.norm_target_window)
            x = (x - mean) / std
        return ((x - x_rec).abs() * m).sum() / (m.sum() + 1e-5) / self.in_chans


def local_stats(x, window):
    """Each pixel's mean and unbiased std (+ 1e-6 in the variance) over its window x window
    neighbourhood inside the image: the target normalisation of norm_target_window."""
    pool = dict(kernel_size=window, stride=1, padding=window // 2)
    mean = F.avg_pool2d(x, count_include_pad=False, **pool)
    mean_sq = F.avg_pool2d(x ** 2, count_include_pad=False, **pool)
    ones = torch.ones_like(x[:, :1])
    count = F.avg_pool2d(ones, count_include_pad=True, **pool) * window ** 2
    var = ((mean_sq - mean ** 2) * count / (count - 1)).clamp(min=0)
    return mean, (var + 1e-6) ** 0.5


# ---------------------------------------------------------------------------------------------
# Builders

def timm_kwargs(config):
    """The timm constructor arguments of config's architecture (not its head)."""
    c, family = config, MODELS[config.model]['family']
    kw = dict(img_size=c.img_size, embed_dim=c.embed_dim, patch_size=c.patch_size,
              in_chans=c.in_chans)
    if family == VIT:
        return dict(kw, depth=c.depths[0], num_heads=c.num_heads[0], init_values=0.1)
    kw.update(depths=c.depths, num_heads=c.num_heads, window_size=c.window_size)
    if family == SWINV2 and c.pretrained_window_sizes:
        kw['pretrained_window_sizes'] = c.pretrained_window_sizes
    return kw


def as_config(config, pretrain, fields):
    """model_config of a ModelConfig or a model name, with fields changed."""
    if isinstance(config, ModelConfig):
        fields = dict(dataclasses.asdict(config), **fields)
    config = fields.pop('model', config)
    return model_config(config, pretrain, **fields)


def build_simmim(config='swin_base', *, drop_path_rate=None, use_checkpoint=False, **fields):
    """A SimMIM model of config: a ModelConfig, or a model name and model_config's fields (by
    default the official size: 192px Swin, 224px ViT). drop_path_rate None: the official."""
    config = as_config(config, True, fields)
    named = MODELS[config.model]
    kw = dict(timm_kwargs(config), drop_path_rate=named['drop_path'][0]
              if drop_path_rate is None else drop_path_rate)
    if named['family'] == VIT:
        encoder, stride = ViTEncoder(**kw), config.patch_size
    else:
        encoder = (SwinEncoder if named['family'] == SWIN else SwinV2Encoder)(**kw)
        stride = config.patch_size * 2 ** (len(config.depths) - 1)
    if named.get('extra_norm'):
        add_extra_norms(encoder, named['extra_norm'])
    encoder.set_grad_checkpointing(use_checkpoint)
    model = SimMIM(encoder, stride, config.norm_target_window)
    model.pretrained_cfg = pretrained_cfg(config)
    return model


def build_classifier(config='swin_base', *, drop_path_rate=None, use_checkpoint=False, **fields):
    """A classifier of config (see build_simmim; by default 224px): timm's Swin / SwinV2, or a
    BEiT-style ViT with per-block relative position bias and mean pooling into fc_norm (the
    official fine-tuning)."""
    config = as_config(config, False, fields)
    named = MODELS[config.model]
    kw = dict(timm_kwargs(config), num_classes=config.num_classes, drop_path_rate=named[
        'drop_path'][1] if drop_path_rate is None else drop_path_rate)
    if named['family'] == VIT:
        model = Beit(global_pool='avg', use_abs_pos_emb=False, use_rel_pos_bias=True,
                     use_fc_norm=config.fc_norm, **kw)
    else:
        model = (SwinTransformer if named['family'] == SWIN else SwinTransformerV2)(**kw)
    if named.get('extra_norm'):
        add_extra_norms(model, named['extra_norm'])
    model.set_grad_checkpointing(use_checkpoint)
    model.pretrained_cfg = pretrained_cfg(config)
    return use_fused_attention(model)


def linear_probe(model):
    """model with its parameters frozen and its head a linear probe's: BatchNorm without affine
    parameters, then the linear layer, initialised as MAE's (N(0, 0.01), biases 0)."""
    for p in model.parameters():
        p.requires_grad = False
    parent, attr = (model.head, 'fc') if hasattr(model.head, 'fc') else (model, 'head')
    fc = getattr(parent, attr).requires_grad_(True)
    trunc_normal_(fc.weight, std=.01)
    nn.init.zeros_(fc.bias)
    norm = nn.BatchNorm1d(fc.in_features, affine=False, eps=1e-6)
    setattr(parent, attr, nn.Sequential(norm, fc))
    return model


def extract_features(model, x):
    """(pooled (B, C), last feature map (B, C, h, w)) of a SimMIM model, its encoder or a
    classifier."""
    model = getattr(model, 'encoder', model)
    if isinstance(model, (MaskedSwin, ViTEncoder)):
        fmap = model(x)
        return fmap.mean((2, 3)), fmap
    tokens = model.forward_features(x)
    pooled = model.forward_head(tokens, pre_logits=True)
    if isinstance(model, Beit):  # (B, 1 + N, C): the cls token, then the patch grid
        h, w = model.patch_embed.grid_size
        return pooled, tokens[:, 1:].transpose(1, 2).reshape(len(x), -1, h, w)
    return pooled, tokens.permute(0, 3, 1, 2)  # Swin: (B, h, w, C)


# ---------------------------------------------------------------------------------------------
# The optimizer's parameter groups

# Not decayed besides 1-D parameters and biases: a name (module or parameter) in the path. Official
# pretraining exempts Swin's mask token (its table keyword never matches, so the relative position
# tables are decayed) and ViT's cls token (mask token and shared table decayed); fine-tuning
# Swin's tables and ViT's cls token. SwinV2: microsoft/Swin-Transformer's keywords.
NO_DECAY = {
    (SWIN, True): {'mask_token', 'absolute_pos_embed'},
    (SWIN, False): {'relative_position_bias_table', 'absolute_pos_embed'},
    (VIT, True): {'cls_token', 'pos_embed'},
    (VIT, False): {'cls_token', 'pos_embed'},
    (SWINV2, True): {'mask_token', 'absolute_pos_embed', 'relative_position_bias_table',
                     'cpb_mlp', 'logit_scale'},
    (SWINV2, False): {'absolute_pos_embed', 'relative_position_bias_table', 'cpb_mlp',
                      'logit_scale'},
}


def family(model):
    """SWIN, SWINV2 or VIT of a SimMIM model, an encoder or a classifier."""
    model = getattr(model, 'encoder', model)
    return VIT if isinstance(model, Beit) else SWINV2 if isinstance(model, SwinTransformerV2) \
        else SWIN


def param_groups(model, weight_decay, layer_decay=None):
    """The trainable parameters in groups of the official weight decay (NO_DECAY) of a SimMIM model
    or a classifier; with layer_decay a group per layer, lr_scale decay^(N + 1 - layer_id). The
    groups are the same whatever the values (a resumed optimizer's state fits them)."""
    exempt = NO_DECAY[family(model), isinstance(model, SimMIM)]
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith('.bias') or not exempt.isdisjoint(name.split('.'))
        layer, scale = 0, 1.0
        if layer_decay is not None:
            layer, n = layer_id(name, model)
            scale = layer_decay ** (n + 1 - layer)
        group = groups.setdefault((no_decay, layer), dict(
            params=[], weight_decay=0. if no_decay else weight_decay, lr_scale=scale))
        group['params'].append(p)
    return list(groups.values())


def layer_id(name, model):
    """The official layer-wise lr decay assignment -> (layer id, N blocks). Swin: patch embedding
    0, block b of stage s sum(depths[:s]) + b + 1, the merging after stage s sum(depths[:s + 1])
    (timm: at the start of stage s + 1), the rest N + 1. ViT: tokens and patch embedding 0, block
    i i + 1, the rest N + 1."""
    parts = name.split('.')
    if hasattr(model, 'blocks'):
        n = len(model.blocks)
        if parts[0] in ('cls_token', 'mask_token', 'pos_embed', 'patch_embed'):
            return 0, n
        return (int(parts[1]) + 1 if parts[0] == 'blocks' else n + 1), n
    depths = [len(stage.blocks) for stage in model.layers]
    n = sum(depths)
    if parts[0] in ('patch_embed', 'mask_token', 'absolute_pos_embed'):
        return 0, n
    if parts[0] != 'layers':
        return n + 1, n
    before = sum(depths[:int(parts[1])])
    return (before if parts[2] == 'downsample' else before + int(parts[3]) + 1), n


# ---------------------------------------------------------------------------------------------
# Other code's weights: layouts, architecture, loading

BUFFERS = ('relative_position_index', 'attn_mask', 'relative_coords_table', 'k_bias')  # rebuilt


def to_timm_layout(checkpoint):
    """A checkpoint's dict of any supported layout -> (its weights in timm's names, the layout's
    name). A SimMIM model's keep 'mask_token' and 'decoder.*'; a linear probe's BatchNorm is
    folded into its head. Layouts: ours and timm's, microsoft/SimMIM's (pretraining and
    fine-tuned, Swin and ViT), mmpretrain's (SimMIM and classifiers), Hugging Face transformers'
    (Swin SimMIM and classifiers)."""
    state = checkpoint
    for wrapper in ('model', 'state_dict'):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = {k: v for k, v in state.items()
             if isinstance(v, torch.Tensor) and not k.endswith(BUFFERS)}
    if any(k.startswith('backbone.') for k in state):
        return _from_mmpretrain(state), 'mmpretrain'
    if any(k.startswith(('swin.', 'classifier.')) for k in state):
        return _from_huggingface(state), 'huggingface'
    state = {k.removeprefix('encoder.'): v for k, v in state.items()}
    if not any(k.startswith('layers.0.downsample.') for k in state):
        return _fold_probe_head(state), 'timm'
    state = _shift_downsample(state)  # Swin, Microsoft's order; its head is timm's head.fc
    fc = lambda k: 'head.fc.' + k[5:] if k.startswith('head.') and 'head.fc.' not in k else k
    return {fc(k): v for k, v in state.items()}, 'microsoft'


def _shift_downsample(state):
    """Microsoft, mmpretrain and Hugging Face keep PatchMerging at the end of stage i, timm at
    the start of i + 1."""
    shift = lambda m: f'layers.{int(m[1]) + 1}.downsample'
    return {re.sub(r'^layers\.(\d+)\.downsample', shift, k): v for k, v in state.items()}


def _from_mmpretrain(state):
    """mmpretrain merges 2x2 patches with nn.Unfold: channel-major, offsets (0,0), (0,1), (1,0),
    (1,1); Microsoft and timm concatenate whole patches (0,0), (1,0), (0,1), (1,1). Undo both."""
    out = {}
    for k, v in state.items():
        k = re.sub(r'^(backbone|neck)\.', '', k)
        k = re.sub(r'^stages\.', 'layers.', re.sub(r'^norm3\.', 'norm.', k))
        k = k.replace('attn.w_msa.', 'attn.').replace('patch_embed.projection', 'patch_embed.proj')
        k = k.replace('ffn.layers.0.0', 'mlp.fc1').replace('ffn.layers.1', 'mlp.fc2')
        if '.downsample.reduction.' in k:
            out_dim, in_dim = v.shape
            v = v.reshape(out_dim, in_dim // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3]]
            v = v.reshape(out_dim, in_dim)
        elif '.downsample.norm.' in k:
            v = v.reshape(-1, 4).t()[[0, 2, 1, 3]].reshape(-1)
        out[k] = v
    return _shift_downsample(out)


HF_NAMES = [('embeddings.patch_embeddings.projection', 'patch_embed.proj'),
            ('embeddings.norm', 'patch_embed.norm'), ('embeddings.mask_token', 'mask_token'),
            ('encoder.layers.', 'layers.'), ('layernorm_before', 'norm1'),
            ('layernorm_after', 'norm2'), ('attention.output.dense', 'attn.proj'),
            ('attention.self.', 'attn.'), ('intermediate.dense', 'mlp.fc1'),
            ('output.dense', 'mlp.fc2')]


def _from_huggingface(state):
    """transformers' Swin names (v4, as on the hub), with q, k, v as three Linear layers."""
    out = {}
    for k, v in state.items():
        k = re.sub(r'^swin\.layernorm\.', 'norm.', re.sub(r'^classifier\.', 'head.fc.', k))
        k = re.sub(r'^swin\.', '', k)
        for old, new in HF_NAMES:
            k = k.replace(old, new)
        out[k] = v
    for k in [k for k in out if '.attn.query.' in k]:
        base, kind = k.split('.attn.query.')
        parts = [out.pop(f'{base}.attn.{n}.{kind}') for n in ('query', 'key', 'value')]
        out[f'{base}.attn.qkv.{kind}'] = torch.cat(parts)
    return _shift_downsample(out)


def _fold_probe_head(state):
    """A linear probe's head (BatchNorm, linear) as the one linear layer it computes in eval."""
    head = 'head.fc.' if 'head.fc.1.weight' in state else 'head.'
    if head + '1.weight' not in state:
        return state
    state = dict(state)
    scale = (state.pop(head + '0.running_var') + 1e-6).rsqrt()
    mean = state.pop(head + '0.running_mean')
    state.pop(head + '0.num_batches_tracked', None)
    weight = state.pop(head + '1.weight') * scale
    state[head + 'weight'] = weight
    state[head + 'bias'] = state.pop(head + '1.bias') - weight @ mean
    return state


def infer_arch(state):
    """The ModelConfig fields read off a state dict in timm's layout: model, embed_dim, depths,
    num_heads, patch_size, in_chans, window_size (Swin), img_size (ViT's grid; Swin's from its
    window), num_classes (classifiers), fc_norm (ViT without decoder)."""
    proj = state['patch_embed.proj.weight']
    arch = dict(embed_dim=proj.shape[0], in_chans=proj.shape[1], patch_size=proj.shape[2])
    head = state.get('head.fc.weight', state.get('head.weight'))
    if head is not None:
        arch['num_classes'] = head.shape[0]
    blocks = lambda prefix: 1 + max(int(k[len(prefix):].split('.')[0]) for k in state
                                    if k.startswith(prefix))
    if any(k.startswith('blocks.') for k in state):
        table = state.get('rel_pos_bias.relative_position_bias_table',
                          state.get('blocks.0.attn.relative_position_bias_table'))
        grid = (math.isqrt(table.shape[0] - 3) + 1) // 2
        arch.update(family=VIT, depths=(blocks('blocks.'),), num_heads=(table.shape[1],),
                    img_size=grid * arch['patch_size'])
        if not any(k.startswith('decoder.') for k in state):
            arch['fc_norm'] = 'fc_norm.weight' in state
    else:
        stages = blocks('layers.')
        depths = tuple(blocks(f'layers.{i}.blocks.') for i in range(stages))
        v2 = 'layers.0.blocks.0.attn.logit_scale' in state
        attn = 'logit_scale' if v2 else 'relative_position_bias_table'
        heads = tuple(state[f'layers.{i}.blocks.0.attn.{attn}'].shape[0 if v2 else 1]
                      for i in range(stages))
        arch.update(family=SWINV2 if v2 else SWIN, depths=depths, num_heads=heads)
        if not v2:
            rows = state['layers.0.blocks.0.attn.relative_position_bias_table'].shape[0]
            arch['window_size'] = (math.isqrt(rows) + 1) // 2
    kind = arch.pop('family')
    same = [n for n, c in MODELS.items() if c['family'] == kind
            and c['embed_dim'] == arch['embed_dim'] and c['depths'] == arch['depths']]
    arch['model'] = same[0] if same else next(n for n, c in MODELS.items() if c['family'] == kind)
    if 'window_size' in arch:  # the official sizes: window 6 / 12 at 192px, 7 / 14 at 224px
        arch['img_size'] = arch['window_size'] * MODELS[arch['model']]['window_div']
    return arch


def load_pretrained(model, state):
    """Load a state dict in timm's layout (to_timm_layout) into a classifier or a SimMIM model.
    Into a classifier: the decoder and mask token dropped (a SimMIM model keeps them). Relative
    position tables resized to the model's window / grid, ViT's shared table copied into every
    block, the patch embedding (and decoder) adapted to other input channels as timm does,
    another architecture refused.
    -> {'loaded', 'resized', 'missing', 'dropped'}: key lists; 'adapted': [key, 'a -> b ...']"""
    target = model.state_dict()
    vit = isinstance(getattr(model, 'encoder', model), Beit)
    if 'encoder.mask_token' in target:  # into a SimMIM model (continued pretraining)
        state = {('encoder.' + k if 'encoder.' + k in target else k): v for k, v in state.items()}
    shared = 'rel_pos_bias.relative_position_bias_table'
    if vit and shared in state and shared not in target:  # one shared table -> one per block
        table = state.pop(shared)
        for i in range(len(model.blocks)):
            state[f'blocks.{i}.attn.relative_position_bias_table'] = table.clone()
    new = ('decoder.', 'mask_token', 'head.')
    dropped = [k for k in state if k not in target and (k.startswith(new) or
                                                        vit and k.startswith('norm.'))]
    dropped += [k for k in state
                if k.startswith('head.') and k in target and state[k].shape != target[k].shape]
    state = {k: v for k, v in state.items() if k not in dropped}
    adapted = _adapt_channels(state, target)
    resized = []
    for k, v in state.items():
        t = target.get(k)
        if k.endswith('relative_position_bias_table') and t is not None and v.shape != t.shape \
                and v.shape[1:] == t.shape[1:]:
            state[k] = resize_rel_pos_table(v, t.shape[0], extra=3 if vit else 0)
            resized.append(k)
    _refuse_mismatch(model, state, target)
    model.load_state_dict(state, strict=False)
    missing = [k for k in target if k not in state and not k.endswith(BUFFERS)]
    return dict(loaded=sorted(state), resized=resized, missing=missing, dropped=dropped,
                adapted=adapted)


def _adapt_channels(state, target):
    """Another number of input channels: the patch embedding adapted as timm does (from RGB), else
    by the mean filter (equal channels respond alike); the decoder's outputs too. -> the report."""
    proj = next((k for k in ('patch_embed.proj.weight', 'encoder.patch_embed.proj.weight')
                 if k in target), None)
    if proj not in state or state[proj].shape[1] == target[proj].shape[1]:
        return []
    w, chans = state[proj], target[proj].shape[1]
    source = w.shape[1]
    if source == 3:
        state[proj] = adapt_input_conv(chans, w)
    else:
        state[proj] = w.mean(1, keepdim=True).repeat(1, chans, 1, 1) * (source / chans)
    for k in ('decoder.0.weight', 'decoder.0.bias'):
        if k in state and k in target:  # (channels x stride^2 outputs, ...): grey = the mean
            v = state[k].unflatten(0, (source, -1))
            v = v.mean(0, keepdim=True) if chans == 1 else v[[c % source for c in range(chans)]]
            state[k] = v.flatten(0, 1)
    return [proj, f'{source} -> {chans} channels']


def _refuse_mismatch(model, state, target):
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
                  for k, v in state.items() if k in target and v.shape != target[k].shape]
    unexpected = [f"{k} not in the model" for k in state if k not in target]
    may_be_new = ('head.', 'fc_norm.', 'decoder.', 'mask_token', 'encoder.mask_token')
    missing = [f"{k} not in the checkpoint" for k in target if k not in state
               and not k.endswith(BUFFERS) and not k.startswith(may_be_new)]
    problems = mismatched + unexpected + missing
    if problems:
        raise ValueError(f"the checkpoint does not fit {type(model).__name__} ({len(problems)} "
                         f"problems; first: {'; '.join(problems[:4])}): build the model with "
                         f"the architecture it was trained with")


def _spline_weights(xs, xt):
    """W (len(xt), len(xs)) with W @ y = the not-a-knot cubic spline through (xs, y) at xt
    (linear interpolation below 4 points). Float64."""
    n = len(xs)
    if n < 4:
        eye = np.eye(n)
        cols = [torch.from_numpy(np.interp(xt.numpy(), xs.numpy(), eye[i])) for i in range(n)]
        return torch.stack(cols, 1)
    h = xs[1:] - xs[:-1]
    A = torch.zeros(n, n, dtype=torch.float64)
    B = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):  # continuous first derivative: rows for the second derivatives M
        A[i, i - 1:i + 2] = torch.stack([h[i - 1], 2 * (h[i - 1] + h[i]), h[i]])
        B[i, i - 1:i + 2] = 6 * torch.stack([1 / h[i - 1], -1 / h[i - 1] - 1 / h[i], 1 / h[i]])
    A[0, :3] = torch.stack([h[1], -(h[0] + h[1]), h[0]])  # not-a-knot at x1 and x(n-2)
    A[-1, -3:] = torch.stack([h[-1], -(h[-2] + h[-1]), h[-2]])
    M = torch.linalg.solve(A, B)  # second derivatives as linear maps of y
    W = torch.zeros(len(xt), n, dtype=torch.float64)
    for r, t in enumerate(xt):
        i = int(torch.clamp(torch.searchsorted(xs, t, right=True) - 1, 0, n - 2))
        a, b = xs[i + 1] - t, t - xs[i]
        cubic = (M[i] * a ** 3 + M[i + 1] * b ** 3) / (6 * h[i])
        W[r] = cubic - (M[i] * a + M[i + 1] * b) * h[i] / 6
        W[r, i] += a / h[i]
        W[r, i + 1] += b / h[i]
    return W


def _source_positions(src, dst):
    """Where the src x src table's rows sit on the dst grid: growing, the official geometric
    progression (the step grows from 1 by q, found by bisection so that the outermost entry
    reaches dst // 2); else uniform."""
    if dst <= src:
        return torch.linspace(-(dst // 2), dst // 2, src, dtype=torch.float64)
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        lo, hi = (lo, q) if (1 - q ** (src // 2)) / (1 - q) > dst // 2 else (q, hi)
    right = torch.tensor([q ** i for i in range(src // 2)], dtype=torch.float64).cumsum(0)
    return torch.cat([-right.flip(0), torch.zeros(1, dtype=torch.float64), right])


def resize_rel_pos_table(table, rows, extra=0):
    """A relative position bias table (L, heads) of a (2w-1)^2 grid (+ `extra` cls rows, kept) at
    `rows` rows by the official cubic interpolation: window 6 / 12 tables fine-tune at 7 / 14."""
    src, dst = math.isqrt(table.shape[0] - extra), math.isqrt(rows - extra)
    xs = _source_positions(src, dst)
    xt = torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float64)
    W = _spline_weights(xs, xt)
    grid = table[:src * src].double().view(src, src, -1)
    grid = torch.einsum('ij,kjh->kih', W, grid)  # along x (columns)
    grid = torch.einsum('ij,jkh->ikh', W, grid)  # along y (rows)
    kept = table[table.shape[0] - extra:]
    return torch.cat([grid.reshape(dst * dst, -1).to(table.dtype), kept])
