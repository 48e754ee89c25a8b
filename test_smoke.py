"""Tests on CPU with tiny models and generated images: python -m pytest -q test_smoke.py"""
import argparse
import contextlib
import copy
import glob
import importlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import types
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2

import checkpoints
import data
import models
import engine
import pretrain
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, 'fixtures')
TINY_SWIN = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))


def fixture(name):
    return torch.load(os.path.join(FIXTURES, name), map_location='cpu', weights_only=True)


def cpu_run(world_size=1):
    """What engine needs of a Run, for one process on the CPU."""
    return type('run', (), dict(device=torch.device('cpu'), distributed=False, world_size=world_size))()


def timm_state(checkpoint):
    return models.to_timm_layout(checkpoint)[0]


def imagenet():
    return data.ToNormalizedTensor(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


# ---------------------------------------------------------------------------------------------------------------------
# Mask generator

@pytest.mark.parametrize('img_size, model_patch, grid, count', [(192, 4, 48, 22), (224, 16, 14, 30)])
def test_mask_ratio_shape_alignment(img_size, model_patch, grid, count):
    gen = data.MaskGenerator(img_size, 32, model_patch, 0.6)
    for _ in range(20):
        mask = gen()
        assert mask.shape == (grid, grid) and mask.dtype == torch.int64
        cells = mask.view(grid * model_patch // 32, 32 // model_patch, -1, 32 // model_patch).float()
        per_cell = cells.mean((1, 3))
        assert torch.all((per_cell == 0) | (per_cell == 1)), 'a 32px cell is partly masked'
        assert int(per_cell.sum()) == count == math.ceil((img_size // 32) ** 2 * 0.6)


def test_masks_differ_and_follow_the_seed():
    gen = data.MaskGenerator()
    torch.manual_seed(1)
    a, b = gen(), gen()
    torch.manual_seed(1)
    assert torch.equal(gen(), a) and not torch.equal(a, b)


@pytest.mark.parametrize('kwargs, message', [
    (dict(input_size=200), 'the mask patch size 32 must divide the image size 200'),
    (dict(mask_patch_size=32, model_patch_size=6), "be a multiple of the model's patch size 6"),
    (dict(mask_ratio=1.0), 'mask ratio must be in (0, 1)'),
])
def test_mask_generator_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        data.MaskGenerator(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Models

def tiny_simmim(name, **kw):
    family = models.MODELS[name]['family']
    heads = models.MODELS[name]['num_heads']
    if family == models.VIT:
        return models.build_simmim(name, img_size=32, embed_dim=2 * heads[0], **kw)
    return models.build_simmim(name, img_size=64, embed_dim=2 * heads[0], **kw)


def random_mask(model, batch, img_size, seed=0):
    # 16px squares: at init SwinV2's blocks are identities (zero res-post-norm), so with 32px squares = the encoder
    # stride a masked square's features would not depend on any visible pixel
    gen = data.MaskGenerator(img_size, 16, model.patch_size, 0.6)
    torch.manual_seed(seed)
    return torch.stack([gen() for _ in range(batch)])


@pytest.mark.parametrize('name', list(models.MODELS))
def test_every_named_model_trains_at_tiny_size(name):
    model = tiny_simmim(name, drop_path_rate=0.1)
    size = model.encoder.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size)
    mask = random_mask(model, 2, size)
    feats = model.encoder(x, mask)
    assert feats.shape == (2, model.encoder.num_features, size // model.encoder_stride, size // model.encoder_stride)
    loss = model(x, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.encoder.mask_token.grad.abs().sum() > 0
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_parameter_counts_of_the_paper_models():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(models.build_simmim('swin_base')) == 89_874_104
    assert count(models.build_simmim('vit_base')) == 86_256_720


def test_default_windows_and_sizes():
    def window_and_size(name, pretrain=True):
        config = models.model_config(name, pretrain)
        return config.window_size, config.img_size
    assert window_and_size('swin_base') == (6, 192) and window_and_size('swin_base', False) == (7, 224)
    assert window_and_size('swin_large') == (12, 192) and window_and_size('swin_large', False) == (14, 224)
    assert window_and_size('swinv2_base') == (12, 192) and window_and_size('vit_base') == (None, 224)
    model = models.build_simmim('swin_tiny', img_size=128, **TINY_SWIN)  # 128 / 32 = 4, and it reaches the blocks
    assert [s.blocks[0].window_size for s in model.encoder.layers] == [(4, 4)] * 4


def test_bad_model_arguments_give_clear_errors():
    with pytest.raises(ValueError, match='unknown model .swin_huge.; choose one of: swin_tiny'):
        models.build_simmim('swin_huge')
    with pytest.raises(ValueError, match='window size 7 does not divide stage 0.s resolution 48'):
        models.build_simmim('swin_tiny', window_size=7, **TINY_SWIN)
    with pytest.raises(ValueError, match='not divisible by the encoder stride 32'):
        models.build_simmim('swin_tiny', img_size=200, **TINY_SWIN)
    model = tiny_simmim('swin_tiny')
    with pytest.raises(ValueError, match='does not match the patch grid'):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 8, 8, dtype=torch.long))


def test_reproduces_the_official_vit_outputs():
    """Official ViT weights and the official model's outputs (fixtures/): our encoder with the mask token, the decoder
    and the loss give the same numbers. (Swin: test_every_pretraining_layout_reproduces_the_official_outputs.)"""
    model = models.build_simmim('vit_base', embed_dim=64, depths=2, num_heads=2).eval()
    report = models.load_pretrained(model, timm_state(fixture('ms_simmim_vit.pth')))
    assert report['missing'] == [] and report['dropped'] == []
    io = fixture('ms_simmim_vit_io.pt')
    assert_reproduces(model, io)
    with torch.no_grad():  # and a wrong mask is far off: the mask token matters
        assert (model.encoder(io['x'], torch.zeros_like(io['mask'])) - io['features']).abs().max() > 0.1


@torch.no_grad()
def assert_reproduces(model, io, tol=1e-5):
    """Features, reconstruction and loss of a SimMIM model equal the upstream code's within the fixtures' tolerance."""
    features = model.encoder(io['x'], io['mask'])
    torch.testing.assert_close(features, io['features'], atol=tol, rtol=tol)
    torch.testing.assert_close(model.decoder(features), io['reconstruction'], atol=tol, rtol=tol)
    assert abs(model(io['x'], io['mask']).item() - io['loss'].item()) <= tol


def test_loss_is_the_masked_l1_and_ignores_visible_pixels():
    torch.manual_seed(0)
    model = tiny_simmim('swin_tiny').eval()
    x = torch.randn(2, 3, 64, 64)
    mask = random_mask(model, 2, 64)
    with torch.no_grad():
        rec = model.reconstruct(x, mask)
        loss = model(x, mask)
    m = np.kron(mask.numpy(), np.ones((4, 4)))[:, None]  # (B, 1, H, W) pixel mask
    by_hand = (np.abs(x.numpy() - rec.numpy()) * m).sum() / (m.sum() + 1e-5) / 3
    assert abs(loss.item() - by_hand) < 1e-5
    # noise in the reconstruction of visible pixels changes nothing; in masked pixels it does
    for where, changes in ((1 - torch.from_numpy(m).float(), False), (torch.from_numpy(m).float(), True)):
        hook = model.decoder.register_forward_hook(lambda mod, inp, out: out + 5 * torch.randn_like(out) * where)
        with torch.no_grad():
            noisy = model(x, mask)
        hook.remove()
        assert (abs(noisy.item() - loss.item()) > 0.1) == changes


def test_loss_for_other_channel_counts():
    for chans in (1, 4):
        model = tiny_simmim('swin_tiny', in_chans=chans)
        x = torch.randn(2, chans, 64, 64)
        mask = random_mask(model, 2, 64)
        rec = model.reconstruct(x, mask)
        assert rec.shape == x.shape
        m = mask.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
        expected = ((x - rec).abs() * m).sum() / (m.sum() + 1e-5) / chans
        torch.testing.assert_close(model(x, mask), expected)


def test_local_target_normalisation_matches_a_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 9, 11)
    mean, std = models.local_stats(x, 5)
    out = (x - mean) / std
    a = x.numpy()
    for c, i, j in [(0, 0, 0), (1, 4, 5), (0, 8, 10), (1, 2, 9)]:
        patch = a[0, c, max(i - 2, 0):i + 3, max(j - 2, 0):j + 3]
        expected = (a[0, c, i, j] - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
        assert abs(out[0, c, i, j].item() - expected) < 1e-4
    model = tiny_simmim('swinv2_tiny', norm_target_window=47)
    assert torch.isfinite(model(torch.randn(1, 3, 64, 64), random_mask(model, 1, 64)))
    # a model predicting its target exactly: zero loss, and reconstruct() gives back the image (the pictures' input)
    model = tiny_simmim('swin_tiny', norm_target_window=5)
    x, mask = torch.randn(2, 3, 64, 64), random_mask(model, 2, 64)
    mean, std = models.local_stats(x, 5)
    model.decoder.forward = lambda features: (x - mean) / std
    assert model(x, mask).item() < 1e-6
    torch.testing.assert_close(model.reconstruct(x, mask), x, atol=1e-4, rtol=1e-4)


def test_fused_swinv2_attention_equals_timm():
    torch.manual_seed(0)
    model = models.build_simmim('swinv2_tiny', img_size=64, window_size=4, **TINY_SWIN).eval()
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, WindowAttentionV2):
            m.__class__ = WindowAttentionV2  # timm's own forward: explicit softmax
    assert sum(type(m) is models.FusedWindowAttentionV2 for m in model.modules()) == 8
    x, mask = torch.randn(2, 3, 64, 64), random_mask(model, 2, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x, mask), reference.encoder(x, mask), atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    for name in ('swin_tiny', 'vit_small'):
        torch.manual_seed(0)
        model = tiny_simmim(name, drop_path_rate=0.)
        size = model.encoder.patch_embed.img_size[0]
        x, mask = torch.randn(2, 3, size, size), random_mask(model, 2, size)
        model(x, mask).backward()
        ckpt = copy.deepcopy(model)
        ckpt.encoder.set_grad_checkpointing(True)
        ckpt.zero_grad()
        ckpt(x, mask).backward()
        for (n, p), q in zip(model.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


# ---------------------------------------------------------------------------------------------------------------------
# Data

def write_images(folder, n, size=80, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        width = size + 8 * i % 24
        base = rng.integers(0, 255, (1, 1, 3)) + np.linspace(0, 60, width)[None, :, None]
        img = (base + rng.normal(0, 20, (size, width, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f'img{i}.{"jpg" if i % 2 else "png"}'))


def test_load_image_converts_every_mode(tmp_path):
    rgb = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    cases = {
        'gray.png': Image.fromarray(rgb[..., 0]),
        'rgba.png': Image.fromarray(np.dstack([rgb, np.full((20, 30), 128, np.uint8)])),
        'palette.png': Image.fromarray(rgb).convert('P'),
        'cmyk.jpg': Image.fromarray(rgb).convert('CMYK'),
        'photo.webp': Image.fromarray(rgb),
        'photo.tiff': Image.fromarray(rgb),
        'photo.bmp': Image.fromarray(rgb),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        for chans, mode in ((3, 'RGB'), (1, 'L')):
            out = data.load_image(tmp_path / name, chans)
            assert out.mode == mode and out.size == (30, 20), name
    transparent = np.asarray(data.load_image(tmp_path / 'rgba.png'), dtype=float)  # half alpha over white
    assert np.allclose(transparent, rgb.astype(float) * 128 / 255 + 255 * 127 / 255, atol=1.5)


def test_16_bit_images_keep_their_precision_by_the_intensity_rule(tmp_path):
    ramp = np.tile(np.arange(0, 4096, 4, dtype=np.uint16), (8, 1))  # 12-bit data in a 16-bit PNG: 1024 levels
    Image.fromarray(ramp).save(tmp_path / 'xray.png')
    with pytest.warns(UserWarning, match='reach 4092 of 65535'):
        dark = data.load_image(tmp_path / 'xray.png', 1)
    assert dark.shape == (1, 8, 1024) and float(dark.max()) == pytest.approx(4092 / 65535)  # the type's range
    for rule, white in ((4095, 4095), ('image', 4092)):
        x = data.load_image(tmp_path / 'xray.png', 1, rule)
        assert len(x.unique()) == 1024 and float(x.max()) == pytest.approx(4092 / white)  # not 256 levels
        assert torch.allclose(x[0, 0], torch.tensor(ramp[0] / white, dtype=torch.float32))
    spread = data.load_image(tmp_path / 'xray.png', 3, 'percentile')
    assert spread.shape == (3, 8, 1024) and float(spread.min()) == 0 and float(spread.max()) == 1
    assert len(np.unique((ramp / 257).astype(np.uint8))) == 16  # the control: 8 bits of it (the old reading) keep 16
    normalize = data.ToNormalizedTensor([0.5], [0.25])
    assert torch.allclose(normalize(x), (x - 0.5) / 0.25, atol=1e-6)  # tensors of 0-1 pixels
    augmented = data.finetune_transform(64, normalize, '', 0, 0.6, 0)(torch.rand(1, 48, 48))  # + color jitter
    assert augmented.shape == (1, 64, 64) and augmented.std() > 0.5  # the image survives (at 0-255 it turned flat)


def test_32_bit_tiffs_are_read_by_their_type_and_deep_images_meet_randaugment_as_8_bit(tmp_path):
    Image.fromarray(np.array([[0, 70000], [2 ** 31 - 1, 7]], np.int32)).save(tmp_path / 'deep.tif')
    x = data.load_image(tmp_path / 'deep.tif', 1)
    assert x.flatten().tolist() == pytest.approx([0, 70000 / (2 ** 31 - 1), 1, 7 / (2 ** 31 - 1)])  # not 70000 clipped
    augment = data.finetune_transform(32, imagenet(), 'rand-m9-mstd0.5-inc1')
    torch.manual_seed(0)
    for _ in range(5):  # a 16-bit image among 8-bit ones: rounded to 8 bits for RandAugment, not a crash
        with pytest.warns(UserWarning, match='rounded to 8 bits for RandAugment'):
            assert augment(torch.rand(3, 40, 48)).shape == (3, 32, 32)


def test_npy_arrays_load_with_any_number_of_channels(tmp_path):
    tile = np.random.default_rng(0).integers(0, 10000, (12, 10, 5)).astype(np.uint16)  # 5-band satellite tile
    np.save(tmp_path / 'tile.npy', tile)
    x = data.load_image(tmp_path / 'tile.npy', 5, 10000)
    expected = torch.tensor(tile.transpose(2, 0, 1) / 10000., dtype=torch.float32)
    assert x.shape == (5, 12, 10) and torch.allclose(x, expected)
    with pytest.raises(ValueError, match='has 5 channels, the model takes 3'):
        data.load_image(tmp_path / 'tile.npy', 3)
    transform = data.PretrainTransform(8, data.MaskGenerator(8, 4, 4, 0.5), data.ToNormalizedTensor([.5] * 5, [.2] * 5))
    (image, mask), _, _ = data.ImageDataset(str(tmp_path), transform, 5, intensity=10000)[(0, 1)]
    assert image.shape == (5, 8, 8) and mask.shape == (2, 2)
    with pytest.raises(ValueError, match='image files give 1 or 3 channels, not 5'):
        Image.fromarray(tile[..., 0].astype(np.uint8)).save(tmp_path / 'band.png')
        data.load_image(tmp_path / 'band.png', 5)


def test_folder_stats_normalise_the_folder_to_zero_mean_unit_std(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray((rng.random((9 + i, 7, 3)) * [255, 120, 40] + [0, 60, 10]).astype(np.uint8)).save(
            tmp_path / f'{i}.png')
    ds = data.ImageDataset(str(tmp_path), None)
    mean, std, n = data.folder_stats(ds)
    pixels = torch.cat([torch.from_numpy(np.asarray(ds.load(i)[0], dtype=np.float64)).reshape(-1, 3)
                        for i in range(5)]) / 255
    for m, s in ((mean, std), (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)):
        normalised = (pixels - torch.tensor(m, dtype=torch.float64)) / torch.tensor(s, dtype=torch.float64)
        ok = torch.allclose(normalised.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-9) and \
            torch.allclose(normalised.std(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-9)
        assert ok == (m is mean), m  # ours: 0 and 1; ImageNet's (the negative control): not
    assert n == 5


def test_normalised_tensor_equals_torchvision_totensor_and_normalize():
    import torchvision.transforms as T
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    for img, chans in ((Image.fromarray(rgb), 3), (Image.fromarray(rgb[..., 0]), 1)):
        ours = imagenet() if chans == 3 else data.ToNormalizedTensor([0.449], [0.226])
        reference = T.Normalize(ours.mean, ours.std)(T.ToTensor()(img))
        assert ours(img).dtype == torch.float32 and ours(img).shape == (chans, 9, 7)
        assert torch.allclose(ours(img), reference, atol=1e-6)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 40, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    img.save(tmp_path / 'rotated.jpg', exif=exif)
    assert data.load_image(tmp_path / 'rotated.jpg').size == (10, 40)


def test_dataset_reads_folders_recursively_and_skips_bad_files(tmp_path):
    write_images(tmp_path / 'a', 3)
    write_images(tmp_path / 'b' / 'deeper', 2)
    (tmp_path / 'a' / 'broken.jpg').write_bytes(b'not a picture at all')
    (tmp_path / 'a' / 'notes.txt').write_text('ignored')
    ds = data.ImageDataset(str(tmp_path), data.eval_transform(32, imagenet()))
    assert len(ds) == 6 and ds.classes == ['a', 'b']
    broken = [i for i in range(len(ds)) if ds.sample(i)[0].endswith('broken.jpg')][0]
    with pytest.warns(UserWarning, match='skipping unreadable image .*broken.jpg'):
        img, label, skipped = ds[broken]
    assert img.shape == (3, 32, 32) and skipped == 1 and label == 0
    with pytest.raises(ValueError, match=r"holds image files \(e.g. .*\), which give 1 or 3 channels, not 4; store "
                                         r"4-channel data as .npy arrays"):  # at once, not a warning for each file
        data.ImageDataset(str(tmp_path), None, in_chans=4)
    flat = tmp_path / 'flat'
    write_images(flat, 2)
    assert data.ImageDataset(str(flat), None).sample(1) == (str(flat / 'img1.jpg'), -1)  # no class folders: no labels


def test_seeded_samples_do_not_depend_on_the_process(tmp_path):
    write_images(tmp_path, 2)
    transform = data.PretrainTransform(32, data.MaskGenerator(32, 16, 4, 0.5), imagenet())
    ds = data.ImageDataset(str(tmp_path), transform)
    (a, ma), _, _ = ds[(0, 1234)]
    torch.manual_seed(99)
    (b, mb), _, _ = ds[(0, 1234)]
    (c, mc), _, _ = ds[(0, 4321)]
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not (torch.equal(a, c) and torch.equal(ma, mc))
    ds = data.ImageDataset(str(tmp_path), data.finetune_transform(32, imagenet()))  # timm: Python's, numpy's
    first = [ds[(0, seed)][0] for seed in range(12)]
    random.seed(99)
    np.random.seed(99)
    assert all(torch.equal(a, ds[(0, seed)][0]) for seed, a in enumerate(first))
    assert not torch.equal(first[0], first[1])


def write_jpegs_of_every_kind(folder):
    """RGB JPEGs of several sizes, and the files --decode device leaves to the workers: grey, CMYK, EXIF-turned
    JPEGs and a PNG. -> names of the RGB JPEGs."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    rgb = []
    for i, (h, w) in enumerate([(120, 160), (150, 110), (97, 131), (200, 90)]):
        noise = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
        img = Image.fromarray(noise).resize((w, h), Image.BICUBIC)
        img.save(folder / f'rgb{i}.jpg', quality=90 - 10 * i, subsampling=i % 3)
        rgb.append(f'rgb{i}.jpg')
    img.convert('L').save(folder / 'grey.jpg')
    img.convert('CMYK').save(folder / 'cmyk.jpg')
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(folder / 'turned.jpg', exif=exif)
    img.save(folder / 'lossless.png')
    return rgb


def decoded_both_ways(folder, decoder=None, seed=0):
    """The pretraining batch of every image in folder: the workers' (PIL) and --decode device's, the same draws.
    -> (workers' images, device's images, masks equal, which were JpegCrops, files skipped for each), images in
    0-255 levels."""
    transform = data.PretrainTransform(48, data.MaskGenerator(48, 16, 4, 0.6), imagenet())
    workers, device = (data.ImageDataset(str(folder), transform, encoded=e) for e in (False, True))
    keys = [(i, seed + i) for i in range(len(workers))]
    today = [workers[k][0] for k in keys]
    (images, masks), _, skipped = data.collate_crops([device[k] for k in keys])
    decoded = (decoder or data.DeviceDecoder(48, imagenet(), 'cpu'))(images, skipped)
    levels = lambda x: x * torch.tensor(IMAGENET_DEFAULT_STD).view(-1, 1, 1) * 255
    crops = [i in images.at for i in range(len(keys))]
    return (levels(torch.stack([x for x, _ in today])), levels(decoded),
            torch.equal(masks, torch.stack([m for _, m in today])), crops, skipped.tolist())


def test_device_decoding_is_within_one_level_of_the_workers_pixels(tmp_path):
    rgb = write_jpegs_of_every_kind(tmp_path)
    today, decoded, masks_equal, crops, skipped = decoded_both_ways(tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert skipped == [0] * len(names)
    assert [n for n, c in zip(names, crops) if c] == rgb and masks_equal  # the rest decoded by the workers
    gap = (today - decoded).abs()
    for name, g in zip(names, gap):
        bound = 1 + 1e-3 if name in rgb else 1e-3  # the others: exactly the workers' (float rounding)
        assert g.max() <= bound, name
    share = (gap > 0.5).float().mean().item()
    assert share < 0.25, share  # measured 13-14%: the rest equal
    # negative controls: another draw, or the resize without its antialiasing filter, is far outside the bound
    other = decoded_both_ways(tmp_path, seed=1)[1]
    assert (today - other).abs().max() > 50
    plain = torch.nn.functional.interpolate
    with mock.patch('torch.nn.functional.interpolate', lambda *a, **k: plain(*a, **dict(k, antialias=False))):
        aliased = decoded_both_ways(tmp_path)[1]
    assert (today - aliased).abs().max() > 10


def test_device_decoding_skips_a_jpeg_no_decoder_reads(tmp_path):
    write_jpegs_of_every_kind(tmp_path)
    good = (tmp_path / 'rgb0.jpg').read_bytes()
    (tmp_path / 'rgb1.jpg').write_bytes(good[:600] + bytes(2000) + good[2600:])  # a whole header, a bad middle
    (tmp_path / 'rgb2.jpg').write_bytes(good[:len(good) // 2])  # cut short: the workers' PIL skips it, as today
    with pytest.warns(UserWarning) as warned:
        _, decoded, _, crops, skipped = decoded_both_ways(tmp_path)
    assert crops == [False, False, False, True, True, True, True, False]  # rgb2: rgb3 instead, as the workers do
    assert skipped == [0, 0, 0, 0, 1, 1, 0, 0]  # rgb1 (replaced on the device) and rgb2 (skipped by a worker)
    messages = ' '.join(str(w.message) for w in warned)
    assert re.search('skipping unreadable image .*rgb1.jpg', messages)
    assert re.search('skipping unreadable image .*rgb2.jpg', messages)
    names = sorted(os.listdir(tmp_path))
    assert torch.equal(decoded[names.index('rgb1.jpg')], decoded[0])  # replaced by the batch's first image
    decoder = data.DeviceDecoder(48, imagenet(), 'cpu')
    bad = data.read_jpeg(tmp_path / 'rgb1.jpg')
    crop = data.JpegCrop(bad.data, (0, 0, 8, 8), False, bad.path, bad.size[::-1])
    bad_batch = lambda n: data.collate_crops([((crop, torch.zeros(12, 12, dtype=torch.int64)), 0, 0)] * n)[0][0]
    alone = 'none of the images of a batch could be read, and no earlier batch has one to stand in .e.g. .*rgb1'
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=alone):
        decoder(bad_batch(2), torch.zeros(2))
    grey = data.ImageDataset(str(tmp_path), data.PretrainTransform(48, data.MaskGenerator(48, 16, 4, 0.6), imagenet()),
                             encoded=True)[(1, 0)]  # grey.jpg: the workers'
    assert data.JpegCrop not in map(type, grey[0])
    with pytest.warns(UserWarning):  # the batch's only JPEG unreadable: the worker's image instead
        (images, _), _, skipped = data.collate_crops([((crop, torch.zeros(12, 12, dtype=torch.int64)), 0, 0), grey])
        mixed = decoder(images, skipped)
    assert torch.equal(mixed[0], mixed[1]) and torch.equal(mixed[1], grey[0][0]) and skipped.tolist() == [1, 0]
    with pytest.warns(UserWarning):  # a batch of one unreadable JPEG: an image of the batch before
        assert torch.equal(decoder(bad_batch(1), torch.zeros(1))[0], grey[0][0])


def test_device_decoding_rereads_an_image_decoded_to_another_size_than_its_header(tmp_path):
    write_jpegs_of_every_kind(tmp_path)
    right = decoded_both_ways(tmp_path)[1]
    decoder = data.DeviceDecoder(48, imagenet(), 'cpu')
    decode = decoder.decode_jpeg
    decoder.decode_jpeg = lambda files: [x[:, :50, :60] for x in decode(files)]  # as a damaged file might decode
    assert torch.equal(decoded_both_ways(tmp_path, decoder)[1], right)  # PIL's pixels: the same on a CPU


def test_device_decoding_where_torchvision_cannot_decode_is_one_line():
    import torchvision.io
    refuse = mock.Mock(side_effect=RuntimeError('decode_jpegs_cuda: torchvision not compiled with nvJPEG support'))
    with mock.patch.object(torchvision.io, 'decode_jpeg', refuse), pytest.raises(
            ValueError, match=r"^torchvision cannot decode JPEGs on cpu here \(decode_jpegs_cuda: torchvision not "
                              r"compiled with nvJPEG support\): use --decode workers$"):
        data.DeviceDecoder(48, imagenet(), 'cpu')
    assert data.DeviceDecoder(48, imagenet(), 'cpu').size == [48, 48]  # the control: this torchvision decodes


def test_device_decoding_batches_fit_a_low_open_files_limit(tmp_path):
    # each tensor a loader worker sends is a file descriptor in the training process: a batch sends its JPEGs as one
    # tensor (one JPEG a tensor failed here with 'Too many open files' at a batch of 300 under a limit of 256)
    for i in range(600):
        Image.fromarray(np.full((20, 24, 3), i % 256, np.uint8)).save(tmp_path / f'{i}.jpg')
    script = f"""if True:
        import resource, data
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        normalize = data.ToNormalizedTensor([.5] * 3, [.2] * 3)
        transform = data.PretrainTransform(16, data.MaskGenerator(16, 8, 4, 0.5), normalize)
        loader = data.build_loader(data.ImageDataset({str(tmp_path)!r}, transform, encoded=True), 300, 2, 0)
        loader.sampler.set_epoch(0)
        print(sum(sum(map(bool, images.ends)) for (images, _), _, _ in loader))"""
    done = subprocess.run([sys.executable, '-c', script], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ['600'], done.stderr[-2000:]


def test_pretraining_with_device_decoding_trains_as_with_the_workers(tmp_path, capsys):
    write_jpegs_of_every_kind(tmp_path / 'data')
    sizes, decode = [], data.DeviceDecoder.decode
    spy = lambda self, crops: sizes.append(len(crops)) or decode(self, crops)
    one_epoch = ['--epochs', '1', '--warmup-epochs', '0']
    with mock.patch.object(data.DeviceDecoder, 'decode', spy):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'device', '--decode', 'device', *one_epoch))
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'workers', *one_epoch))
    assert sum(sizes) == 4  # the RGB JPEGs, each once
    device, workers = ([r['loss'] for r in read_log(tmp_path / run) if 'step' in r] for run in ('device', 'workers'))
    assert len(device) == 2 and device == pytest.approx(workers, rel=1e-2)
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'grey', '--decode', 'device', '--in-chans', '1',
                                *one_epoch))
    assert 'warning: --decode device decodes RGB JPEGs for 3-channel models; these 1-channel images are decoded ' \
           'by the workers' in capsys.readouterr().out
    good = (tmp_path / 'data' / 'rgb0.jpg').read_bytes()
    (tmp_path / 'data' / 'rgb1.jpg').write_bytes(good[:600] + bytes(2000) + good[2600:])  # no decoder reads it
    with pytest.warns(UserWarning, match='rgb1.jpg'):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'damaged', '--decode', 'device', *one_epoch))
    assert sum(r.get('skipped_files', 0) for r in read_log(tmp_path / 'damaged')) == 1  # replaced on the device


def test_randaugment_posterize_at_the_top_magnitude_turns_the_image_black():
    ops = [op for t in data.finetune_transform(32, imagenet()).transforms for op in getattr(t, 'ops', [])
           if op.name.startswith('Posterize')]
    assert ops
    for op in ops:  # magnitude 10 keeps 0 bits: Pillow 13 raises, earlier Pillow gave black
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
        out = op(Image.new('RGB', (8, 8), (200, 100, 50)))
        assert np.asarray(out).max() == 0


@pytest.mark.parametrize('make, message', [
    (lambda p: None, 'is not a folder'),
    (lambda p: os.makedirs(p), 'no images'),
])
def test_missing_or_empty_data_folder_is_one_clear_error(tmp_path, make, message):
    make(tmp_path / 'data')
    with pytest.raises(ValueError, match=message):
        data.ImageDataset(str(tmp_path / 'data'), None)


# ---------------------------------------------------------------------------------------------------------------------
# pretrain.py end to end

def pretrain_args(data_path, output, *extra):
    return pretrain.get_args_parser().parse_args([
        '--model', 'swin_tiny', '--img-size', '64', '--mask-patch-size', '16', '--embed-dim', '8',
        '--depths', '1', '1', '1', '1', '--num-heads', '1', '2', '2', '4', '--data-path', str(data_path),
        '--batch-size', '4', '--num-workers', '0', '--epochs', '2', '--warmup-epochs', '1', '--base-lr', '0.5',
        '--output', str(output), '--print-freq', '1', '--save-freq', '1', '--amp', 'off', *extra])


def read_log(output):
    with open(os.path.join(output, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_weight_decay_groups_and_lr_schedules_follow_the_recipe():
    model = tiny_simmim('swinv2_tiny')
    args = pretrain.get_args_parser().parse_args(['--model', 'swinv2_tiny', '--epochs', '10', '--warmup-epochs', '2',
                                                  '--batch-size', '64'])
    recipe = engine.recipe(args, cpu_run(world_size=2), pretrain.RECIPE)
    schedule = engine.Schedule(recipe, 25, 2)
    assert '25 steps per epoch' in str(schedule)  # 25 batches per process
    assert recipe['effective_batch'] == 128 and schedule.lr == 2e-4 * 128 / 512 and schedule.min_lr == 1e-5 / 4
    optimizer = engine.build_optimizer(models.param_groups(model, recipe['weight_decay']), schedule.lr)
    decay = {n for n, p in model.named_parameters()
             if any(p is q for g in optimizer.param_groups if g['weight_decay'] > 0 for q in g['params'])}
    assert 'encoder.layers.0.blocks.0.attn.qkv.weight' in decay and 'decoder.0.weight' in decay
    for name in ('encoder.mask_token', 'encoder.layers.0.blocks.0.attn.logit_scale', 'encoder.norm.weight',
                 'encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight', 'decoder.0.bias',
                 'encoder.layers.0.blocks.0.attn.q_bias'):
        assert name not in decay, name
    schedule = engine.Schedule(recipe, 5, 2)  # 5 steps per epoch
    base, warm, low = schedule.lr, schedule.warmup_lr, schedule.min_lr
    scheduler = schedule.scheduler(optimizer)
    for t in (0, 3, 9, 10, 27, 49):
        scheduler.step_update(t)
        cosine = low + 0.5 * (base - low) * (1 + math.cos(math.pi * t / 50))
        expected = warm + t * (base - warm) / 10 if t < 10 else cosine
        assert optimizer.param_groups[0]['lr'] == pytest.approx(expected, rel=1e-9), t
    recipe.update(lr_scheduler='multistep', multisteps=[6, 8])
    scheduler = engine.Schedule(recipe, 5, 2).scheduler(optimizer)
    for t, factor in ((10, 1), (29, 1), (30, .1), (39, .1), (40, .01)):
        scheduler.step_update(t)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(base * factor, rel=1e-9), t


def test_pretrain_end_to_end_with_exact_resume(tmp_path, capsys):
    write_images(tmp_path / 'data', 8)
    (tmp_path / 'data' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
    Image.fromarray(np.full((70, 70), 90, np.uint8)).save(tmp_path / 'data' / 'gray.png')
    Image.fromarray(np.full((70, 70, 4), 90, np.uint8)).save(tmp_path / 'data' / 'rgba.png')
    with pytest.warns(UserWarning, match='corrupt.jpg'):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run'))
    out = capsys.readouterr().out
    assert 'effective batch 4; 2 steps per epoch' in out and 'lr 0.0039' in out
    log = read_log(tmp_path / 'run')
    steps = [r for r in log if 'step' in r]
    assert [r['step'] for r in steps] == [1, 2, 3, 4] and all(math.isfinite(r['loss']) for r in steps)
    assert sum(r['skipped_files'] for r in steps) >= 1
    files = set(os.listdir(tmp_path / 'run'))
    assert {'checkpoint.pth', 'ckpt_epoch_0.pth', 'ckpt_epoch_1.pth', 'args.json', 'reconstruction_start.png',
            'reconstruction_end.png'} <= files and not any(f.endswith('.tmp') for f in files)
    picture = Image.open(tmp_path / 'run' / 'reconstruction_end.png')
    assert picture.size == (4 * 66 + 2, 8 * 66 + 2)  # 4 columns x 8 images of 64px with 2px padding
    final = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    assert final['epoch'] == 1 and set(final) >= {'model', 'optimizer', 'trainer', 'config', 'recipe'}
    assert json.load(open(tmp_path / 'run' / 'args.json'))['torch'] == torch.__version__

    # killed in epoch 1 after its log lines, before its checkpoint: auto-resume from the epoch-0 checkpoint ends with
    # the same weights, and the log reads as the uninterrupted run's (the lost attempt's records dropped)
    os.makedirs(tmp_path / 'again')
    os.link(tmp_path / 'run' / 'ckpt_epoch_0.pth', tmp_path / 'again' / 'checkpoint.pth')
    shutil.copytree(tmp_path / 'run' / 'tensorboard', tmp_path / 'again' / 'tensorboard')
    with open(tmp_path / 'again' / 'log.jsonl', 'w') as f:
        f.write(open(tmp_path / 'run' / 'log.jsonl').read()[:-40])  # and its last line cut short
    with pytest.warns(UserWarning, match='corrupt.jpg'):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'again'))
    assert 'resumed from' in capsys.readouterr().out
    resumed = torch.load(tmp_path / 'again' / 'checkpoint.pth', weights_only=True)
    for k, v in final['model'].items():
        assert torch.equal(v, resumed['model'][k]), k
    assert [(r.get('step'), r.get('loss')) for r in read_log(tmp_path / 'again')] == \
        [(r.get('step'), r.get('loss')) for r in log]

    # TensorBoard shows log.jsonl's numbers, across the resume each step once (its steps 3 and 4 written twice)
    for run in ('run', 'again'):
        scalars, pictures = read_tensorboard(tmp_path / run / 'tensorboard')
        assert scalars == log_scalars(read_log(tmp_path / run), steps_per_epoch=2) and pictures == [0, 2, 4], run
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    written = [e.step for f in glob.glob(str(tmp_path / 'again' / 'tensorboard' / '*')) for e in
               EventFileLoader(f).Load() if e.HasField('summary') and e.summary.value[0].tag == 'loss']
    assert sorted(written) == [1, 2, 3, 3, 4, 4]  # the control: what the purge at the resume hides


def test_a_resume_with_fewer_steps_per_epoch_keeps_the_whole_log_and_counts_on(tmp_path, capsys):
    write_images(tmp_path / 'data', 8)
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run'))  # batch 4: 2 steps per epoch, log steps 1-4
    before = read_log(tmp_path / 'run')
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', '--epochs', '4', '--batch-size', '8',
                                '--accept-changes'))  # 1 step per epoch: the schedule's steps 2 and 3
    assert 'resumed from' in capsys.readouterr().out
    log = read_log(tmp_path / 'run')
    assert log[:len(before)] == before  # renumbered by the schedule, steps 3 and 4 were dropped at the resume
    assert [r['step'] for r in log if 'step' in r] == [1, 2, 3, 4, 5, 6]
    assert [r['epoch'] for r in log if 'epoch_loss' in r] == [0, 1, 2, 3]
    assert torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)['logged_steps'] == 6
    scalars, pictures = read_tensorboard(tmp_path / 'run' / 'tensorboard')
    assert [step for step, _ in scalars['loss']] == [1, 2, 3, 4, 5, 6] and pictures == [0, 2, 4, 5, 6]


def read_tensorboard(folder):
    """TensorBoard's view of a run: {tag: [(step, value)]} and the steps of its pictures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(folder), size_guidance={'scalars': 0, 'images': 0})
    board.Reload()
    scalars = {tag: [(e.step, pytest.approx(e.value, rel=1e-6)) for e in board.Scalars(tag)]
               for tag in board.Tags()['scalars']}
    pictures = board.Images('reconstruction') if board.Tags()['images'] else []
    return scalars, [e.step for e in pictures]


def log_scalars(log, steps_per_epoch):
    """log.jsonl's numbers as read_tensorboard gives them."""
    scalars = {}
    for r in log:
        step = r.get('step', (r['epoch'] + 1) * steps_per_epoch)
        for key, value in r.items():
            if key not in ('epoch', 'step') and type(value) in (int, float):
                scalars.setdefault(key, []).append((step, value))
    return scalars


def test_device_cuda_n_is_that_gpu_and_refused_where_it_cannot_be(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    monkeypatch.setenv('LOCAL_RANK', '0')
    assert engine.pick_device('cuda:1') == torch.device('cuda:1')  # it was cuda:0, the local rank's
    assert engine.pick_device('cuda') == torch.device('cuda:0')
    with pytest.raises(ValueError, match=r"^--device cuda:2, but torch sees 2 GPU\(s\) here: cuda:0 to cuda:1$"):
        engine.pick_device('cuda:2')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    with pytest.raises(ValueError, match='would put every process of this machine on one GPU: use --device cuda'):
        engine.pick_device('cuda:1')


def test_pretrain_bad_input_is_one_line(tmp_path):
    write_images(tmp_path / 'data', 2)
    os.makedirs(tmp_path / 'empty')
    cases = [
        (tmp_path / 'missing', [], "data path '.*missing' is not a folder"),
        (tmp_path / 'empty', [], 'no images'),
        (tmp_path / 'data', [], r'a training step needs 1 full batch\(es\) of 4 images on each of 1 process\(es\), '
                                r'and the images make 0 per process: lower --batch-size or add images'),
        (tmp_path / 'data', ['--img-size', '72'], 'not divisible by the encoder stride 32'),
        (tmp_path / 'data', ['--model', 'swinv2_tiny', '--window-size', '2', '--num-heads', '1', '2', '2', '3'],
         "swinv2_tiny's width 64 in stage 3 is not divisible by its 3 attention heads"),
        (tmp_path / 'data', ['--model', 'vit_small', '--depths', '1', '--num-heads', '2', '--window-size', '4'],
         'vit_small has no window size'),
    ]
    for path, extra, message in cases:
        with pytest.raises(SystemExit, match='^error: .*' + message):
            pretrain.main(pretrain_args(path, tmp_path / 'run', *extra))
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'garbage')
    with pytest.raises(SystemExit, match="cannot load checkpoint '.*bad.pth'"):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', '--batch-size', '1', '--resume', str(bad)))


def test_nonfinite_steps_are_skipped_then_abort(tmp_path, monkeypatch):
    write_images(tmp_path / 'data', 8)
    original = models.SimMIM.forward
    calls = []

    def poisoned(self, x, mask):  # the 2nd step goes bad once, then every step from the 4th on
        calls.append(1)
        loss = original(self, x, mask)
        return loss * float('nan') if len(calls) == 2 or len(calls) >= 4 else loss

    monkeypatch.setattr(models.SimMIM, 'forward', poisoned)
    with pytest.raises(SystemExit, match='3 consecutive steps with a non-finite loss'):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', '--max-nonfinite', '3', '--epochs', '4'))
    log = read_log(tmp_path / 'run')
    assert [r['nonfinite_steps'] for r in log if 'step' in r][:4] == [0, 1, 1, 2]


@pytest.mark.parametrize('amp', ['off', 'bf16', 'fp16'])
def test_a_nonfinite_step_changes_nothing_on_the_device(amp):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    args = pretrain.get_args_parser().parse_args(['--model', 'swin_tiny', '--amp', amp, '--max-nonfinite', '2'])
    recipe = engine.recipe(args, cpu_run(), pretrain.RECIPE)
    run = type('run', (), {'device': torch.device('cpu'), 'distributed': False})()
    scheduler = type('scheduler', (), {'step_update': lambda self, step: None})()
    schedule = type('schedule', (), {'scheduler': lambda self, optimizer: scheduler, 'lr': 1e-2})()
    trainer = engine.Trainer(model, schedule, recipe, args, run)
    x = torch.randn(16, 4)
    scale = lambda factor: (lambda batch: model(batch).float().square().mean() * factor)
    snapshot = lambda: copy.deepcopy((model.state_dict(), trainer.optimizer.state_dict()['state']))

    trainer.step(0, [x], scale(1.))
    before = snapshot()
    _, grad_norm = trainer.step(1, [x], scale(float('nan')))
    assert not torch.isfinite(grad_norm)
    after = snapshot()
    for a, b in zip(before[0].values(), after[0].values()):
        assert torch.equal(a, b)
    for i in before[1]:
        for key in before[1][i]:
            assert torch.equal(before[1][i][key], after[1][i][key]), key  # moments and step count
    assert trainer.check_nonfinite(1) == 1
    trainer.step(2, [x], scale(1.))
    assert not torch.equal(model[0].weight, before[0]['0.weight'])  # a finite step updates again
    assert trainer.optimizer.state_dict()['state'][0]['step'] == 2
    trainer.step(3, [x], scale(float('inf')))
    trainer.step(4, [x], scale(float('nan')))
    with pytest.raises(ValueError, match='2 consecutive steps with a non-finite'):
        trainer.check_nonfinite(4)
    state = trainer.state_dict()
    assert state['trainer']['nonfinite_total'] == 3
    trainer = engine.Trainer(model, schedule, recipe, args, run)
    trainer.load_state_dict(checkpoints.Checkpoint('x.pth', {}, {}, 'ours', {}, state))  # as a resume does
    trainer.step(5, [x], scale(float('nan')))
    with pytest.raises(ValueError, match='3 consecutive steps'):  # the streak goes on across the resume
        trainer.check_nonfinite(5)
    trainer.step(6, [x], scale(1.))
    assert trainer.nonfinite.tolist() == [0, 3, 4]  # streak, longest, total


def stop_agreement_worker(rank, port, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    run = engine.Run(pretrain.get_args_parser().parse_args(['--device', 'cpu', '--output', '.']))
    try:
        for step in range(10):
            run.sigterm = run.sigterm or (rank == 1 and step == 3)  # only rank 1 is signalled, during step 3
            means = run.sync(float(rank), 2.0)
            if run.stopping:
                break
        results[rank] = step, means
        probe = torch.nn.BatchNorm1d(2, affine=False)  # the linear probe's head: statistics of each rank's batches
        probe(torch.tensor([[1., 2.], [3., 4.]]) * (rank + 1))
        alone = probe.running_mean.clone()
        engine.Trainer.average_statistics(types.SimpleNamespace(model=probe, run=run))
        results[f'bn{rank}'] = alone.tolist(), probe.running_mean.tolist()
    finally:
        run.close()


def test_a_sigterm_to_one_rank_stops_every_rank_after_the_same_step():
    port = 29500 + os.getpid() % 1000
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(stop_agreement_worker, args=(port, results), nprocs=2)
    assert results[0] == results[1] == (3, [0.5, 2.0])  # the log line's means, and the stop
    (alone0, averaged0), (alone1, averaged1) = results['bn0'], results['bn1']
    assert alone0 == pytest.approx([0.2, 0.3]) and alone1 == pytest.approx([0.4, 0.6])  # momentum 0.1
    assert averaged0 == averaged1 == pytest.approx([0.3, 0.45])


def test_torchrun_two_processes_on_cpu(tmp_path):
    write_images(tmp_path / 'data', 8)
    args = ['--model', 'vit_small', '--img-size', '32', '--mask-patch-size', '16', '--embed-dim', '12',
            '--depths', '2', '--num-heads', '2', '--data-path', str(tmp_path / 'data'), '--batch-size', '2',
            '--num-workers', '1', '--epochs', '1', '--warmup-epochs', '0', '--output', str(tmp_path / 'run'),
            '--print-freq', '1', '--amp', 'off']
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             os.path.join(HERE, 'pretrain.py'), *args], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'world size 2 x batch 2 x accumulation 1 = effective batch 4; 2 steps per epoch' in result.stdout
    assert len([r for r in read_log(tmp_path / 'run') if 'step' in r]) == 2  # rank 0 alone writes the log


# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning: loading pretrained encoders, layer decay, finetune.py end to end

import finetune  # noqa: E402


def test_window_resize_reproduces_the_official_tables():
    """Official load_pretrained resized the window-6 tables to window 7; our loader gives the same tables."""
    classifier = models.build_classifier('swin_base', num_classes=10, embed_dim=4, depths=(2, 2, 2, 2),
                                         num_heads=(1, 2, 4, 8))
    report = models.load_pretrained(classifier, timm_state(fixture('ms_simmim_swin.pth')))
    reference = fixture('ms_window_interp.pt')
    assert sorted(report['resized']) == sorted(reference) and report['missing'] == ['head.fc.weight', 'head.fc.bias']
    assert {'decoder.0.weight', 'mask_token'} <= set(report['dropped'])
    state = classifier.state_dict()
    for key, table in reference.items():
        torch.testing.assert_close(state[key], table, atol=1e-6, rtol=0)
    same = models.resize_rel_pos_table(reference[key], 169)
    assert torch.equal(same, reference[key])  # same size: unchanged


def test_vit_shared_table_goes_to_every_block_and_follows_the_grid():
    state = fixture('ms_simmim_vit.pth')['model']
    shared = state['encoder.rel_pos_bias.relative_position_bias_table']  # (27^2 + 3, 2)
    for size, rows in ((224, 732), (192, 532)):
        classifier = models.build_classifier('vit_base', img_size=size, num_classes=3, embed_dim=64, depths=2,
                                             num_heads=2)
        report = models.load_pretrained(classifier, timm_state(state))
        assert {'norm.weight', 'norm.bias', 'decoder.0.weight'} <= set(report['dropped'])  # fc_norm replaces norm
        assert set(report['missing']) == {'fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias'}
        for block in classifier.blocks:
            table = block.attn.relative_position_bias_table
            assert table.shape == (rows, 2)
            assert torch.equal(table[-3:], shared[-3:])  # cls rows kept
            assert torch.equal(table, shared) == (size == 224)


def test_a_checkpoint_of_another_architecture_is_refused():
    state = models.build_simmim('swin_tiny', img_size=64, **TINY_SWIN).state_dict()
    other = models.build_classifier('swin_tiny', img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
    with pytest.raises(ValueError, match=r'does not fit SwinTransformer \(\d+ problems; first: patch_embed.proj.weight '
                                         r'\(8, 3, 4, 4\) vs \(16, 3, 4, 4\)'):
        models.load_pretrained(other, timm_state(state))
    deeper = models.build_classifier('swin_tiny', img_size=64, embed_dim=8, depths=(2, 2, 4, 2), num_heads=(1, 2, 2, 4))
    with pytest.raises(ValueError, match='layers.2.blocks.2.* not in the checkpoint'):
        models.load_pretrained(deeper, timm_state(state))


@pytest.mark.parametrize('name', ['swin_tiny', 'vit_small'])
def test_layer_decay_follows_the_official_assignment(name):
    vit = name.startswith('vit')
    model = models.build_classifier(name, img_size=32 if vit else 64, num_classes=3,
                                    **(dict(embed_dim=12, depths=3, num_heads=2) if vit else TINY_SWIN))
    scale = lambda key: 0.5 ** (lambda i, n: n + 1 - i)(*models.layer_id(key, model))
    n = 3 if vit else 8
    expected = {'head.weight' if vit else 'head.fc.weight': 1.0, 'patch_embed.proj.weight': 0.5 ** (n + 1)}
    if vit:
        expected.update({'cls_token': 0.5 ** 4, 'blocks.0.attn.qkv.weight': 0.5 ** 3, 'blocks.2.mlp.fc1.bias': 0.5,
                         'fc_norm.weight': 1.0})
    else:  # depths 2,2,2,2: block b of stage s -> 2s + b + 1; merging after stage s (timm: layers.s+1) -> 2(s + 1)
        expected.update({'layers.0.blocks.0.attn.qkv.weight': 0.5 ** 8, 'layers.1.blocks.1.mlp.fc1.weight': 0.5 ** 5,
                         'layers.1.downsample.reduction.weight': 0.5 ** 7, 'layers.3.downsample.norm.weight': 0.5 ** 3,
                         'layers.3.blocks.1.norm1.weight': 0.5, 'norm.weight': 1.0})
    names = dict(model.named_parameters())
    for key, value in expected.items():
        assert key in names and scale(key) == pytest.approx(value), key
    optimizer = engine.build_optimizer(models.param_groups(model, 0.05, 0.5), 1.0)
    assert {g['lr_scale'] for g in optimizer.param_groups} == {0.5 ** k for k in range(n + 2)}


def test_extract_features_shapes():
    x = torch.randn(2, 3, 64, 64)
    encoder = tiny_simmim('swin_tiny')
    pooled, fmap = models.extract_features(encoder, x)
    assert pooled.shape == (2, 48) and fmap.shape == (2, 48, 2, 2)
    classifier = models.build_classifier('swin_tiny', img_size=64, num_classes=3, **TINY_SWIN)
    pooled, fmap = models.extract_features(classifier, x)
    assert pooled.shape == (2, 64) and fmap.shape == (2, 64, 2, 2)
    vit = models.build_classifier('vit_small', img_size=32, num_classes=3, embed_dim=12, depths=1, num_heads=2)
    pooled, fmap = models.extract_features(vit, torch.randn(2, 3, 32, 32))
    assert pooled.shape == (2, 12) and fmap.shape == (2, 12, 2, 2)


def write_classes(root, per_class, seed=0):
    """Two classes a small model can tell apart: reddish and bluish noise."""
    rng = np.random.default_rng(seed)
    for label, colour in (('blue', (40, 60, 200)), ('red', (200, 50, 40))):
        os.makedirs(root / label, exist_ok=True)
        for i in range(per_class):
            img = (np.array(colour) + rng.normal(0, 40, (40, 48, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / label / f'{i}.png')


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory):
    """Pretrain a tiny Swin at 192px (window 6), then fine-tune it at 224px (window 7) for a few epochs."""
    root = tmp_path_factory.mktemp('ft')
    write_classes(root / 'data' / 'train', 8)
    write_classes(root / 'data' / 'val', 3, seed=1)  # 6 validation images
    common = ['--model', 'swin_tiny', '--embed-dim', '8', '--depths', '1', '1', '1', '1', '--num-heads', '1', '2', '2',
              '4', '--num-workers', '0', '--amp', 'off', '--print-freq', '1']
    pretrain.main(pretrain.get_args_parser().parse_args(common + [
        '--data-path', str(root / 'data' / 'train'), '--batch-size', '4', '--epochs', '1', '--warmup-epochs', '0',
        '--output', str(root / 'pre')]))
    args = finetune.get_args_parser().parse_args(common[common.index('--num-workers'):] + [  # arch: the checkpoint's
        '--pretrained', str(root / 'pre' / 'checkpoint.pth'), '--data-path', str(root / 'data'), '--batch-size', '4',
        '--epochs', '4', '--warmup-epochs', '0', '--base-lr', '1', '--mixup', '0', '--cutmix', '0', '--aa', '',
        '--reprob', '0', '--output', str(root / 'ft'), '--save-freq', '2'])
    finetune.main(args)
    return root


def test_pretrain_then_finetune_across_a_window_change(finetuned, capsys):
    log = read_log(finetuned / 'ft')
    losses = [r['epoch_loss'] for r in log if 'epoch_loss' in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    ckpt = torch.load(finetuned / 'ft' / 'checkpoint.pth', weights_only=True)
    assert ckpt['config']['classes'] == ('blue', 'red') and ckpt['config']['num_classes'] == 2
    assert ckpt['config']['model'] == 'swin_tiny' and ckpt['config']['embed_dim'] == 8  # taken from the pretraining
    assert ckpt['model']['layers.0.blocks.0.attn.relative_position_bias_table'].shape == (169, 1)  # window 7
    assert {'best.pth', 'ckpt_epoch_1.pth', 'ckpt_epoch_3.pth'} <= set(os.listdir(finetuned / 'ft'))
    assert max(r['val_acc1'] for r in log if 'val_acc1' in r) == ckpt['max_accuracy']
    scalars, _ = read_tensorboard(finetuned / 'ft' / 'tensorboard')  # the validation's numbers too
    assert scalars == log_scalars(log, ckpt['steps_per_epoch']) and len(scalars['val_acc1']) == 4


def test_tensorboard_failures_are_one_line(tmp_path, monkeypatch):
    write_images(tmp_path / 'data', 4)
    os.makedirs(tmp_path / 'run')
    (tmp_path / 'run' / 'tensorboard').write_text('a file where its folder goes')
    with pytest.raises(SystemExit, match=r"cannot write .*run/tensorboard \(File exists\): fix it, or pass "
                                         r"--tensorboard off"):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run'))
    monkeypatch.setitem(sys.modules, 'tensorboard', None)  # as if not installed
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    assert engine.summary_writer('auto') is None  # auto: without it
    with pytest.raises(SystemExit, match='--tensorboard on needs the tensorboard package: pip install tensorboard'):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', '--tensorboard', 'on'))


def test_eval_reproduces_the_recorded_accuracy(finetuned, capsys):
    best = torch.load(finetuned / 'ft' / 'best.pth', weights_only=True)
    finetune.main(finetune.get_args_parser().parse_args([
        '--eval', '--resume', str(finetuned / 'ft' / 'best.pth'), '--data-path', str(finetuned / 'data'),
        '--num-workers', '0', '--amp', 'off', '--batch-size', '4']))
    out = capsys.readouterr().out
    assert f"top-1 {best['acc1']:.2f}%" in out and 'on 6 images' in out


def test_predict_prints_class_names(finetuned, capsys):
    finetune.main(finetune.get_args_parser().parse_args([
        '--predict', str(finetuned / 'data' / 'val' / 'red'), str(finetuned / 'data' / 'val' / 'blue' / '0.png'),
        '--resume', str(finetuned / 'ft' / 'best.pth'), '--amp', 'off']))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if '.png: ' in ln]
    assert len(lines) == 4
    for line in lines:
        assert re.fullmatch(r'.*\.png: (red|blue) \d+\.\d%, (red|blue) \d+\.\d%', line), line


def test_two_process_evaluation_counts_every_image_once(finetuned):
    # 6 images + 1 more = 7: an odd count that a padding sampler would round up to 8
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(finetuned / 'data' / 'val' / 'red' / 'extra.png')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             os.path.join(HERE, 'finetune.py'), '--eval', '--resume',
                             str(finetuned / 'ft' / 'best.pth'), '--data-path', str(finetuned / 'data'),
                             '--num-workers', '0', '--amp', 'off', '--batch-size', '2'],
                            capture_output=True, text=True, timeout=240)
    os.remove(finetuned / 'data' / 'val' / 'red' / 'extra.png')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'on 7 images' in result.stdout


def test_linear_probe_trains_only_the_head(finetuned, tmp_path, capsys):
    for output in ('lp', 'again'):  # the same run twice: the same head (--seed)
        finetune.main(finetune.get_args_parser().parse_args([
            '--pretrained', str(finetuned / 'pre' / 'checkpoint.pth'), '--data-path', str(finetuned / 'data'),
            '--linear-probe', '--batch-size', '4', '--epochs', '1', '--warmup-epochs', '0', '--num-workers', '0',
            '--amp', 'off', '--output', str(tmp_path / output), '--reprob', '0.25']))
    pre = torch.load(finetuned / 'pre' / 'checkpoint.pth', weights_only=True)['model']
    probe = torch.load(tmp_path / 'lp' / 'checkpoint.pth', weights_only=True)
    again = torch.load(tmp_path / 'again' / 'checkpoint.pth', weights_only=True)
    assert all(torch.equal(v, again['model'][k]) for k, v in probe['model'].items())
    assert probe['recipe']['linear_probe'] and probe['recipe']['mixup'] == 0 and probe['recipe']['weight_decay'] == 0
    assert probe['recipe']['epochs'] == 1 and probe['recipe']['base_lr'] == 1.0  # flags given win, the rest the recipe's
    assert probe['recipe']['reprob'] == 0.25  # given, though it is the fine-tuning default
    assert probe['optimizer']['param_groups'][0]['momentum'] == 0.9  # SGD
    key = 'layers.2.blocks.0.mlp.fc1.weight'
    assert torch.equal(probe['model'][key], pre['encoder.' + key])
    assert 'head.fc.0.running_mean' in probe['model']  # the BatchNorm
    out = capsys.readouterr().out
    assert 'swin_tiny: 130 trainable parameters' in out  # Linear(64, 2)
    assert 'linear probe: SGD (momentum 0.9), --base-lr 1.0, --warmup-lr 0.0' in out
    finetune.main(finetune.get_args_parser().parse_args([  # in timm: the BatchNorm folded into a plain linear head
        '--resume', str(tmp_path / 'lp' / 'checkpoint.pth'), '--export', str(tmp_path / 'lp_export')]))
    import timm  # noqa: F401 (the printed command uses it)
    exported = eval(capsys.readouterr().out.split('in timm: ')[1].strip()).eval()
    ours = models.linear_probe(models.build_classifier(models.model_config(pretrain=False, **probe['config'])))
    ours.eval().load_state_dict(probe['model'])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), ours(x), atol=1e-5, rtol=1e-5)


def test_a_vit_probe_reads_an_intermediate_block(finetuned, tmp_path, capsys):
    common = ['--data-path', str(finetuned / 'data'), '--num-workers', '0', '--amp', 'off', '--batch-size', '4']
    finetune.main(finetune.get_args_parser().parse_args(common + [
        '--pretrained', os.path.join(FIXTURES, 'ms_simmim_vit.pth'), '--linear-probe', '--probe-block', '1',
        '--epochs', '1', '--warmup-epochs', '0', '--output', str(tmp_path / 'lp')]))
    probe = torch.load(tmp_path / 'lp' / 'checkpoint.pth', weights_only=True)
    assert probe['config']['depths'] == (1,) and not any(k.startswith('blocks.1.') for k in probe['model'])
    model = checkpoints.load_model(str(tmp_path / 'lp' / 'checkpoint.pth'))  # the BatchNorm folded into the head
    pre = checkpoints.read(os.path.join(FIXTURES, 'ms_simmim_vit.pth')).state
    assert len(model.blocks) == 1 and torch.equal(model.blocks[0].mlp.fc1.weight, pre['blocks.0.mlp.fc1.weight'])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = model.blocks[0](torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], 1))
        expected = model.head(model.fc_norm(tokens[:, 1:].mean(1)))  # block 1's patch tokens, mean-pooled
        torch.testing.assert_close(model(x), expected)
    finetune.main(finetune.get_args_parser().parse_args(common + ['--eval', '--resume',
                                                                  str(tmp_path / 'lp' / 'checkpoint.pth')]))
    assert 'on 6 images' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='--probe-block is for --linear-probe of ViT models'):
        finetune.main(finetune.get_args_parser().parse_args(common + [
            '--pretrained', str(finetuned / 'pre' / 'checkpoint.pth'), '--linear-probe', '--probe-block', '1']))


def test_finetune_bad_input_is_one_line(finetuned, tmp_path):
    cases = [
        (['--data-path', str(finetuned / 'data' / 'train')], 'has no train/ folder'),
        (['--data-path', str(finetuned / 'data'), '--batch-size', '3'], 'mixup/cutmix need an even --batch-size'),
        (['--eval', '--data-path', str(finetuned / 'data')], '--eval and --predict need a fine-tuned checkpoint'),
        (['--predict', str(finetuned / 'data' / 'val'), '--resume', str(finetuned / 'pre' / 'checkpoint.pth')],
         'holds no classifier (a pretraining checkpoint?)'),
        (['--export', str(tmp_path / 'x'), '--linear-probe', '--pretrained',
          str(finetuned / 'pre' / 'checkpoint.pth')], "--export writes a trained model: export the probe's checkpoint"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match='^error: .*' + re.escape(message)):
            finetune.main(finetune.get_args_parser().parse_args(
                extra + ['--num-workers', '0', '--output', str(tmp_path / 'x')]))


def test_finetune_auto_resumes(finetuned, tmp_path, capsys):
    import shutil
    shutil.copytree(finetuned / 'ft', tmp_path / 'ft')
    before = torch.load(tmp_path / 'ft' / 'checkpoint.pth', weights_only=True)
    with pytest.raises(SystemExit, match=r"with other settings than it was trained with: --crop-pct 0.875 -> 1.0;"):
        finetune.main(finetune.get_args_parser().parse_args([  # another evaluation: another best.pth
            '--data-path', str(finetuned / 'data'), '--output', str(tmp_path / 'ft'), '--crop-pct', '1']))
    finetune.main(finetune.get_args_parser().parse_args([
        '--data-path', str(finetuned / 'data'), '--batch-size', '4', '--epochs', '5', '--warmup-epochs', '0',
        '--num-workers', '0', '--amp', 'off', '--mixup', '0', '--cutmix', '0', '--output', str(tmp_path / 'ft'),
        '--accept-changes']))  # one more epoch (and the default lr and augmentation), on purpose
    out = capsys.readouterr().out
    assert 'resuming with changed settings (--accept-changes): --epochs 4 -> 5' in out
    assert 'ft/checkpoint.pth at epoch 4' in out and 'epoch 4 validation' in out and 'epoch 3 validation' not in out
    after = torch.load(tmp_path / 'ft' / 'checkpoint.pth', weights_only=True)
    assert after['epoch'] == 4 and after['max_accuracy'] >= before['max_accuracy']


def test_swinv2_fine_tuning_scales_its_position_bias_to_the_pretraining_windows(tmp_path):
    write_classes(tmp_path / 'data' / 'train', 2)
    write_classes(tmp_path / 'data' / 'val', 1)
    pretrain.main(pretrain.get_args_parser().parse_args([
        '--model', 'swinv2_tiny', '--img-size', '64', '--mask-patch-size', '16', '--embed-dim', '6', '--depths', '1',
        '1', '1', '1', '--data-path', str(tmp_path / 'data' / 'train'), '--batch-size', '4', '--epochs', '1',
        '--num-workers', '0', '--amp', 'off', '--output', str(tmp_path / 'pre')]))
    args = finetune.get_args_parser().parse_args([
        '--pretrained', str(tmp_path / 'pre' / 'checkpoint.pth'), '--img-size', '96', '--data-path',
        str(tmp_path / 'data'), '--batch-size', '4', '--epochs', '1', '--num-workers', '0', '--amp', 'off',
        '--output', str(tmp_path / 'ft')])
    finetune.main(args)
    config = torch.load(tmp_path / 'ft' / 'checkpoint.pth', weights_only=True)['config']
    assert config['pretrained_window_sizes'] == (4, 4, 4, 2)  # 64px / 16, the last stage is 2x2
    model = models.build_classifier(models.model_config(pretrain=False, **config))
    assert model.layers[0].blocks[0].attn.pretrained_window_size == (4, 4)
    assert model.layers[0].blocks[0].attn.window_size == (6, 6)  # 96px / 16


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints of other code: microsoft/SimMIM, mmpretrain, Hugging Face, timm

TINY_FIXTURE_SWIN = dict(embed_dim=4, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def hf_safetensors(tmp_path):
    """The Hugging Face fixture as model.safetensors + config.json, as newer hub repositories hold it."""
    from safetensors.torch import save_file
    folder = tmp_path / 'hf_safetensors'
    os.makedirs(folder)
    state = torch.load(os.path.join(FIXTURES, 'hf_simmim_swin', 'pytorch_model.bin'), weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / 'model.safetensors')
    os.link(os.path.join(FIXTURES, 'hf_simmim_swin', 'config.json'), folder / 'config.json')
    return str(folder)


@pytest.mark.parametrize('source, layout', [('ms_simmim_swin.pth', 'microsoft'), ('mm_simmim_swin.pth', 'mmpretrain'),
                                            ('hf_simmim_swin', 'huggingface'), ('safetensors', 'huggingface')])
def test_every_pretraining_layout_reproduces_the_official_outputs(source, layout, tmp_path):
    path = hf_safetensors(tmp_path) if source == 'safetensors' else os.path.join(FIXTURES, source)
    checkpoint = checkpoints.read(path)
    state, found = checkpoint.state, checkpoint.layout
    assert found == layout
    assert models.infer_arch(state) == dict(model='swin_tiny', window_size=6, img_size=192, patch_size=4, in_chans=3,
                                            **TINY_FIXTURE_SWIN)
    model = models.build_simmim('swin_tiny', **TINY_FIXTURE_SWIN).eval()
    report = models.load_pretrained(model, state)
    assert report['missing'] == [] and report['dropped'] == [] and report['resized'] == []  # decoder kept too
    assert_reproduces(model, fixture('ms_simmim_swin_io.pt'))


@pytest.mark.parametrize('source', ['ms_finetune_swin_w7_224.pth', 'mm_finetune_swin_w7_224.pth'])
def test_every_classifier_layout_reproduces_the_official_logits(source):
    checkpoint = checkpoints.read(os.path.join(FIXTURES, source))
    arch = models.infer_arch(checkpoint.state)
    assert arch['num_classes'] == 10 and arch['window_size'] == 7 and arch['img_size'] == 224
    model = models.build_classifier('swin_tiny', num_classes=10, **TINY_FIXTURE_SWIN).eval()
    report = models.load_pretrained(model, checkpoint.state)
    assert report['missing'] == [] and report['dropped'] == []
    io = fixture('ms_finetune_swin_w7_224_io.pt')
    with torch.no_grad():
        torch.testing.assert_close(model(io['x']), io['logits'], atol=1e-5, rtol=1e-5)


def test_a_missed_conversion_step_is_caught_by_the_values():
    """What the tests above guard against: without mmpretrain's PatchMerging permutation, or with q and k swapped
    in the Hugging Face split, every key still loads but the features are far off."""
    io = fixture('ms_simmim_swin_io.pt')
    mm = checkpoints.read(os.path.join(FIXTURES, 'mm_simmim_swin.pth')).saved
    hf = checkpoints.read(os.path.join(FIXTURES, 'hf_simmim_swin')).saved
    unpermuted = {k.replace('downsample', 'DS'): v for k, v in mm['state_dict'].items()}  # skips the permutation
    converted, _ = models.to_timm_layout(unpermuted)
    converted = {re.sub(r'layers\.(\d+)\.DS', lambda m: f'layers.{int(m[1]) + 1}.downsample', k): v
                 for k, v in converted.items()}
    swapped = dict(hf['model'])
    for k in [k for k in swapped if '.query.' in k]:
        swapped[k], swapped[k.replace('.query.', '.key.')] = swapped[k.replace('.query.', '.key.')], swapped[k]
    for wrong in (converted, timm_state(swapped)):
        model = models.build_simmim('swin_tiny', **TINY_FIXTURE_SWIN).eval()
        models.load_pretrained(model, wrong)
        with torch.no_grad():
            assert (model.encoder(io['x'], io['mask']) - io['features']).abs().max() > 0.5


def test_pickled_checkpoints_need_the_explicit_opt_in(tmp_path):
    state = fixture('ms_simmim_swin.pth')
    state['config'] = argparse_namespace = __import__('argparse').Namespace(model='swin')  # stands for the yacs node
    torch.save(state, tmp_path / 'official.pth')
    with pytest.raises(checkpoints.PickledCheckpoint, match='holds pickled Python objects.*allow_pickle=True'):
        checkpoints.read(str(tmp_path / 'official.pth'))
    assert checkpoints.read(str(tmp_path / 'official.pth'), allow_pickle=True).saved['config'] == argparse_namespace
    with pytest.raises(SystemExit, match='--allow-pickle'):
        finetune.main(finetune.get_args_parser().parse_args(['--pretrained', str(tmp_path / 'official.pth'),
                                                             '--export', str(tmp_path / 'x')]))


def test_export_from_any_layout_loads_in_timm(tmp_path, capsys):
    """finetune.py --export with nothing but a Hugging Face folder: the architecture is read off the weights, the
    tables are resized to window 7, and timm loads the folder it writes by name alone."""
    import timm  # noqa: F401 (the printed command uses it)
    folder = str(tmp_path / 'encoder')
    finetune.main(finetune.get_args_parser().parse_args([
        '--pretrained', os.path.join(FIXTURES, 'hf_simmim_swin'), '--export', folder]))
    command = capsys.readouterr().out.split('in timm: ')[1].strip()
    assert command == f"timm.create_model('local-dir:{folder}', pretrained=True)"
    assert sorted(os.listdir(folder)) == ['config.json', 'model.safetensors']
    config = json.load(open(os.path.join(folder, 'config.json')))
    assert config['architecture'] == 'swin_tiny_patch4_window7_224' and config['model_args']['embed_dim'] == 4
    model = eval(command)  # timm's own loader: strict, no missing or unexpected keys
    reference = fixture('ms_window_interp.pt')
    for key, table in reference.items():
        torch.testing.assert_close(model.state_dict()[key], table, atol=1e-6, rtol=0)
    (tmp_path / 'notes.txt').write_text('mine')
    for wrong in ('encoder.pth', os.path.join(FIXTURES), str(tmp_path / 'notes.txt')):  # a file name; a folder with
        # other files; a file
        with pytest.raises(SystemExit, match="writes a folder|holds other files than an export|notes.txt' is a file"):
            finetune.main(finetune.get_args_parser().parse_args([
                '--pretrained', os.path.join(FIXTURES, 'hf_simmim_swin'), '--export', wrong]))
    assert (tmp_path / 'notes.txt').read_text() == 'mine'
    os.remove(tmp_path / 'notes.txt')
    for mine in ('encoder.tmp', 'encoder.old'):  # the user's: left alone
        os.makedirs(tmp_path / mine)
        (tmp_path / mine / 'notes.txt').write_text('mine')
    (tmp_path / 'encoder' / 'README.md').write_text('# model card')
    finetune.main(finetune.get_args_parser().parse_args([  # an export's folder: replaced, its model card kept
        '--pretrained', os.path.join(FIXTURES, 'hf_simmim_swin'), '--export', folder, '--img-size', '192']))
    assert json.load(open(os.path.join(folder, 'config.json')))['pretrained_cfg']['input_size'] == [3, 192, 192]
    assert sorted(os.listdir(tmp_path)) == ['encoder', 'encoder.old', 'encoder.tmp']  # nothing of ours left
    assert sorted(os.listdir(folder)) == ['README.md', 'config.json', 'model.safetensors']
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(os.path.join(folder, 'model.safetensors')).st_mode & 0o777 == 0o666 & ~mask  # others may read
    with pytest.raises(SystemExit, match='--export needs a folder name'):
        finetune.main(finetune.get_args_parser().parse_args(['--pretrained', folder, '--export', '']))
    os.symlink(folder, tmp_path / 'link')  # a link to an export: its target replaced, the link kept
    finetune.main(finetune.get_args_parser().parse_args([
        '--pretrained', os.path.join(FIXTURES, 'hf_simmim_swin'), '--export', str(tmp_path / 'link')]))
    assert os.path.islink(tmp_path / 'link') and sorted(os.listdir(folder))[1:] == ['config.json', 'model.safetensors']


def test_continued_pretraining_from_the_official_checkpoint_keeps_the_decoder(tmp_path, capsys):
    write_images(tmp_path / 'data', 4, size=200)
    pretrain.main(pretrain.get_args_parser().parse_args([
        '--pretrained', os.path.join(FIXTURES, 'ms_simmim_swin.pth'), '--data-path', str(tmp_path / 'data'),
        '--batch-size', '2', '--epochs', '1', '--warmup-epochs', '0', '--num-workers', '0', '--amp', 'off',
        '--output', str(tmp_path / 'run')]))
    out = capsys.readouterr().out
    assert 'swin_tiny: 142,390 parameters' in out  # the fixture's architecture, read off its weights
    assert 'ms_simmim_swin.pth: 122 tensors loaded, 0 position tables resized, new: -, dropped: 0' in out


def test_eval_and_predict_with_a_classifier_of_other_code(tmp_path, capsys):
    write_classes(tmp_path / 'data' / 'val', 2)
    for extra in (['--eval', '--data-path', str(tmp_path / 'data')], ['--predict', str(tmp_path / 'data' / 'val')]):
        finetune.main(finetune.get_args_parser().parse_args(
            ['--resume', os.path.join(FIXTURES, 'mm_finetune_swin_w7_224.pth'), '--num-workers', '0', '--amp', 'off',
             '--output', str(tmp_path / 'none')] + extra))
    out = capsys.readouterr().out
    assert 'mm_finetune_swin_w7_224.pth: 121 tensors loaded, 0 position tables resized, new: -, dropped: 0' in out
    assert 'on 4 images of' in out and len(re.findall(r'\.png: class \d+ \d+\.\d%', out)) == 4
    with pytest.raises(SystemExit, match='no finetune.py checkpoint, so training cannot resume from it'):
        finetune.main(finetune.get_args_parser().parse_args(
            ['--resume', os.path.join(FIXTURES, 'mm_finetune_swin_w7_224.pth'), '--data-path', str(tmp_path / 'data')]))


# ---------------------------------------------------------------------------------------------------------------------
# Faults: preemption, full disks, lost ranks, bad files

def preempt_at_step(monkeypatch, n):
    """SimMIM's forward sends this process SIGTERM (a scheduler's preemption) during its nth call."""
    original, calls = models.SimMIM.forward, []

    def preempted(self, x, mask):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, x, mask)

    monkeypatch.setattr(models.SimMIM, 'forward', preempted)


def test_sigterm_saves_mid_epoch_and_the_resumed_run_matches(tmp_path, monkeypatch, capsys):
    write_images(tmp_path / 'data', 8)
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'straight'))  # 2 epochs x 2 steps
    preempt_at_step(monkeypatch, 3)  # epoch 1, step 0
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run'))
    monkeypatch.undo()
    assert 'SIGTERM: stopped after step 1 of epoch 1' in capsys.readouterr().out
    stopped = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    assert (stopped['epoch'], stopped['step']) == (1, 1)
    with pytest.raises(SystemExit, match=r"stopped inside epoch 1 with another batch \(per process and step: 4 x 1, "
                                         r"in all 4\); resume it with the same one"):  # its step counts 4 images
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', '--batch-size', '2', '--accept-changes'))
    write_images(tmp_path / 'data' / 'more', 4, seed=1)  # the epoch's images counted in another order
    with pytest.raises(SystemExit, match=r"stopped inside an epoch of 2 steps; the data now make 3: resume"):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run'))
    shutil.rmtree(tmp_path / 'data' / 'more')
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run'))
    assert 'resumed from' in capsys.readouterr().out
    a = torch.load(tmp_path / 'straight' / 'checkpoint.pth', weights_only=True)['model']
    b = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_sigterm_in_the_last_step_ends_the_run_done(tmp_path, monkeypatch, capsys):
    write_images(tmp_path / 'data', 8)
    preempt_at_step(monkeypatch, 4)  # the last step
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run'))
    out = capsys.readouterr().out
    assert 'done: checkpoints' in out and 'SIGTERM' not in out  # it said "stopped after epoch 1; rerun to resume"
    assert torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)['epoch'] == 1


def test_auto_resume_keeps_to_the_runs_last_started_in_the_output(tmp_path, monkeypatch, capsys):
    write_images(tmp_path / 'data', 8)
    run, original = tmp_path / 'run', models.SimMIM.forward
    pretrain.main(pretrain_args(tmp_path / 'data', run))  # epochs 0 and 1: ckpt_epoch_0/1.pth, checkpoint.pth

    def interrupted(*_):
        raise KeyboardInterrupt

    # started again from its epoch-0 checkpoint, Ctrl-C before its first save; rerun: from that file again (it took
    # the earlier run's checkpoint.pth, at the end of epoch 1)
    back = pretrain_args(tmp_path / 'data', run, '--resume', str(run / 'ckpt_epoch_0.pth'), '--epochs', '3',
                         '--accept-changes')
    monkeypatch.setattr(models.SimMIM, 'forward', interrupted)
    with pytest.raises(SystemExit, match='interrupted'):
        pretrain.main(back)
    monkeypatch.setattr(models.SimMIM, 'forward', original)
    flip_bytes_in_the_largest_tensor(run / 'checkpoint.pth')  # and the earlier run's checkpoint.pth damaged
    capsys.readouterr()
    pretrain.main(back)
    out = capsys.readouterr().out
    assert 'is of a run before the one last started' in out and "checkpoint.pth' is corrupted" in out
    assert re.search(r"resumed from .*ckpt_epoch_0.pth at epoch 1\b", out)
    # started afresh (--no-auto-resume) and stopped after its epoch 0; its checkpoint.pth lost: auto-resume takes its
    # own ckpt_epoch_0.pth, not the earlier runs' ckpt_epoch_2.pth
    pretrain.main(pretrain_args(tmp_path / 'data', run, '--epochs', '1', '--no-auto-resume'))
    os.remove(run / 'checkpoint.pth')
    capsys.readouterr()
    pretrain.main(pretrain_args(tmp_path / 'data', run, '--epochs', '3', '--accept-changes'))
    out = capsys.readouterr().out
    assert re.search(r"resumed from .*ckpt_epoch_0.pth at epoch 1\b", out) and 'ckpt_epoch_2.pth is of a run' in out
    # started from OUTPUT's own checkpoint.pth by name: a rerun continues it (the same series), not a new one
    pretrain.main(pretrain_args(tmp_path / 'data', run, '--resume', str(run / 'checkpoint.pth'), '--epochs', '4',
                                '--accept-changes'))
    found = checkpoints.find_resume(str(run), str(run / 'checkpoint.pth'), say=print)
    assert found.continues and found.saved['series'] == json.load(open(run / 'args.json'))['series']
    older = {k: v for k, v in found.saved.items() if k != 'series'}  # saved before runs named their series
    os.makedirs(tmp_path / 'older')
    checkpoints.save(str(tmp_path / 'older'), older)
    (tmp_path / 'older' / 'args.json').write_text(json.dumps({'series': 'a run started later'}))
    assert checkpoints.find_resume(str(tmp_path / 'older'), None, say=print) is None
    json.dump({}, open(tmp_path / 'older' / 'args.json', 'w'))  # the run that wrote it, older too: its own
    assert checkpoints.find_resume(str(tmp_path / 'older'), None, say=print).saved['epoch'] == 3
    for name in os.listdir(run):
        if name.endswith('.pth'):
            flip_bytes_in_the_largest_tensor(run / name)
    with pytest.raises(SystemExit, match=r"no intact checkpoint in .*run; start afresh with --no-auto-resume"):
        pretrain.main(pretrain_args(tmp_path / 'data', run, '--epochs', '4', '--accept-changes'))


def test_a_run_started_from_resume_elsewhere_continues_its_own_progress_and_epoch_mean(tmp_path, monkeypatch,
                                                                                        capsys):
    write_images(tmp_path / 'data', 8)
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'old', '--epochs', '1'))
    more = ['--resume', str(tmp_path / 'old' / 'checkpoint.pth'), '--epochs', '3', '--accept-changes']
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'straight', *more))  # epochs 1 and 2 of 2 steps
    preempt_at_step(monkeypatch, 1)  # the run's first step (epoch 1, step 0)
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', *more))
    monkeypatch.undo()
    assert 'SIGTERM: stopped after step 1 of epoch 1' in capsys.readouterr().out
    shutil.copytree(tmp_path / 'run', tmp_path / 'older')  # as older code saved it: no sum of the epoch's losses
    older = torch.load(tmp_path / 'older' / 'checkpoint.pth', weights_only=True)
    del older['checksum'], older['trainer']['epoch_loss'], older['trainer']['epoch_steps']
    torch.save(dict(older, checksum=checkpoints.checksum(older)), tmp_path / 'older' / 'checkpoint.pth')
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'older', '--epochs', '2', '--accept-changes'))
    steps = [r for r in read_log(tmp_path / 'older') if r.get('step') == 4]  # the one step run after it
    assert [r['epoch_loss'] for r in read_log(tmp_path / 'older') if r.get('epoch') == 1 and 'epoch_loss' in r] == \
        pytest.approx([steps[0]['loss']])  # the mean of the steps it counted, not their sum over the whole epoch
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', *more))  # the same command again
    out = capsys.readouterr().out
    assert re.search(r"resumed from .*/run/checkpoint.pth at epoch 1 step 1", out)  # not from old/ at epoch 1 step 0
    epoch_mean = lambda output: {r['epoch']: r['epoch_loss'] for r in read_log(output) if 'epoch_loss' in r}
    assert epoch_mean(tmp_path / 'run') == pytest.approx(epoch_mean(tmp_path / 'straight'), rel=1e-6)  # both steps
    a = torch.load(tmp_path / 'straight' / 'checkpoint.pth', weights_only=True)['model']
    b = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_of_the_earlier_format_load_and_resume(tmp_path, monkeypatch, capsys):
    """fixtures/v1_*: written by the code of f037844 (the flags, vars(args), as the checkpoint's format; README there).
    The mid-epoch pretraining checkpoint resumes to the uninterrupted run's weights; the fine-tuned one evaluates and
    resumes to the weights of a run from its start; a changed flag is still refused."""
    monkeypatch.chdir(tmp_path)  # the fixtures name their data and checkpoints by relative paths
    write_images(tmp_path / 'data', 8)
    write_classes(tmp_path / 'classes' / 'train', 4)
    write_classes(tmp_path / 'classes' / 'val', 2, seed=1)
    for folder, name in (('pre', 'v1_pretrain_mid_epoch.pth'), ('resumed', 'v1_pretrain_mid_epoch.pth'),
                         ('ft', 'v1_finetune_epoch_0.pth')):
        os.makedirs(tmp_path / folder)
        shutil.copy(os.path.join(FIXTURES, name), tmp_path / folder / 'checkpoint.pth')
    pretrain.main(pretrain_args('data', 'straight'))
    with pytest.raises(SystemExit, match=r"--base-lr 0.5 -> 0.4; rerun with the same flags"):
        pretrain.main(pretrain_args('data', 'resumed', '--base-lr', '0.4'))
    pretrain.main(pretrain_args('data', 'resumed'))
    assert 'resumed from resumed/checkpoint.pth at epoch 1 step 1' in capsys.readouterr().out
    weights = lambda folder: torch.load(tmp_path / folder / 'checkpoint.pth', weights_only=True)['model']
    assert all(torch.equal(v, weights('resumed')[k]) for k, v in weights('straight').items())
    ft = ['--data-path', 'classes', '--batch-size', '4', '--epochs', '2', '--warmup-epochs', '0', '--base-lr', '1',
          '--mixup', '0', '--cutmix', '0', '--aa', '', '--reprob', '0', '--num-workers', '0', '--amp', 'off',
          '--pretrained', 'pre/checkpoint.pth']
    finetune.main(finetune.get_args_parser().parse_args(['--eval', '--resume', 'ft/checkpoint.pth', *ft[:2],
                                                         '--num-workers', '0', '--amp', 'off']))
    assert 'top-1 100.00% loss 0.1156 on 4 images' in capsys.readouterr().out  # as the old code's log says
    finetune.main(finetune.get_args_parser().parse_args(ft + ['--output', 'ft']))
    assert 'resumed from ft/checkpoint.pth at epoch 1' in capsys.readouterr().out
    finetune.main(finetune.get_args_parser().parse_args(ft + ['--output', 'ft_straight']))
    assert all(torch.equal(v, weights('ft')[k]) for k, v in weights('ft_straight').items())


def test_the_first_resume_command_after_plain_reruns_still_continues_the_folder(tmp_path, capsys):
    write_images(tmp_path / 'data', 8)
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'old', '--epochs', '1'))
    first = ['--resume', str(tmp_path / 'old' / 'checkpoint.pth'), '--accept-changes']
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', *first, '--epochs', '2'))
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', '--epochs', '3', '--accept-changes'))
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', *first, '--epochs', '4'))
    out = capsys.readouterr().out
    assert re.search(r"resumed from .*/run/checkpoint.pth at epoch 3\n", out)  # not old/'s epoch 1 again
    pretrain.main(pretrain.get_args_parser().parse_args([  # the rest, batch size too: the checkpoint's
        '--output', str(tmp_path / 'run'), '--epochs', '5', '--accept-changes', '--num-workers', '0']))
    out = capsys.readouterr().out
    assert 'changed settings (--accept-changes): --epochs 4 -> 5\n' in out and '; amp off; device cpu' in out
    assert [r['epoch'] for r in read_log(tmp_path / 'run') if 'epoch_loss' in r] == [1, 2, 3, 4]


def test_continued_pretraining_takes_the_checkpoints_size_and_mask_squares(tmp_path):
    write_images(tmp_path / 'data', 4)
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'pre', '--epochs', '1'))  # 64px, 16px squares
    pretrain.main(pretrain.get_args_parser().parse_args([
        '--pretrained', str(tmp_path / 'pre' / 'checkpoint.pth'), '--data-path', str(tmp_path / 'data'),
        '--batch-size', '4', '--num-workers', '0', '--epochs', '1', '--amp', 'off',
        '--output', str(tmp_path / 'more')]))
    saved = torch.load(tmp_path / 'more' / 'checkpoint.pth', weights_only=True)
    assert (saved['config']['img_size'], saved['recipe']['mask_patch_size'], saved['config']['embed_dim']) == (64, 16, 8)


def pretrain_command(tmp_path, epochs):
    """A tiny pretraining in a process of its own, with 2 loader workers, on tmp_path/data."""
    return [sys.executable, os.path.join(HERE, 'pretrain.py'), '--model', 'swin_tiny', '--img-size', '64',
            '--mask-patch-size', '16', '--embed-dim', '8', '--depths', '1', '1', '1', '1', '--num-heads', '1', '2', '2',
            '4', '--data-path', str(tmp_path / 'data'), '--batch-size', '2', '--num-workers', '2', '--epochs', epochs,
            '--print-freq', '1', '--amp', 'off', '--output', str(tmp_path / 'run')]


def test_sigterm_to_the_whole_process_group_still_saves(tmp_path):
    # Schedulers signal every process of a job: the loader workers get SIGTERM too. Before they ignored it, their death
    # ended the run with "DataLoader worker ... is killed by signal: Terminated" and no checkpoint of the epoch.
    import signal
    write_images(tmp_path / 'data', 40)
    proc = subprocess.Popen(pretrain_command(tmp_path, '30'), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if 'epoch 1/30 step 3/20' in line:
            os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, ''.join(output)[-2000:]
    assert re.search(r'SIGTERM: stopped after step \d+ of epoch 1', ''.join(output))
    assert torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)['epoch'] == 1


def test_a_crash_with_live_loader_workers_still_exits(tmp_path):
    # The workers ignore SIGTERM, which Python's exit sends its daemonic children before waiting for them: a crash
    # past a live loader (here the reader of the log goes away) waited forever before data.end_loader_workers.
    write_images(tmp_path / 'data', 16)
    proc = subprocess.Popen(pretrain_command(tmp_path, '50'), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    for _ in range(4):
        proc.stdout.readline()
    proc.stdout.close()  # the next log line fails with BrokenPipeError
    try:
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


def test_a_second_run_into_the_same_output_stops_the_first(tmp_path, monkeypatch, capsys):
    write_images(tmp_path / 'data', 8)
    original, calls = models.SimMIM.forward, []

    def second_run_starts(self, x, mask):  # during the 2nd step another run claims the folder, as its start does
        calls.append(1)
        if len(calls) == 2:
            info = json.load(open(tmp_path / 'run' / 'args.json'))
            json.dump(dict(info, run='otherhost pid 1'), open(tmp_path / 'run' / 'args.json', 'w'))
        return original(self, x, mask)

    monkeypatch.setattr(models.SimMIM, 'forward', second_run_starts)
    with pytest.raises(SystemExit, match=r"another run \(otherhost pid 1\) has started in .*run: this one .* stopped "
                                         r"without saving over it; give each run its own --output"):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run'))
    assert not os.path.exists(tmp_path / 'run' / 'checkpoint.pth') and len(read_log(tmp_path / 'run')) == 1


@pytest.mark.parametrize('as_torch_reports_it', [False, True])
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, as_torch_reports_it):
    write_images(tmp_path / 'data', 8)
    real_save, saves = torch.save, []

    def disk_fills(obj, f, *a, **k):
        saves.append(1)
        if len(saves) == 2:
            f.write(b'partial')
            full = OSError(28, 'No space left on device')
            if as_torch_reports_it:  # torch's zip writer wraps it
                raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 9586368') from full
            raise full
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, 'save', disk_fills)
    with pytest.raises(SystemExit, match='could not write .*checkpoint.pth .No space left on device.; the previous '
                                         'file is intact'):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run'))
    assert torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)['epoch'] == 0
    assert not os.path.exists(tmp_path / 'run' / 'checkpoint.pth.tmp')
    (tmp_path / 'file').write_text('x')
    with pytest.raises(SystemExit, match="--output '.*file/out' is not a folder that can be written"):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'file' / 'out'))


def test_bad_files_are_skipped_and_all_bad_is_one_line(tmp_path, monkeypatch):
    write_images(tmp_path / 'data', 4)
    (tmp_path / 'data' / 'empty.jpg').write_bytes(b'')
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / 'data' / 'tiny.png')  # smaller than the crop
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert('P')
    palette.info['transparency'] = 0
    palette.save(tmp_path / 'data' / 'palette.png', transparency=0)
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(tmp_path / 'data' / 'bomb.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 40_000)  # 300 x 300 > 2 x 40,000: a decompression bomb
    ds = data.ImageDataset(str(tmp_path / 'data'), data.PretrainTransform(64, data.MaskGenerator(64, 16, 4, 0.5),
                                                                          imagenet()))
    with pytest.warns(UserWarning) as warned:
        items = [ds[(i, i)] for i in range(len(ds))]
    assert {os.path.basename(str(w.message).split(': ')[0].split()[-1]) for w in warned} == {'empty.jpg', 'bomb.png'}
    assert all(img.shape == (3, 64, 64) for (img, _), _, _ in items)
    assert [s for _, _, s in items][:2] == [2, 1]  # sorted: bomb.png falls through empty.jpg to img0.png
    bad = tmp_path / 'bad'
    os.makedirs(bad)
    for i in range(3):
        (bad / f'{i}.jpg').write_text('not an image')
    with pytest.warns(UserWarning), pytest.raises(SystemExit, match="^error: none of the 3 image files under '.*bad' "
                                                                     "could be read .the last: cannot identify"):
        pretrain.main(pretrain_args(bad, tmp_path / 'run'))


def training_ranks(tmp_path, *extra):
    """A 2-rank torchrun pretraining on tmp_path/data, started and logging. -> (torchrun process, {rank: pid})."""
    import time
    write_images(tmp_path / 'data', 8)
    args = ['--model', 'vit_small', '--img-size', '32', '--mask-patch-size', '16', '--embed-dim', '12',
            '--depths', '1', '--num-heads', '2', '--data-path', str(tmp_path / 'data'), '--batch-size', '1',
            '--num-workers', '0', '--epochs', '50', '--warmup-epochs', '0', '--output', str(tmp_path / 'run'),
            '--print-freq', '1', '--amp', 'off', *extra]
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             os.path.join(HERE, 'pretrain.py'), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / 'run' / 'log.jsonl') and time.time() < deadline:
        time.sleep(0.5)

    def rank(pid):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as c, open(f'/proc/{pid}/environ', 'rb') as e:
                if str(tmp_path).encode() in c.read():
                    return re.search(rb'\0RANK=(\d)\0', b'\0' + e.read())
        except OSError:
            return None
    found = {p: rank(p) for p in os.listdir('/proc') if p.isdigit() and p != str(proc.pid)}
    ranks = {int(m[1]): int(p) for p, m in found.items() if m}
    return proc, ranks


def end_all(proc, pids):
    import signal
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()


def test_a_hung_rank_stops_the_others_within_the_timeout(tmp_path):
    """Freeze rank 1 (SIGSTOP) while training: rank 0's next collective times out after --dist-timeout and the run
    ends with torch's error instead of hanging."""
    import signal
    import time
    proc, ranks = training_ranks(tmp_path, '--dist-timeout', '0.1')
    try:
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGSTOP)
        start = time.time()
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0 and time.time() - start < 60
        assert re.search('[Tt]imed out', out), out[-2000:]
    finally:
        end_all(proc, ranks.values())


def test_the_ranks_end_with_their_torchrun(tmp_path):
    """torchrun killed (SIGKILL: it cannot pass anything on): its ranks stop at their next log line instead of
    training on, orphaned, into the output folder."""
    import time
    proc, ranks = training_ranks(tmp_path, '--epochs', '100000')
    try:
        assert set(ranks) == {0, 1}, ranks
        proc.kill()
        deadline = time.time() + 60
        while any(os.path.exists(f'/proc/{pid}') and open(f'/proc/{pid}/stat').read().split()[2] != 'Z'
                  for pid in ranks.values()) and time.time() < deadline:
            time.sleep(0.2)
        assert time.time() < deadline, 'the ranks outlived their torchrun'
    finally:
        end_all(proc, ranks.values())


def test_the_slurm_script_saves_requeues_and_resumes_before_the_time_limit(tmp_path):
    """slurm.sh with stand-ins for srun (one node) and scontrol: at the time limit's USR1 the ranks save and stop,
    the job requeues itself, and the requeued job's same command finishes the run from its checkpoint."""
    import time
    write_images(tmp_path / 'data', 8)
    stand_ins = {'srun': 'while [[ $1 == -* ]]; do shift; done; SLURM_NODEID=0 exec "$@"',
                 'scontrol': 'if [ "$1" = show ]; then echo 127.0.0.1; else echo "$@" >> "$REQUEUED"; fi'}
    for name, body in stand_ins.items():
        (tmp_path / name).write_text(f'#!/bin/bash\n{body}\n')
        os.chmod(tmp_path / name, 0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               SLURM_JOB_NODELIST='node[0]', SLURM_NNODES='1', SLURM_JOB_ID='42', SLURM_GPUS_ON_NODE='2',
               TMPDIR=str(tmp_path), SIMMIM_PORT=str(29500 + (os.getpid() + 700) % 1000), REQUEUED=str(tmp_path / 'requeued'))
    command = ['bash', 'slurm.sh', 'pretrain.py', '--model', 'vit_small', '--img-size', '32', '--mask-patch-size', '16',
               '--embed-dim', '12', '--depths', '1', '--num-heads', '2', '--data-path', str(tmp_path / 'data'),
               '--batch-size', '1', '--num-workers', '0', '--epochs', '30', '--warmup-epochs', '0', '--output',
               str(tmp_path / 'run'), '--print-freq', '1', '--amp', 'off']
    job = subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / 'run' / 'log.jsonl') and time.time() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@600
    out = job.communicate(timeout=120)[0]
    assert job.returncode == 0 and 'SIGTERM: stopped after ' in out, out
    assert (tmp_path / 'requeued').read_text() == 'requeue 42\n'
    stopped = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    assert stopped['epoch'] < 29, 'the run ended before the signal'
    done = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=180)  # the requeued job
    assert done.returncode == 0 and 'resumed from' in done.stdout, done.stdout + done.stderr
    assert torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)['epoch'] == 29
    assert (tmp_path / 'requeued').read_text() == 'requeue 42\n'  # not again: it finished


def test_attention_with_and_without_sdpa_agree():
    for name in ('swin_tiny', 'swinv2_tiny', 'vit_small'):
        model = tiny_simmim(name).eval()
        size = model.encoder.patch_embed.img_size[0]
        x, mask = torch.randn(2, 3, size, size), random_mask(model, 2, size)
        with torch.no_grad():
            fused = model.encoder(x, mask)
            models.use_fused_attention(model, False)
            torch.testing.assert_close(model.encoder(x, mask), fused, atol=1e-5, rtol=1e-5)
        assert not any(isinstance(m, models.FusedWindowAttentionV2) or getattr(m, 'fused_attn', False)
                       for m in model.modules())


def test_a_cpu_run_flushes_denormals_and_keeps_freed_memory():
    import resource
    masked = torch.tensor([0., -100.])  # a shifted-window mask entry
    torch.set_flush_denormal(False)
    assert 0 < torch.softmax(masked, 0)[1] < 1.2e-38  # a denormal: tenfold slower matrix products on CPUs
    engine.Run(pretrain.get_args_parser().parse_args(['--device', 'cpu'])).close()
    assert torch.softmax(masked, 0)[1] == 0
    if sys.platform == 'linux' and os.confstr('CS_GNU_LIBC_VERSION'):  # glibc: a freed 64 MB buffer is reused
        faults = []
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.ones(16 * 2 ** 20)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        assert min(faults[1:]) < 1000, faults  # 16384 pages: without the setting, every one faults in again


def test_benchmark_script_runs(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, os.path.join(HERE, 'tools', 'benchmark.py'), *a],
                                    capture_output=True, text=True, timeout=300)
    steps = run('--model', 'swin_tiny', '--img-size', '64', '--batch-size', '2', '--steps', '1', '--warmup', '0',
                '--amp', 'off')
    assert steps.returncode == 0, steps.stderr[-2000:]
    assert re.search(r'\| ours \| off \| \d+\.\d+ \| \d+\.\d+ \| \d+\.\d+ \| - \| - \|', steps.stdout)
    pipeline = run('--data', '--images', '48', '--num-workers', '0', '--img-size', '64', '--decode', 'workers', 'device')
    assert pipeline.returncode == 0, pipeline.stderr[-2000:]
    for decode in ('workers', 'device'):
        assert re.search(rf'data pipeline, --decode {decode}: [1-9]\d* images/s with 0 workers', pipeline.stdout)
    assert re.search(r'--decode device against workers, same crops, in 0-255 levels: largest 1.00, mean 0.\d+, '
                     r'\d+.\d% of values differ by over 0.5', pipeline.stdout), pipeline.stdout
    profile = run('--data', '--profile', '--images', '8', '--img-size', '64')
    shares = re.findall(r'\| [^|]+ \| \d+\.\d+ \| (\d+)% \|', profile.stdout)
    assert profile.returncode == 0 and len(shares) == 6 and 97 <= sum(map(int, shares)) <= 103, profile.stdout


def test_compiled_training_follows_the_eager_losses(tmp_path):
    # torch.compile is the GPU default (measured faster there); on CPU it must train the same model as eager
    write_images(tmp_path / 'data', 8)
    for name, extra in (('eager', []), ('compiled', ['--compile', 'on']), ('other_seed', ['--seed', '1'])):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / name, '--epochs', '1', *extra))
    losses = {name: [r['loss'] for r in read_log(tmp_path / name) if 'step' in r]
              for name in ('eager', 'compiled', 'other_seed')}
    assert len(losses['eager']) == 2
    assert np.allclose(losses['compiled'], losses['eager'], rtol=1e-4)
    assert not np.allclose(losses['other_seed'], losses['eager'], rtol=1e-4)  # the check can tell runs apart


# ---------------------------------------------------------------------------------------------------------------------
# Training fidelity: six official pretraining steps (fixtures/ms_steps_*.pt) replayed through pretrain.py's step

STEP_ARCH = {'swin': ('swin_base', 192, dict(embed_dim=4, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=6)),
             'vit': ('vit_base', 224, dict(embed_dim=64, depths=2, num_heads=2))}


def official_names(names, simmim):
    """Official parameter name -> ours, through the loader's own layout conversion."""
    state = {k: torch.full((1,), float(i)) for i, k in enumerate(names)}
    ours, _ = models.to_timm_layout({'model': state})
    prefix = lambda k: 'encoder.' + k if simmim and not k.startswith('decoder.') else k
    return {names[int(v)]: prefix(k) for k, v in ours.items()}


def step_model(family, state=None):
    """The tiny SimMIM model of the step fixtures, with state (official layout) loaded if given."""
    name, size, arch = STEP_ARCH[family]
    model = models.build_simmim(name, img_size=size, drop_path_rate=0., **arch)
    if state is not None:
        models.load_pretrained(model, timm_state({'model': state}))
    return model


def weight_gap(model, family, state):
    """Largest absolute difference between model's weights and state (official layout)."""
    ours, theirs = model.state_dict(), step_model(family, state).state_dict()
    return max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)


def replay_official_steps(family, change=None):
    """Our model loaded with the official init, trained by engine.Trainer on the recorded images, masks and schedule.
    change(recipe) alters a setting first (negative controls). -> (record, model, optimizer, lrs, losses, grad norms)."""
    rec = fixture(f'ms_steps_{family}.pt')
    model = step_model(family, rec['init'])
    args = pretrain.get_args_parser().parse_args(
        ['--model', STEP_ARCH[family][0], '--amp', 'off', '--epochs', str(rec['epochs']), '--warmup-epochs',
         str(rec['warmup_epochs']), '--weight-decay', str(rec['weight_decay']), '--clip-grad', str(rec['clip_grad']),
         '--batch-size', '512', '--base-lr', str(rec['base_lr']), '--warmup-lr', str(rec['warmup_lr']),
         '--min-lr', str(rec['min_lr'])])  # 512 images per step: the lrs recorded are the lrs used
    recipe = engine.recipe(args, cpu_run(), pretrain.RECIPE)
    if change:
        change(recipe)
    schedule = engine.Schedule(recipe, rec['steps_per_epoch'])
    trainer = engine.Trainer(model, schedule, recipe, args, cpu_run())
    optimizer = trainer.optimizer
    mean, std = (torch.tensor(rec[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    lrs, losses, norms = [], [], []
    for step in range(len(rec['lrs'])):
        images = (rec['images'][step % 2].float() / 255 - mean) / std
        loss, norm = trainer.step(step, [(images, rec['masks'][step])], lambda batch: model(*batch))
        lrs.append(optimizer.param_groups[0]['lr'])
        losses.append(float(loss))
        norms.append(float(norm))
    return rec, model, optimizer, lrs, losses, norms


def max_rel(ours, recorded):
    return max(abs(a - b) / abs(b) for a, b in zip(ours, recorded))


@pytest.mark.parametrize('family', ['swin', 'vit'])
def test_six_official_training_steps_are_reproduced(family):
    rec, model, optimizer, lrs, losses, norms = replay_official_steps(family)
    assert lrs == pytest.approx(rec['lrs'], rel=1e-12)  # steps 0 and 1 both at the warmup lr, as the official loop
    assert max_rel(losses, rec['losses']) < 1e-5 and max_rel(norms, rec['grad_norms']) < 1e-5
    assert weight_gap(model, family, rec['final']) < 1e-5
    decayed = {n for n, p in model.named_parameters()
               if any(p is q for g in optimizer.param_groups if g['weight_decay'] > 0 for q in g['params'])}
    names = official_names(list(rec['weight_decay_of']), simmim=True)
    assert {names[k] for k, wd in rec['weight_decay_of'].items() if wd > 0} == decayed


@pytest.mark.parametrize('family, change', [
    ('swin', lambda recipe: recipe.update(weight_decay=0.)),  # another weight decay: the weights after step 2 move
    ('vit', lambda recipe: recipe.update(warmup_epochs=0)),  # another schedule: the lrs and the weights move
])
def test_the_step_replay_notices_a_changed_recipe(family, change):
    rec, model, *_ = replay_official_steps(family, change)
    assert weight_gap(model, family, rec['final']) > 1e-5


@pytest.mark.parametrize('family', ['swin', 'vit'])
def test_fine_tuning_optimizer_groups_are_the_official_ones(family):
    rec = fixture(f'ms_steps_{family}.pt')
    name, _, arch = STEP_ARCH[family]
    arch = dict(arch, window_size=7) if family == 'swin' else arch
    classifier = models.build_classifier(name, img_size=224, num_classes=10, drop_path_rate=0., **arch)
    groups = models.param_groups(classifier, finetune.RECIPE['weight_decay'], rec['layer_decay'])
    optimizer = engine.build_optimizer(groups, 1e-3)
    ours = {n: [g['weight_decay'], g['lr_scale']] for n, p in classifier.named_parameters()
            for g in optimizer.param_groups if any(p is q for q in g['params'])}
    names = official_names(list(rec['finetune_groups']), simmim=False)
    recorded = {names[k]: v for k, v in rec['finetune_groups'].items()}
    assert set(ours) == set(recorded)
    assert all(ours[k] == pytest.approx(recorded[k], rel=1e-9) for k in recorded), \
        [(k, ours[k], recorded[k]) for k in recorded if ours[k] != pytest.approx(recorded[k], rel=1e-9)][:5]


@pytest.mark.parametrize('family', ['swin', 'vit'])
def test_a_fresh_model_is_initialised_as_the_official_one(family):
    rec = fixture(f'ms_steps_{family}.pt')
    torch.manual_seed(0)
    ours = step_model(family).state_dict()
    names = official_names(list(rec['init']), simmim=True)
    kinds = {}  # all weights of a kind: linear layers by name, patch embedding, tokens, tables
    for official, tensor in rec['init'].items():
        if official in names and tensor.ndim >= 2 and tensor.is_floating_point():
            kind = 'table' if 'table' in official else 'token' if 'token' in official else official.split('.')[-2]
            kinds.setdefault(kind, []).append((tensor.flatten(), ours[names[official]].flatten()))
    for kind, pairs in kinds.items():
        theirs, mine = (torch.cat(side) for side in zip(*pairs))
        if theirs.numel() >= 200:  # enough values for a std within 10%
            assert float(mine.std()) == pytest.approx(float(theirs.std()), rel=0.1), kind


def test_resume_refuses_other_optimization_flags_unless_accepted_and_switches_amp(tmp_path, capsys):
    write_images(tmp_path / 'data', 8)
    run = lambda *extra: pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', *extra))
    run('--epochs', '1')
    with pytest.raises(SystemExit, match=r"--epochs 1 -> 4, --base-lr 0.5 -> 0.01, --lr-scheduler cosine -> multistep, "
                                         r"--multisteps \[\] -> \[2\]; rerun with the same flags, add --accept-changes "
                                         r"to continue on the new settings, or start afresh with another --output"):
        run('--epochs', '4', '--base-lr', '1e-2', '--lr-scheduler', 'multistep', '--multisteps', '2')
    for extra, message in ((['--lr-scheduler', 'multistep'], 'go with --lr-scheduler multistep, and it needs them'),
                           (['--multisteps', '1'], 'go with --lr-scheduler multistep'),
                           (['--lr-scheduler', 'multistep', '--multisteps', '4'], 'is not before --epochs 4')):
        with pytest.raises(SystemExit, match='^error: --multisteps .*' + message):
            run('--epochs', '4', *extra, '--output', str(tmp_path / 'other'))
    run('--epochs', '1', '--num-workers', '1', '--print-freq', '5')  # flags that do not change the training: no error
    run('--epochs', '2', '--accept-changes', '--amp', 'fp16', '--weight-decay', '0.2')  # and from fp32 to fp16
    groups = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)['optimizer']['param_groups']
    assert sorted(g['weight_decay'] for g in groups) == [0., 0.2]  # the new one, not the saved state's
    out = capsys.readouterr().out
    assert 'resuming with changed settings (--accept-changes): --epochs 1 -> 2' in out and 'resumed from' in out
    run('--epochs', '3', '--accept-changes', '--amp', 'off')  # and back: the scaler's state is left behind
    assert [r['epoch'] for r in read_log(tmp_path / 'run') if 'epoch_loss' in r] == [0, 1, 2]


def test_a_nan_loss_is_skipped_and_a_run_of_skipped_steps_never_ends_done(tmp_path, monkeypatch):
    write_images(tmp_path / 'data', 8)
    original = models.SimMIM.forward
    monkeypatch.setattr(models.SimMIM, 'forward', lambda self, x, m: original(self, x, m) * float('nan'))
    with pytest.raises(SystemExit, match='consecutive steps with a non-finite loss or gradient'):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', '--epochs', '1'))  # 2 steps < --max-nonfinite
    assert [r['nonfinite_steps'] for r in read_log(tmp_path / 'run') if 'step' in r] == [1, 2]
    weights = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)['model']
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


@pytest.mark.parametrize('flag, value, message', [
    ('--save-freq', '0', 'argument --save-freq: must be at least 1, got 0'),
    ('--clip-grad', '-1', 'argument --clip-grad: must be at least 0, got -1'),
    ('--print-freq', '0', 'argument --print-freq: must be at least 1, got 0'),
    ('--epochs', '0', 'argument --epochs: must be at least 1, got 0'),
    ('--save-steps', '-1', 'argument --save-steps: must be at least 0, got -1'),
    ('--img-size', '-64', 'argument --img-size: must be at least 1, got -64'),
    ('--accumulation-steps', '0', 'argument --accumulation-steps: must be at least 1, got 0'),
    ('--base-lr', 'nan', 'argument --base-lr: must be a finite number, got nan'),
    ('--clip-grad', 'inf', 'argument --clip-grad: must be a finite number, got inf'),
    ('--mean', 'nan', 'argument --mean: must be a finite number, got nan'),
    ('--std', '0', 'argument --std: must be in (0, inf), got 0'),
    ('--mask-ratio', '1', 'argument --mask-ratio: must be in (0, 1), got 1'),
    ('--scale', '2', 'argument --scale: must be in (0, 1], got 2'),
    ('--hflip', '1.5', 'argument --hflip: must be in [0, 1], got 1.5'),
    ('--drop-path', '1', 'argument --drop-path: must be in [0, 1), got 1'),
    ('--seed', str(2 ** 64), f'argument --seed: must be in [0, 4294967295], got {2 ** 64}'),
])
def test_out_of_range_flags_are_one_line_errors(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        pretrain.get_args_parser().parse_args([flag, value])
    assert capsys.readouterr().err.splitlines() == [f"{pretrain.get_args_parser().prog}: error: {message} (--help "
                                                    f"lists the flags)"]


def test_a_shortened_flag_is_refused_not_taken_for_a_longer_one(capsys):
    with pytest.raises(SystemExit):  # argparse's default took --lr for --lr-scheduler: "invalid choice: '0.1'"
        finetune.get_args_parser().parse_args(['--lr', '0.1'])
    assert 'unrecognized arguments: --lr 0.1' in capsys.readouterr().err


def test_the_image_scan_survives_link_cycles_fifos_and_hidden_folders(tmp_path):
    write_images(tmp_path / 'data' / 'a', 2)
    write_images(tmp_path / 'data' / 'b', 1)
    os.symlink(tmp_path / 'data', tmp_path / 'data' / 'a' / 'up')  # a cycle: a/up/a/up/...
    os.symlink(tmp_path / 'data' / 'b', tmp_path / 'data' / 'b' / 'self')
    os.mkfifo(tmp_path / 'data' / 'a' / 'x.png')  # reading it would block forever
    write_images(tmp_path / 'data' / '.ipynb_checkpoints', 1)
    with pytest.warns(UserWarning, match='leads back to a folder already scanned'):
        samples, classes = data.find_images(str(tmp_path / 'data'))
    assert classes == ['a', 'b'] and len(samples) == 3


def test_sigterm_before_the_loop_stops_at_once(tmp_path, monkeypatch):
    import signal
    write_images(tmp_path / 'data', 8)
    original = models.build_simmim

    def slow_build(*a, **k):  # the signal arrives while the model is built
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*a, **k)

    monkeypatch.setattr(models, 'build_simmim', slow_build)
    with pytest.raises(SystemExit, match='SIGTERM before training started: stopped; nothing was trained or saved'):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run'))
    assert not os.path.exists(tmp_path / 'run' / 'log.jsonl')


def test_a_rerun_of_continued_pretraining_resumes_it(finetuned, tmp_path, capsys):
    # the architecture and normalisation of a resumed run are its own checkpoint's, not the defaults
    command = ['--pretrained', str(finetuned / 'pre' / 'checkpoint.pth'), '--data-path',
               str(finetuned / 'data' / 'train'), '--batch-size', '4', '--num-workers', '0', '--amp', 'off',
               '--warmup-epochs', '0', '--output', str(tmp_path / 'more')]
    pretrain.main(pretrain.get_args_parser().parse_args(command + ['--epochs', '1', '--mean', '.5', '.5', '.5',
                                                                   '--std', '.2', '.2', '.2']))
    pretrain.main(pretrain.get_args_parser().parse_args(command + ['--epochs', '2', '--accept-changes']))
    out = capsys.readouterr().out
    assert 'resumed from' in out and 'swin_tiny' in out
    with pytest.raises(SystemExit, match=r"--pretrained .*pre/checkpoint.pth -> .*more/ckpt_epoch_1.pth"):
        pretrain.main(pretrain.get_args_parser().parse_args(  # another start into the same folder
            command[2:] + ['--pretrained', str(tmp_path / 'more' / 'ckpt_epoch_1.pth'), '--epochs', '2']))
    with pytest.raises(SystemExit, match=r"is no pretrain.py checkpoint, so pretraining cannot resume from it"):
        pretrain.main(pretrain.get_args_parser().parse_args(
            command[2:] + ['--resume', str(finetuned / 'ft' / 'checkpoint.pth'), '--output', str(tmp_path / 'x')]))
    saved = torch.load(tmp_path / 'more' / 'checkpoint.pth', weights_only=True)
    assert saved['recipe']['epochs'] == 2 and saved['config']['mean'] == (.5, .5, .5) and \
        saved['config']['embed_dim'] == 8


def test_another_run_into_a_used_output_is_refused_and_eval_needs_a_classifier(finetuned, tmp_path):
    import shutil
    shutil.copytree(finetuned / 'ft', tmp_path / 'ft')
    other = tmp_path / 'other.pth'
    shutil.copy(finetuned / 'pre' / 'checkpoint.pth', other)
    with pytest.raises(SystemExit, match=r"--pretrained .*checkpoint.pth -> .*other.pth: a resumed run goes on from "
                                         r"the weights of .*; leave --pretrained out to resume it, or start a new run"):
        finetune.main(finetune.get_args_parser().parse_args([
            '--pretrained', str(other), '--data-path', str(finetuned / 'data'), '--num-workers', '0', '--amp', 'off',
            '--batch-size', '4', '--epochs', '4', '--warmup-epochs', '0', '--base-lr', '1', '--mixup', '0',
            '--cutmix', '0', '--aa', '', '--reprob', '0', '--output', str(tmp_path / 'ft')]))
    with pytest.raises(SystemExit, match="holds no classifier .a pretraining checkpoint.*fine-tune it first"):
        finetune.main(finetune.get_args_parser().parse_args([
            '--eval', '--resume', str(other), '--data-path', str(finetuned / 'data'), '--num-workers', '0']))


def test_a_use_reads_the_checkpoint_it_names_not_outputs(finetuned, capsys):
    finetune.main(finetune.get_args_parser().parse_args([  # --output holds the fine-tuned classifier
        '--pretrained', str(finetuned / 'pre' / 'checkpoint.pth'), '--export', str(finetuned / 'enc'),
        '--output', str(finetuned / 'ft')]))
    assert json.load(open(finetuned / 'enc' / 'config.json'))['num_classes'] == 0  # the encoder of --pretrained
    shutil.rmtree(finetuned / 'enc')


def test_using_a_classifier_takes_its_settings_and_one_mode_at_a_time(finetuned, tmp_path):
    best, data_path = str(finetuned / 'ft' / 'best.pth'), str(finetuned / 'data')
    cases = [
        (['--eval', '--predict', data_path, '--resume', best], r"--eval and --predict each run alone: pass one"),
        (['--eval', '--resume', best, '--img-size', '96'], r"'.*best.pth' was trained with other settings: --img-size "
                                                            r"224 -> 96; leave these flags out .they come from the"),
        (['--eval', '--resume', best, '--model', 'vit_small'], r".* settings: --model swin_tiny -> vit_small; leave"),
        (['--predict', data_path, '--resume', best, '--num-classes', '5'], r".* settings: --num-classes 2 -> 5; leave"),
        (['--pretrained', str(finetuned / 'pre' / 'checkpoint.pth'), '--aa', 'bogus'],
         r"--aa 'bogus' is no timm augmentation policy: use e.g. rand-m9-mstd0.5-inc1"),
        (['--resume', best, '--export', best], r"--export '.*best.pth' is the checkpoint it would read"),
        (['--pretrained', str(finetuned / 'pre' / 'checkpoint.pth'), '--in-chans', '4', '--mean', *['.5'] * 4, '--std',
          *['.2'] * 4], r"RandAugment \(--aa\) works on 1- or 3-channel images, not 4: pass --aa ''"),
        (['--resume', best, '--predict', data_path, '--predict-csv', str(next((finetuned / 'data').rglob('*.png')))],
         r"--predict-csv '.*png' is one of the images"),
        (['--resume', best, '--predict', data_path, '--predict-csv', str(tmp_path)], r"--predict-csv '.*' is a folder: "
         r"name a new file in an existing folder"),  # it was refused after every prediction
        (['--resume', best, '--predict', data_path, '--predict-csv', str(tmp_path / 'no' / 'p.csv')],
         r"--predict-csv '.*p.csv' is in no folder that exists"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit, match='^error: ' + message):
            finetune.main(finetune.get_args_parser().parse_args(args + [
                '--data-path', data_path, '--num-workers', '0', '--output', str(tmp_path / 'out')]))
    # a classifier timm built, without our label names or intensity in its pretrained_cfg
    model = models.build_classifier('swin_tiny', img_size=64, num_classes=3, embed_dim=8, depths=(1, 1), num_heads=(1, 2),
                                    window_size=2)
    model.pretrained_cfg = dict(input_size=(3, 64, 64), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0)
    Image.fromarray(np.full((50, 60, 3), 128, np.uint8)).save(tmp_path / 'x.png')
    assert sorted(name for name, _ in finetune.classify(model, str(tmp_path / 'x.png'))) == ['class 0', 'class 1',
                                                                                          'class 2']
    model.pretrained_cfg['label_names'] = ('cat',)  # fewer names than outputs (--num-classes above the folders)
    assert sorted(name for name, _ in finetune.classify(model, str(tmp_path / 'x.png'))) == ['cat', 'class 1',
                                                                                          'class 2']


def test_evaluation_counts_readable_images_and_says_which_classes_have_none():
    model = torch.nn.Linear(2, 3)
    model.num_classes = 3
    images = torch.tensor([[5., 0.], [0., 5.], [5., 0.]])  # predicted 0, 1 (wrong: truly 0), and a stand-in
    loader = [(images, torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))]  # the third replaced an unreadable file
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1., 0.], [0., 1.], [0., 0.]]))
        model.bias.zero_()
    run = argparse.Namespace(device=torch.device('cpu'), distributed=False)
    stats = finetune.evaluate(model, loader, run, torch.autocast('cpu', enabled=False))
    assert stats['images'] == 2 and stats['acc1'] == 50 and stats['per_class'] == [50, None, None]


def test_unreadable_validation_images_are_refused_before_training(tmp_path):
    write_classes(tmp_path / 'data' / 'train', 2)
    for label in ('blue', 'red'):
        os.makedirs(tmp_path / 'data' / 'val' / label)
        (tmp_path / 'data' / 'val' / label / 'broken.jpg').write_bytes(b'not an image')
    with pytest.warns(UserWarning), pytest.raises(SystemExit, match="none of the 2 image files under .*val' could be "
                                                                    "read"):
        finetune.main(finetune.get_args_parser().parse_args([
            '--model', 'swin_tiny', '--img-size', '64', '--embed-dim', '8', '--depths', '1', '1', '1', '1',
            '--num-heads', '1', '2', '2', '4', '--data-path', str(tmp_path / 'data'), '--num-workers', '0',
            '--amp', 'off', '--batch-size', '2', '--epochs', '1', '--output', str(tmp_path / 'ft')]))
    assert not os.path.exists(tmp_path / 'ft' / 'checkpoint.pth')


def flip_bytes_in_the_largest_tensor(path):
    """64 bytes flipped in the middle of the checkpoint's largest tensor, size unchanged (a bad copy)."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack('<HH', f.read(4))
        start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        f.seek(start)
        chunk = f.read(64)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_a_resume_refuses_pretrained_and_fewer_epochs_and_mends_a_finished_runs_damaged_checkpoint(tmp_path, capsys):
    write_images(tmp_path / 'data', 8)
    run = tmp_path / 'run'
    pretrain.main(pretrain_args(tmp_path / 'data', run))  # 2 epochs
    with pytest.raises(SystemExit, match=r"^error: --pretrained none -> .*ckpt_epoch_0.pth: a resumed run goes on from "
                                         r"the weights of '.*checkpoint.pth'; leave --pretrained out to resume it"):
        pretrain.main(pretrain_args(tmp_path / 'data', run, '--pretrained', str(run / 'ckpt_epoch_0.pth'),
                                    '--accept-changes'))  # it was listed as accepted, and never loaded
    with pytest.raises(SystemExit, match=r"checkpoint.pth' is past the end of --epochs 1 \(it is at the end of epoch "
                                         r"1\): nothing to train; give --epochs 3 or more"):  # it said "done"
        pretrain.main(pretrain_args(tmp_path / 'data', run, '--epochs', '1', '--accept-changes'))
    flip_bytes_in_the_largest_tensor(run / 'checkpoint.pth')
    capsys.readouterr()
    pretrain.main(pretrain_args(tmp_path / 'data', run))  # finished: resumed from ckpt_epoch_1.pth, nothing to train
    out = capsys.readouterr().out
    assert 'passed over' in out and re.search(r"resumed from .*ckpt_epoch_1.pth at epoch 2", out) and 'done' in out
    assert checkpoints.read(str(run / 'checkpoint.pth')).saved['epoch'] == 1  # whole again (it stayed damaged)


def test_a_corrupted_checkpoint_is_never_trained_from(tmp_path, capsys):
    write_images(tmp_path / 'data', 8)
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run'))  # 2 epochs: ckpt_epoch_0.pth, ckpt_epoch_1.pth
    for name in ('checkpoint.pth', 'ckpt_epoch_1.pth'):  # failing storage
        flip_bytes_in_the_largest_tensor(tmp_path / 'run' / name)
    with pytest.raises(SystemExit, match=r"checkpoint '.*checkpoint.pth' is corrupted: its contents do not match"):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', '--resume',
                                    str(tmp_path / 'run' / 'checkpoint.pth')))
    capsys.readouterr()
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', '--epochs', '3', '--accept-changes'))
    out = capsys.readouterr().out
    assert 'checkpoint.pth\' is corrupted' in out and 'passed over' in out
    assert re.search(r"resumed from .*ckpt_epoch_0.pth at epoch 1", out)
    assert [r['epoch'] for r in read_log(tmp_path / 'run') if 'epoch_loss' in r][-2:] == [1, 2]
    latest = tmp_path / 'run' / 'checkpoint.pth'
    with open(latest, 'r+b') as f:  # a damaged header, then a truncated file: passed over too
        f.seek(100)
        f.write(b'\xff' * 8)
    with pytest.raises(SystemExit, match=r"^error: cannot load checkpoint '.*checkpoint.pth' .* truncated, corrupted"):
        pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', '--resume', str(latest)))
    os.truncate(latest, os.path.getsize(latest) // 2)
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', '--epochs', '3', '--accept-changes'))
    out = capsys.readouterr().out
    assert 'passed over' in out and re.search(r"resumed from .*ckpt_epoch_2.pth at epoch 3", out)
    os.truncate(latest, 5000)  # torch reads this one as an OSError
    pretrain.main(pretrain_args(tmp_path / 'data', tmp_path / 'run', '--epochs', '4', '--accept-changes'))
    out = capsys.readouterr().out
    assert 'checkpoint.pth\' (' in out and 'passed over' in out and re.search(r"from .*ckpt_epoch_2.pth at epoch 3", out)


def test_plausible_mistakes_are_one_line_errors(tmp_path):
    write_classes(tmp_path / 'data' / 'train', 2)
    write_classes(tmp_path / 'data' / 'val', 1)
    write_images(tmp_path / 'data' / 'val', 1)  # a stray image beside the class folders
    os.makedirs(tmp_path / 'empty')
    torch.save([1, 2], tmp_path / 'list.pth')
    tiny = ['--model', 'swin_tiny', '--img-size', '64', '--embed-dim', '8', '--num-workers', '0', '--amp', 'off',
            '--output', str(tmp_path / 'out')]
    cases = [
        (pretrain, tiny + ['--device', 'gpu'], "--device 'gpu': use cuda, cuda:N or cpu"),
        (pretrain, tiny + ['--depths', '1', '1', '1', '1', '--num-heads', '1', '1'], '4 stages .* need as many head'),
        (pretrain, tiny + ['--pretrained', str(tmp_path / 'nowhere.pth')],
         "'.*nowhere.pth' does not exist, nor is it a published name"),
        (pretrain, tiny + ['--pretrained', str(tmp_path / 'list.pth')], "holds a list, not a checkpoint"),
        (finetune, tiny + ['--data-path', str(tmp_path / 'data')], "images outside the class folders .e.g. .*img0.png"),
        (finetune, ['--predict', str(tmp_path / 'empty'), '--resume',
                    os.path.join(FIXTURES, 'ms_finetune_swin_w7_224.pth'), '--amp', 'off'], 'no images'),
    ]
    (tmp_path / 'photo.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(100))
    cases.append((pretrain, tiny + ['--pretrained', str(tmp_path / 'photo.png')], r"photo.png' .not a PyTorch file."))
    os.makedirs(tmp_path / 'gap' / 'val')
    shutil.copytree(tmp_path / 'data' / 'train', tmp_path / 'gap' / 'train')
    os.makedirs(tmp_path / 'gap' / 'train' / 'green')
    cases.append((finetune, tiny + ['--data-path', str(tmp_path / 'gap')], "class folder.s. without images .*: green"))
    if not torch.cuda.is_available():
        cases.append((pretrain, tiny + ['--device', 'cuda'], 'torch sees no GPU here'))
    for script, argv, message in cases:
        with pytest.raises(SystemExit, match='^error: .*' + message):
            script.main(script.get_args_parser().parse_args(argv))
    four = tmp_path / 'four'
    for split in ('train', 'val'):
        for label in 'abcd':
            write_images(four / split / label, 1)
    with pytest.raises(SystemExit, match='^error: 2 classes .--num-classes or the checkpoint.s., but 4 class folders'):
        finetune.main(finetune.get_args_parser().parse_args(tiny + ['--data-path', str(four), '--num-classes', '2']))


def test_a_float_image_with_a_nan_pixel_keeps_its_contrast(tmp_path):
    a = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    a[0, 0] = np.nan
    Image.fromarray(a, mode='F').save(tmp_path / 'nan.tif')
    img = data.load_image(tmp_path / 'nan.tif', 1)[0].numpy()
    assert img[0, 0] == 0 and img.max() == 1 and 130 / 255 < img[5, 5] < 150 / 255  # before: all black


# ---------------------------------------------------------------------------------------------------------------------
# Your own images: 16-bit and N-channel data, statistics, a model that describes itself

def write_xrays(root, per_class, seed=0):
    """12-bit grey images in 16-bit PNGs, two classes: a bright blob on the left or on the right."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :48]
    for label, cx in (('left', 14), ('right', 34)):
        os.makedirs(root / label, exist_ok=True)
        for i in range(per_class):
            blob = 2500 * np.exp(-((xx - cx) ** 2 + (yy - 24) ** 2) / 60)
            img = (600 + blob + rng.normal(0, 150, (48, 48))).clip(0, 4095).astype(np.uint16)
            Image.fromarray(img).save(root / label / f'{i}.png')


def test_16_bit_grey_journey_pretrain_finetune_predict_export(tmp_path, capsys):
    import timm
    write_xrays(tmp_path / 'data' / 'train', 6)
    write_xrays(tmp_path / 'data' / 'val', 2, seed=1)
    arch = ['--model', 'swin_tiny', '--embed-dim', '8', '--depths', '1', '1', '1', '1', '--num-heads', '1', '2', '2',
            '4', '--num-workers', '0', '--amp', 'off', '--print-freq', '1', '--batch-size', '4', '--warmup-epochs', '0']
    pretrain.main(pretrain.get_args_parser().parse_args([
        '--stats', '--data-path', str(tmp_path / 'data' / 'train'), '--in-chans', '1', '--intensity', '4095',
        '--model', 'vit_base', '--epochs', '5']))
    line = capsys.readouterr().out
    assert 'warning: --stats does not use --model, --epochs: ignored' in line
    mean, std = (re.search(rf'--{k} ([\d.]+)', line)[1] for k in ('mean', 'std'))
    assert 0.15 < float(mean) < 0.4 and 0.05 < float(std) < 0.4, line  # of 0-1 pixels: 600-3100 of 4095
    pretrain.main(pretrain.get_args_parser().parse_args(arch + [
        '--in-chans', '1', '--intensity', '4095', '--mean', mean, '--std', std, '--img-size', '64', '--hflip', '0',
        '--data-path', str(tmp_path / 'data' / 'train'), '--epochs', '1', '--output', str(tmp_path / 'pre')]))
    out = capsys.readouterr().out
    assert f'normalisation: mean [{float(mean)}] std [{float(std)}] of 0-1 pixels; intensity 4095.0' in out
    assert '32px mask squares cut 64px images into only 4 cells; --mask-patch-size 16 gives 16' in out
    assert Image.open(tmp_path / 'pre' / 'reconstruction_end.png').size == (4 * 66 + 2, 8 * 66 + 2)
    finetune.main(finetune.get_args_parser().parse_args(arch[arch.index('--num-workers'):] + [
        '--pretrained', str(tmp_path / 'pre' / 'checkpoint.pth'), '--data-path', str(tmp_path / 'data'),
        '--epochs', '2', '--base-lr', '1', '--mixup', '0', '--cutmix', '0', '--aa', '', '--reprob', '0', '--hflip', '0',
        '--crop-pct', '1', '--output', str(tmp_path / 'ft')]))
    out = capsys.readouterr().out
    assert f'input: 64px, 1 channels, mean [{float(mean)}] std [{float(std)}]' in out  # the pretraining's
    assert 'intensity 4095.0; evaluation crop 1.0' in out and 'top-5' not in out  # 2 classes: no top-5
    log = [r for r in read_log(tmp_path / 'ft') if 'val_acc1' in r]
    assert len(log[-1]['val_confusion']) == 2 and sum(map(sum, log[-1]['val_confusion'])) == 4
    assert log[-1]['val_per_class'] == [100 * r[i] / sum(r) for i, r in enumerate(log[-1]['val_confusion'])]
    finetune.main(finetune.get_args_parser().parse_args([
        '--predict', str(tmp_path / 'data' / 'val'), '--resume', str(tmp_path / 'ft' / 'best.pth'),
        '--predict-csv', str(tmp_path / 'predictions.csv'), '--mixup', '0.5', '--base-lr', '3', '--batch-size', '2']))
    out = capsys.readouterr().out
    assert 'warning: --predict does not use --base-lr, --batch-size, --mixup: ignored' in out
    rows = list(__import__('csv').reader(open(tmp_path / 'predictions.csv')))
    assert rows[0] == ['image', 'class_1', 'score_1', 'class_2', 'score_2'] and len(rows) == 5
    assert all(r[1] in ('left', 'right') and abs(float(r[2]) + float(r[4]) - 1) < 1e-5 for r in rows[1:])
    assert f"{rows[1][0]}: {rows[1][1]} {100 * float(rows[1][2]):.1f}%" in out
    finetune.main(finetune.get_args_parser().parse_args([
        '--resume', str(tmp_path / 'ft' / 'best.pth'), '--export', str(tmp_path / 'xray')]))
    exported = eval(capsys.readouterr().out.split('in timm: ')[1].strip()).eval()
    config = timm.data.resolve_data_config(model=exported)
    assert config['input_size'] == (1, 64, 64) and tuple(config['mean']) == (float(mean),) and config['crop_pct'] == 1.0
    assert list(exported.pretrained_cfg['label_names']) == ['left', 'right']
    best = torch.load(tmp_path / 'ft' / 'best.pth')
    ours = models.build_classifier(models.model_config(pretrain=False, **best['config'])).eval()
    ours.load_state_dict(best['model'])
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(exported(x), ours(x), atol=1e-5, rtol=1e-5)
    from safetensors.torch import load_file
    old = dict(state_dict=load_file(tmp_path / 'xray' / 'model.safetensors'), intensity=4095.0,  # an older export
               pretrained_cfg=dict(input_size=(1, 64, 64), mean=(float(mean),), std=(float(std),), crop_pct=1.0,
                                   label_names=('left', 'right')))
    torch.save(old, tmp_path / 'xray.pth')
    for path in ('xray', 'xray.pth'):
        back = checkpoints.load_model(str(tmp_path / path))  # the export keeps its preprocessing and intensity
        cfg = back.pretrained_cfg
        assert (cfg['input_size'], cfg['mean'], cfg['crop_pct'], cfg['label_names'], cfg['intensity']) == \
            ((1, 64, 64), (float(mean),), 1.0, ('left', 'right'), 4095.0)
    assert finetune.classify(back, rows[1][0])[0] == (rows[1][1], pytest.approx(float(rows[1][2]), abs=5e-3))  # bf16
    finetune.main(finetune.get_args_parser().parse_args(['--predict', rows[1][0], '--resume',
                                                         str(tmp_path / 'xray')]))
    assert f"{rows[1][0]}: {rows[1][1]} {100 * float(rows[1][2]):.1f}%" in capsys.readouterr().out


@pytest.mark.parametrize('name', ['swin_tiny', 'swinv2_tiny', 'vit_small'])
def test_an_exported_encoder_gives_our_features_in_timm(name, tmp_path, capsys):
    """The export as a backbone: timm's features_only model of it gives our encoder's feature maps (Swin: its 4
    stages; ViT: its last 3 blocks), its plain model our pooled features."""
    import timm
    from safetensors.torch import load_file, save_file
    simmim = tiny_simmim(name).eval()
    size = simmim.encoder.patch_embed.img_size[0]
    for p in simmim.parameters():  # the final norm away from its init, as after pretraining
        p.data += 0.1 * torch.randn_like(p)
    arch = {'model': name, 'img_size': size, 'mean': [0.5] * 3, 'std': [0.25] * 3, 'in_chans': 3}
    arch.update(models.infer_arch(models.to_timm_layout(simmim.state_dict())[0]))
    if name != 'vit_small':
        arch['window_size'] = simmim.encoder.layers[0].blocks[0].window_size[0]
    torch.save(dict(model=simmim.state_dict(), args=arch), tmp_path / 'pre.pth')
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        pooled, fmap = models.extract_features(simmim.encoder, x)
        maps = simmim.encoder.forward_intermediates(x, intermediates_only=True)  # NCHW
    folder = str(tmp_path / 'enc')
    for flag in ('--resume', '--pretrained'):  # pretraining weights export as the encoder either way
        finetune.main(finetune.get_args_parser().parse_args([
            flag, str(tmp_path / 'pre.pth'), '--img-size', str(size), '--export', folder]))
        exported = eval(capsys.readouterr().out.split('in timm: ')[1].strip()).eval()
        with torch.no_grad():
            theirs = exported.forward_head(exported.forward_features(x), pre_logits=True)
        torch.testing.assert_close(theirs, pooled, atol=1e-5, rtol=1e-5)
    assert exported.pretrained_cfg['mean'] == [0.5] * 3 and exported.pretrained_cfg['input_size'] == (3, size, size)
    backbone = timm.create_model(f'local-dir:{folder}', pretrained=True, features_only=True).eval()
    nchw = lambda f: f if name == 'vit_small' else f.permute(0, 3, 1, 2)  # timm's Swin maps are NHWC
    with torch.no_grad():
        features = [nchw(f) for f in backbone(x)]
    assert len(features) == (3 if name == 'vit_small' else 4) and len(maps) == len(features) + 9 * (name == 'vit_small')
    for ours, theirs in zip(maps[-len(features):], features):
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    weights = load_file(os.path.join(folder, 'model.safetensors'))  # the control: one weight changed
    key = next(k for k in weights if k.endswith('norm1.weight'))
    weights[key] = weights[key] + 0.1
    save_file(weights, os.path.join(folder, 'model.safetensors'))
    changed = timm.create_model(f'local-dir:{folder}', pretrained=True, features_only=True).eval()
    with torch.no_grad():
        assert (nchw(changed(x)[-1]) - maps[-1]).abs().max() > 1e-3
    back = checkpoints.load_model(folder)  # the encoder, no head and no (random) decoder
    assert not isinstance(back, models.SimMIM) and back.pretrained_cfg['mean'] == (0.5,) * 3
    if name == 'vit_small':  # the control: timm's default ViT pooling (a new fc_norm) is another encoder
        fresh = timm.create_model('beit_base_patch16_224', img_size=size, patch_size=arch['patch_size'],
                                  embed_dim=arch['embed_dim'], depth=arch['depths'][0], num_heads=arch['num_heads'][0],
                                  num_classes=0)
        fresh.load_state_dict(exported.state_dict(), strict=False)
        with torch.no_grad():
            assert (fresh.forward_head(fresh.forward_features(x), pre_logits=True) - pooled).abs().max() > 1e-2


def test_an_rgb_checkpoint_loads_into_other_channel_counts():
    kw = dict(img_size=32, embed_dim=12, depths=2)
    rgb = models.build_simmim('vit_small', **kw).eval()
    size = 32
    grey_image = torch.randn(2, 1, size, size)
    mask = random_mask(rgb, 2, size)
    grey = models.build_simmim('vit_small', in_chans=1, **kw).eval()
    report = models.load_pretrained(grey, timm_state(rgb.state_dict()))
    assert report['adapted'] == ['encoder.patch_embed.proj.weight', '3 -> 1 channels']
    with torch.no_grad():  # timm's rule (summed filters): a grey image reads as that grey in RGB
        torch.testing.assert_close(grey.encoder(grey_image, mask), rgb.encoder(grey_image.expand(-1, 3, -1, -1), mask))
        torch.testing.assert_close(grey.reconstruct(grey_image, mask),
                                   rgb.reconstruct(grey_image.expand(-1, 3, -1, -1), mask).mean(1, keepdim=True))
        first_only = grey.encoder.patch_embed.proj.weight.clone()
        grey.encoder.patch_embed.proj.weight.copy_(rgb.encoder.patch_embed.proj.weight[:, :1])  # the control
        assert not torch.allclose(grey.encoder(grey_image, mask), rgb.encoder(grey_image.expand(-1, 3, -1, -1), mask))
    assert torch.equal(first_only, rgb.encoder.patch_embed.proj.weight.sum(1, keepdim=True))
    with torch.no_grad():  # and back: a grey checkpoint reads an RGB image of equal channels as that grey
        grey.encoder.patch_embed.proj.weight.copy_(first_only)
        back = models.build_simmim('vit_small', **kw).eval()
        assert models.load_pretrained(back, timm_state(grey.state_dict()))['adapted'][1] == '1 -> 3 channels'
        torch.testing.assert_close(back.encoder(grey_image.expand(-1, 3, -1, -1), mask), grey.encoder(grey_image, mask))
    four = models.build_classifier('vit_small', num_classes=2, in_chans=4, **kw)
    report = models.load_pretrained(four, timm_state(rgb.state_dict()))
    assert report['adapted'][1] == '3 -> 4 channels' and four.patch_embed.proj.weight.shape[1] == 4


def test_best_checkpoint_breaks_top1_ties_by_the_lower_loss(finetuned, tmp_path, monkeypatch):
    scripted = iter([(50., .9), (50., .8), (50., .85), (40., .1)])  # epoch 1 is the best

    def evaluate(*_):
        acc, loss = next(scripted)
        return dict(loss=loss, acc1=acc, acc5=None, images=6, per_class=[acc, acc], confusion=[[3, 0], [3, 0]])
    monkeypatch.setattr(finetune, 'evaluate', evaluate)
    finetune.main(finetune.get_args_parser().parse_args([
        '--pretrained', str(finetuned / 'pre' / 'checkpoint.pth'), '--data-path', str(finetuned / 'data'),
        '--batch-size', '4', '--epochs', '4', '--warmup-epochs', '0', '--mixup', '0', '--cutmix', '0', '--aa', '',
        '--reprob', '0', '--num-workers', '0', '--amp', 'off', '--output', str(tmp_path / 'ft')]))
    best = torch.load(tmp_path / 'ft' / 'best.pth', weights_only=True)
    assert best['epoch'] == 1 and best['best_loss'] == .8 and best['max_accuracy'] == 50.


# ---------------------------------------------------------------------------------------------------------------------
# Published weights by name (served from 127.0.0.1), use from Python, reconstructions

class Hub:
    """Files over HTTP on 127.0.0.1, counting the requests; /cut/PATH sends half of PATH's bytes, then hangs up.
    repos: the Hugging Face Hub's answers for {owner/name: {revision: (commit, {file: bytes})}}."""

    def __init__(self, files, repos=None):
        import http.server
        import threading
        import time
        hub = self
        self.files, self.repos, self.requests = files, repos or {}, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.answer(head=True)

            def do_GET(self):
                self.answer()

            def answer(self, head=False):
                hub.requests.append(('HEAD ' if head else '') + self.path)
                if not head:
                    time.sleep(0.3)  # a transfer takes a while: two processes both missing the file would both ask
                headers, body = hub.resolve(self.path)
                if body is None:
                    self.send_response(404)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header('Content-Length', '0')
                    return self.end_headers()
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body[:len(body) // 2] if self.path.startswith('/cut/') else body)

            def log_message(self, *_):
                pass

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def resolve(self, path):
        """-> (headers, body or None)"""
        import hashlib
        import urllib.parse
        found = re.fullmatch(r'/([^/]+/[^/]+)/resolve/([^/]+)/([^?]+)', path)
        if not found:
            return {}, self.files.get(path.removeprefix('/cut'))
        repo, revision, name = found[1], urllib.parse.unquote(found[2]), found[3]
        if repo not in self.repos:
            return {'X-Error-Code': 'RepoNotFound'}, None
        if revision not in self.repos[repo]:
            return {'X-Error-Code': 'RevisionNotFound'}, None
        commit, files = self.repos[repo][revision]
        if name not in files:
            return {'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': commit}, None
        etag = hashlib.sha256(files[name]).hexdigest()
        return {'X-Repo-Commit': commit, 'ETag': f'"{etag}"'}, files[name]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A 1000-class tiny classifier (its name carries its SHA-256) served locally, with its names in
    checkpoints.PUBLISHED and torch's hub cache in tmp_path."""
    import hashlib
    model = models.build_classifier('swin_tiny', num_classes=1000, **TINY_FIXTURE_SWIN)
    buffer = io.BytesIO()
    torch.save(dict(state_dict=model.state_dict()), buffer)
    body = buffer.getvalue()
    digest = hashlib.sha256(body).hexdigest()[:8]
    server = Hub({f'/in1k-{digest}.pth': body, f'/in1k-{digest[::-1]}.pth': body})
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setattr(checkpoints, 'PUBLISHED', {
        'tiny-in1k': ('a tiny ImageNet classifier', f'{server.url}/in1k-{digest}.pth'),
        'tiny-in1k-wrong-hash': ('its name has another hash', f'{server.url}/in1k-{digest[::-1]}.pth'),
        'tiny-in1k-cut': ('the connection drops halfway', f'{server.url}/cut/in1k-{digest}.pth'),
        'offline': ('nothing listens there', 'http://127.0.0.1:9/offline-0123abcd.pth'),
        'moved': ('not on the server', f'{server.url}/moved-0123abcd.pth'),
    })
    server.cache = tmp_path / 'torch' / 'hub' / 'checkpoints'
    yield server
    server.close()


def cached_files(hub):
    return sorted(os.path.relpath(os.path.join(d, f), hub.cache) for d, _, fs in os.walk(hub.cache) for f in fs
                  if not f.endswith('.lock'))


def test_a_published_name_downloads_once_and_predicts_with_imagenet_names(hub, tmp_path, capsys):
    image = tmp_path / 'bird.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(image)
    imagenet = set(models.class_names(1000))
    for _ in range(2):  # the second run reads the cache
        finetune.main(finetune.get_args_parser().parse_args([
            '--predict', str(image), '--resume', 'tiny-in1k', '--amp', 'off', '--output', str(tmp_path / 'out')]))
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(str(image)))
        guesses = re.findall(r'([^,:]+) (\d+\.\d)%', line.split(': ', 1)[1])
        assert len(guesses) == 5 and all(name.strip() in imagenet for name, _ in guesses), line
    assert hub.requests == [checkpoints.PUBLISHED['tiny-in1k'][1][len(hub.url):]]  # one download
    assert cached_files(hub) == [os.path.basename(checkpoints.PUBLISHED['tiny-in1k'][1])]
    assert models.class_names(1000)[1] == 'goldfish'
    cached = hub.cache / cached_files(hub)[0]  # a cached file damaged later: named, to delete
    cached.write_bytes(cached.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"the downloaded 'tiny-in1k' in {cached} cannot be read .*: delete it"):
        checkpoints.read('tiny-in1k')


@contextlib.contextmanager
def hub_environment(**variables):
    """huggingface_hub under these environment variables (it reads them when imported)."""
    from huggingface_hub import constants
    try:
        with mock.patch.dict(os.environ, variables):
            importlib.reload(constants)
            yield constants
    finally:
        importlib.reload(constants)


def timm_folder(folder, seed, num_classes=3, interpolation='bicubic'):
    """What timm's own save_for_hf writes for a tiny timm Swin: mean 0.5, crop 1.0, labels c0, c1, ..."""
    import timm
    from timm.models._hub import save_for_hf
    torch.manual_seed(seed)
    model = timm.create_model('swin_tiny_patch4_window7_224', num_classes=num_classes, img_size=64, embed_dim=8,
                              depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=2)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 64, 64), mean=(.5,) * 3, std=(.5,) * 3,
                                crop_pct=1.0, interpolation=interpolation)
    save_for_hf(model, folder, model_config=dict(label_names=[f'c{i}' for i in range(num_classes)]),
                safe_serialization=True)
    return {f: open(os.path.join(folder, f), 'rb').read() for f in os.listdir(folder)}


@pytest.fixture
def hf_hub(tmp_path):
    """The Hugging Face Hub's answers on 127.0.0.1 (HF_ENDPOINT), its cache in tmp_path (HF_HOME): org/tiny-simmim
    (transformers' layout), org/tiny-timm (timm's; revision v1 has other weights), org/no-weights."""
    folder = os.path.join(FIXTURES, 'hf_simmim_swin')
    simmim = {f: open(os.path.join(folder, f), 'rb').read() for f in os.listdir(folder)}
    server = Hub({}, {'org/tiny-simmim': {'main': ('1' * 40, simmim)},
                      'org/tiny-timm': {'main': ('a' * 40, timm_folder(tmp_path / 'main', 0)),
                                        'v1': ('b' * 40, timm_folder(tmp_path / 'v1', 1, interpolation='bilinear'))},
                      'org/no-weights': {'main': ('c' * 40, {'config.json': b'{}'})}})
    with hub_environment(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / 'hf')):
        yield server
    server.close()


@pytest.mark.filterwarnings('ignore:its preprocessing resizes bilinear')  # v1's: asserted once below
def test_a_hugging_face_model_id_downloads_through_huggingface_hub(hf_hub, tmp_path):
    import timm
    image = tmp_path / 'x.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(image)
    env = dict(os.environ, HF_ENDPOINT=hf_hub.url, HF_HOME=str(tmp_path / 'hf'))  # the user's command line
    out = subprocess.run([sys.executable, 'finetune.py', '--predict', str(image), '--resume', 'org/tiny-timm',
                          '--amp', 'off', '--output', str(tmp_path / 'out')], cwd=HERE, env=env, capture_output=True,
                         text=True, timeout=120).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith(str(image)))
    assert re.fullmatch(r'.*: c\d \d+\.\d%, c\d \d+\.\d%, c\d \d+\.\d%', line), out  # its label names
    assert 'input: 64px, 3 channels, mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5] of 0-1 pixels, intensity type; ' \
           'evaluation crop 1.0' in out
    main = checkpoints.read('org/tiny-timm')  # the cache's: no file downloaded twice
    assert sorted(r for r in hf_hub.requests if not r.startswith(('HEAD', '/api'))) == \
        ['/org/tiny-timm/resolve/main/config.json', '/org/tiny-timm/resolve/main/model.safetensors']
    assert (main.config['mean'], main.config['crop_pct'], main.config['classes']) == ([.5] * 3, 1.0, ['c0', 'c1', 'c2'])
    with pytest.warns(UserWarning, match='its preprocessing resizes bilinear; this code resizes bicubic'):
        v1 = checkpoints.read('hf-hub:org/tiny-timm@v1')
    assert v1.path == 'hf-hub:org/tiny-timm@v1' and not torch.equal(v1.state['head.fc.weight'],
                                                                     main.state['head.fc.weight'])
    theirs = timm.create_model(f"local-dir:{tmp_path / 'v1'}", pretrained=True).eval()
    ours = checkpoints.load_model('org/tiny-timm@v1')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
    simmim, expected = checkpoints.read('org/tiny-simmim'), checkpoints.read(os.path.join(FIXTURES, 'hf_simmim_swin'))
    assert simmim.layout == 'huggingface' and simmim.config == expected.config
    assert all(torch.equal(simmim.state[k], v) for k, v in expected.state.items())
    hf_hub.requests.clear()
    with hub_environment(HF_HUB_OFFLINE='1'):  # downloaded: read without asking
        assert checkpoints.read('org/tiny-timm@v1').config['classes'] == ['c0', 'c1', 'c2']
    assert hf_hub.requests == []


@pytest.mark.parametrize('name, offline, message', [
    ('org/tiny-timm@nope', '0', "org/tiny-timm has no revision 'nope' \\(a branch, tag or commit\\)"),
    ('org/missing', '0', r"no file or folder 'org/missing' here, nor a model org/missing at http://127.0.0.1:\d+ "
                         r"\(or it is private or gated: log in with hf auth login, or set HF_TOKEN\)"),
    ('org/no-weights', '0', 'org/no-weights holds neither model.safetensors nor pytorch_model.bin'),
    ('org/tiny-timm', '1', r"no file or folder 'org/tiny-timm' here; HF_HUB_OFFLINE is set, and Hugging Face's cache "
                           r"\(.*\) does not hold it: run the command once where there is a network"),
    ('org/tiny-timm.pth', '0', r"'org/tiny-timm.pth' does not exist, nor is it a published name .* or a Hugging Face "
                               r"model id \(owner/name\)"),
])
def test_hugging_face_failures_are_one_line(hf_hub, name, offline, message):
    with hub_environment(HF_HUB_OFFLINE=offline), pytest.raises(ValueError) as e:
        checkpoints.read(name)
    assert re.fullmatch(f"(cannot download '{name}' from the Hugging Face Hub: )?.*{message}.*", str(e.value)) \
        and '\n' not in str(e.value), str(e.value)
    assert not [f for f in hf_hub.requests if not f.startswith(('HEAD', '/api'))]  # nothing downloaded


def download_worker(rank, port, url, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    checkpoints.PUBLISHED['tiny-in1k'] = ('a tiny ImageNet classifier', url)  # the test's, in this spawned process
    run = engine.Run(pretrain.get_args_parser().parse_args(['--device', 'cpu', '--output', '.']))
    try:
        results[rank] = checkpoints.read('tiny-in1k').config['num_classes']
    finally:
        run.close()


def test_the_ranks_of_a_machine_download_a_name_once(hub):
    port = 29500 + (os.getpid() + 500) % 1000
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(download_worker, args=(port, checkpoints.PUBLISHED['tiny-in1k'][1], results), nprocs=2)
    assert dict(results) == {0: 1000, 1: 1000} and len(hub.requests) == 1


@pytest.mark.parametrize('name, message', [
    ('tiny-in1k-wrong-hash', r"is not the published file \(cut short or altered: its SHA-256 does not start with "
                             r"\w{8}\): deleted"),
    ('tiny-in1k-cut', r"is not the published file \(cut short or altered: its SHA-256 does not start with \w{8}\)"),
    ('offline', r"cannot download 'offline' from http://127.0.0.1:9/offline-0123abcd.pth \(.*\): where there is a "
                r"network, download it yourself and pass the path \(or put the file, named as in the URL, into .*\)"),
    ('moved', r"cannot download 'moved': http://127.0.0.1:\d+/moved-0123abcd.pth answered 404 Not Found; download"),
    ('tiny-in1', r"'tiny-in1' does not exist, nor is it a published name; close ones: tiny-in1k"),
])
def test_failed_downloads_are_one_line_and_leave_nothing_to_trust(hub, name, message):
    with pytest.raises(ValueError) as e:  # the scripts print it as 'error: ...'
        checkpoints.read(name)
    assert re.fullmatch('.*' + message + '.*', str(e.value)) and '\n' not in str(e.value), str(e.value)
    assert cached_files(hub) == []  # whole files only


def test_load_model_and_classify_give_the_official_outputs(tmp_path):
    """The Python use: a classifier of any layout, or pretraining weights as the SimMIM model."""
    classifier = checkpoints.load_model(os.path.join(FIXTURES, 'mm_finetune_swin_w7_224.pth'))
    io_ = fixture('ms_finetune_swin_w7_224_io.pt')
    with torch.no_grad():
        torch.testing.assert_close(classifier(io_['x']), io_['logits'], atol=1e-5, rtol=1e-5)
    assert classifier.pretrained_cfg['input_size'] == (3, 224, 224)
    assert classifier.pretrained_cfg['label_names'][:2] == ('class 0', 'class 1')
    simmim = checkpoints.load_model(os.path.join(FIXTURES, 'hf_simmim_swin'))
    assert isinstance(simmim, models.SimMIM) and simmim.pretrained_cfg['input_size'] == (3, 192, 192)
    assert_reproduces(simmim, fixture('ms_simmim_swin_io.pt'))
    pooled, fmap = models.extract_features(simmim, torch.randn(1, 3, 192, 192))
    assert pooled.shape == (1, 32) and fmap.shape == (1, 32, 6, 6)
    image = tmp_path / 'x.png'
    Image.fromarray(np.full((50, 60, 3), 128, np.uint8)).save(image)
    (name, p), *rest = finetune.classify(classifier, str(image))
    x = data.eval_transform(224, imagenet())(data.load_image(str(image)))
    with torch.no_grad():
        probs = classifier(x[None]).softmax(1)[0]
    assert name == f'class {probs.argmax()}' and p == pytest.approx(probs.max().item()) and len(rest) == 4


@pytest.mark.parametrize('source, size', [('ms_simmim_swin.pth', 192), ('ms_simmim_vit.pth', 224)])
def test_reconstruct_draws_the_training_picture_for_any_checkpoint(source, size, tmp_path, capsys):
    write_images(tmp_path / 'imgs', 3)
    (tmp_path / 'imgs' / 'broken.png').write_bytes(b'not a png')  # left out, named
    args = ['--reconstruct', str(tmp_path / 'imgs'), '--pretrained', os.path.join(FIXTURES, source), '--output',
            str(tmp_path / 'out'), '--mask-ratio', '0.5', '--device', 'cpu']
    pretrain.main(pretrain.get_args_parser().parse_args(args))
    with Image.open(tmp_path / 'out' / 'reconstruction_1.png') as picture:  # 3 rows of 4 images, 2px apart
        assert picture.size == (4 * (size + 2) + 2, 3 * (size + 2) + 2)
        first = np.asarray(picture)
    pretrain.main(pretrain.get_args_parser().parse_args(args + ['--seed', '1']))
    with Image.open(tmp_path / 'out' / 'reconstruction_1.png') as picture:
        assert not np.array_equal(np.asarray(picture), first)  # another mask
    out = capsys.readouterr().out
    assert re.search(r'broken.png: unreadable \(.*\), left out', out)
    assert re.search(r'reconstruction_1.png: [^,]+/imgs/\w+\.\w+, [^,]+\.\w+, [^,]+\.\w+\n', out)
    with pytest.raises(SystemExit, match='holds no SimMIM decoder'):
        pretrain.main(pretrain.get_args_parser().parse_args(
            args[:2] + ['--pretrained', os.path.join(FIXTURES, 'ms_finetune_swin_w7_224.pth')]))


def test_predict_and_reconstruct_refuse_what_is_no_file_instead_of_blocking_on_it(finetuned, tmp_path):
    os.mkfifo(tmp_path / 'pipe.png')  # reading it would wait for a writer forever
    pipe, out = str(tmp_path / 'pipe.png'), ['--output', str(tmp_path / 'out')]
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail('blocked on the FIFO'))
    signal.alarm(60)
    try:
        for script, args in ((finetune, ['--predict', pipe, '--resume', str(finetuned / 'ft' / 'best.pth')]),
                             (pretrain, ['--reconstruct', pipe, '--pretrained', FIXTURES + '/ms_simmim_swin.pth'])):
            with pytest.raises(SystemExit, match=r"error: --\w+: '.*pipe.png' is neither a file nor a folder; give"):
                script.main(script.get_args_parser().parse_args(args + out))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_reconstruct_takes_the_checkpoints_mask_squares_and_target_normalisation(tmp_path, monkeypatch):
    simmim = tiny_simmim('swin_tiny', norm_target_window=5)
    arch = dict(models.infer_arch(models.to_timm_layout(simmim.state_dict())[0]), img_size=64, window_size=2,
                mask_patch_size=16, norm_target_window=5)
    torch.save(dict(model=simmim.state_dict(), args=arch), tmp_path / 'pre.pth')
    write_images(tmp_path / 'imgs', 2)
    drawn = []
    monkeypatch.setattr(pretrain, 'save_reconstructions', lambda model, images, masks, *_: drawn.append((model, masks)))
    pretrain.main(pretrain.get_args_parser().parse_args([
        '--reconstruct', str(tmp_path / 'imgs'), '--pretrained', str(tmp_path / 'pre.pth'), '--output',
        str(tmp_path / 'out')]))
    (model, masks), = drawn
    assert model.norm_target_window == 5 and masks.shape == (2, 16, 16) and masks.float().mean() == 10 / 16


# ---------------------------------------------------------------------------------------------------------------------
# Sharded training (--fsdp): two processes on the CPU (gloo), a tiny SwinV2

SHARDED = ['--model', 'swinv2_tiny', '--img-size', '64', '--mask-patch-size', '16', '--embed-dim', '8', '--depths', '1',
           '1', '2', '1', '--num-heads', '1', '2', '2', '4', '--batch-size', '1', '--accumulation-steps', '2',
           '--num-workers', '0', '--epochs', '2', '--warmup-epochs', '1', '--base-lr', '0.5', '--clip-grad', '0.05',
           '--print-freq', '1', '--save-freq', '1', '--amp', 'off', '--drop-path', '0']  # clipping acts: norms ~0.5


def torchrun(script, *args, nproc=2):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc),
            os.path.join(HERE, script), *args]


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
    """The same pretraining with DDP and with --fsdp (2 epochs of 4 steps, accumulation 2), and an --fsdp run that
    saves every step."""
    root = tmp_path_factory.mktemp('fsdp')
    write_images(root / 'data', 16)
    for output, extra in (('ddp', []), ('fsdp', ['--fsdp']), ('steps', ['--fsdp', '--save-steps', '1'])):
        result = subprocess.run(torchrun('pretrain.py', *SHARDED, '--data-path', str(root / 'data'), '--output',
                                         str(root / output), *extra), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return root


def weights(path):
    return checkpoints.read(str(path)).saved['model']


def largest_gap(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_fsdp_trains_as_ddp(sharded):
    ddp, fsdp = weights(sharded / 'ddp' / 'checkpoint.pth'), weights(sharded / 'fsdp' / 'checkpoint.pth')
    assert set(ddp) == set(fsdp) and largest_gap(ddp, fsdp) < 1e-5  # after 8 steps with accumulation and clipping
    losses = lambda output: [(r['loss'], r['grad_norm']) for r in read_log(sharded / output) if 'step' in r]
    assert len(losses('fsdp')) == 8 and np.allclose(losses('fsdp'), losses('ddp'), rtol=1e-5, atol=0)
    manifest = torch.load(sharded / 'fsdp' / 'checkpoint.pth', weights_only=True)
    assert 'model' not in manifest and sorted(manifest['sharded']['files']) == ['.metadata', '__0_0.distcp',
                                                                               '__1_0.distcp']
    folders = sorted(f for f in os.listdir(sharded / 'fsdp') if f.startswith('shards-'))
    assert [re.sub('-[0-9a-f]{6}$', '', f) for f in folders] == ['shards-0.4', 'shards-1.4']
    key = 'encoder.layers.2.blocks.1.mlp.fc1.weight'  # the control: rank 1's half of one weight, moved by 1e-4
    perturbed = dict(fsdp, **{key: torch.cat([fsdp[key][:len(fsdp[key]) // 2], fsdp[key][len(fsdp[key]) // 2:] + 1e-4])})
    assert largest_gap(ddp, perturbed) > 1e-5


def test_a_sigkilled_fsdp_run_resumes_to_the_uninterrupted_weights(sharded, tmp_path):
    command = torchrun('pretrain.py', *SHARDED, '--data-path', str(sharded / 'data'), '--output', str(tmp_path / 'run'),
                       '--fsdp', '--save-steps', '1')
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if 'epoch 1/2 step 2/4' in line:  # its save of step 2 follows: killed around it
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    saved = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    assert (saved['epoch'], saved['step']) in ((1, 1), (1, 2))
    os.makedirs(tmp_path / 'run' / 'shards-1.3')  # and what a save killed midway leaves: shards no manifest names
    (tmp_path / 'run' / 'shards-1.3' / '__0_0.distcp').write_bytes(b'cut')
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert re.search(r"resumed from .*checkpoint.pth at epoch 1 step [12]\n", result.stdout)
    assert largest_gap(weights(sharded / 'steps' / 'checkpoint.pth'), weights(tmp_path / 'run' / 'checkpoint.pth')) == 0
    assert 'shards-1.3' not in os.listdir(tmp_path / 'run')


def test_a_flipped_byte_in_the_newest_shards_is_caught_and_passed_over(sharded, tmp_path):
    shutil.copytree(sharded / 'steps', tmp_path / 'run')
    newest = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)['sharded']['folder']
    shard = tmp_path / 'run' / newest / '__1_0.distcp'
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(checkpoints.Corrupt, match=r"1 of its shard files in .* are missing or damaged"):
        checkpoints.read(str(tmp_path / 'run' / 'checkpoint.pth'))
    said = []
    found = checkpoints.find_resume(str(tmp_path / 'run'), None, say=said.append)
    assert found.path.endswith('ckpt_epoch_0.pth') and len(said) == 2 and all('passed over' in s for s in said)


def test_a_missing_checkpoint_or_shard_folder_is_named_and_passed_over(sharded, tmp_path):
    shutil.copytree(sharded / 'fsdp', tmp_path / 'run')
    os.remove(tmp_path / 'run' / 'checkpoint.pth')  # deleted: the newest numbered one resumes, not a fresh start
    said = []
    found = checkpoints.find_resume(str(tmp_path / 'run'), None, say=said.append)
    assert found.path.endswith('ckpt_epoch_1.pth') and said == [f"{tmp_path / 'run' / 'checkpoint.pth'} is missing: "
                                                                 f"passed over"]
    os.makedirs(tmp_path / 'copy')  # a manifest copied without its shards
    shutil.copy(tmp_path / 'run' / 'ckpt_epoch_1.pth', tmp_path / 'copy')
    with pytest.raises(checkpoints.Corrupt, match=r"names its shards' folder .*shards-1.4-\w+, which is missing: "
                                                  r"copy it beside the checkpoint"):
        checkpoints.read(str(tmp_path / 'copy' / 'ckpt_epoch_1.pth'))


def test_manifests_of_any_size_are_read_and_checkpoint_errors_unwrapped(tmp_path):
    """A fine-tuning manifest with 10,000 long class names passes 1 MiB: still a manifest (the shards it names are
    kept); torch.distributed.checkpoint's CheckpointException (a BaseException) comes out as the rank's own error."""
    from torch.distributed.checkpoint.api import CheckpointException
    big = dict(sharded=dict(folder='shards-1.4', files={}), config=dict(classes=[f'{i:05d}' + 'x' * 240 for i in range(10000)]))
    torch.save(big, tmp_path / 'checkpoint.pth')
    assert os.path.getsize(tmp_path / 'checkpoint.pth') > 2 ** 21
    assert checkpoints.manifest_of(str(tmp_path / 'checkpoint.pth'))['sharded']['folder'] == 'shards-1.4'

    def full_disk():
        raise CheckpointException('save failed', {0: (OSError(28, 'No space left on device'), None)})
    with pytest.raises(OSError, match='No space left on device'):
        checkpoints.unwrapped(full_disk)


def test_an_fsdp_checkpoint_fine_tunes_without_fsdp_exports_and_loads(sharded, tmp_path, capsys):
    import timm  # noqa: F401 (the printed command uses it)
    write_classes(tmp_path / 'data' / 'train', 2)
    write_classes(tmp_path / 'data' / 'val', 1)
    pre = str(sharded / 'fsdp' / 'checkpoint.pth')
    finetune.main(finetune.get_args_parser().parse_args([
        '--pretrained', pre, '--data-path', str(tmp_path / 'data'), '--batch-size', '2', '--epochs', '1',
        '--num-workers', '0', '--amp', 'off', '--aa', '', '--mixup', '0', '--cutmix', '0', '--output',
        str(tmp_path / 'ft')]))
    assert 'checkpoint.pth: 100 tensors loaded' in capsys.readouterr().out
    finetune.main(finetune.get_args_parser().parse_args(['--pretrained', pre, '--img-size', '64', '--export',
                                                         str(tmp_path / 'enc')]))
    exported = eval(capsys.readouterr().out.split('in timm: ')[1].strip()).eval()
    simmim = checkpoints.load_model(pre)  # the consolidated weights: the SimMIM model
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = models.extract_features(simmim, x)[0]
        torch.testing.assert_close(exported.forward_head(exported.forward_features(x), pre_logits=True), pooled)


def resave_worker(rank, port, folder, results):
    os.environ.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo')
    try:  # epoch 1 step 4 saved twice, as by a run resumed from an earlier checkpoint into its own output
        for value, copies in ((1., ['ckpt_epoch_1.pth']), (2., [])):
            checkpoints.save_sharded(folder, dict(model={'w': torch.full((4,), value)}, optimizer={}, epoch=1, step=4),
                                     copies)
        for name in ('ckpt_epoch_1.pth', 'checkpoint.pth'):
            path = os.path.join(folder, name)
            sharded = checkpoints.manifest_of(path)['sharded']
            checkpoints.verify_shards(path, sharded)  # Corrupt if its folder was written over
            results[name] = checkpoints.gather_weights(checkpoints.shard_folder(path, sharded))['w'].tolist()
    finally:
        torch.distributed.destroy_process_group()


def test_a_sharded_save_never_writes_a_folder_another_checkpoint_names(tmp_path):
    results = torch.multiprocessing.Manager().dict()
    port = 29500 + (os.getpid() + 500) % 1000
    torch.multiprocessing.spawn(resave_worker, args=(port, str(tmp_path), results), nprocs=1)
    assert dict(results) == {'ckpt_epoch_1.pth': [1.] * 4, 'checkpoint.pth': [2.] * 4}  # it deleted and rewrote it


def reshard_worker(rank, port, folder, results):
    os.environ.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    args = pretrain.get_args_parser().parse_args(SHARDED + ['--fsdp', '--output', folder])
    run = engine.Run(args)
    try:
        ckpt = checkpoints.find_resume(folder, None, say=lambda *_: None)
        config, recipe, _, _ = pretrain.settings(args, run, resume=False)
        model = models.build_simmim(config, drop_path_rate=0.)
        names = [n for n, _ in model.named_parameters()]
        groups = [(g['weight_decay'], g['lr_scale'], len(g['params'])) for g in models.param_groups(model, 0.05)]
        trainer = engine.Trainer(model, engine.Schedule(recipe, 8), recipe, args, run)
        trainer.load_state_dict(ckpt)  # saved by 2 processes, loaded by 1
        whole = checkpoints.gather_weights(checkpoints.shard_folder(ckpt.path, ckpt.saved['sharded']))
        loaded = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
        sharded_groups = [(g['weight_decay'], g['lr_scale'], len(g['params'])) for g in trainer.optimizer.param_groups]
        results['gap'] = largest_gap(loaded, whole)
        results['names'] = names == list(loaded)
        results['groups'] = groups == sharded_groups
        results['steps'] = {int(s['step']) for s in trainer.optimizer.state_dict()['state'].values()}
    finally:
        run.close()


def test_fsdp_fine_tuning_validates_when_the_ranks_have_unequal_batches(sharded, tmp_path):
    # 3 validation images in batches of 1: rank 0 gets 2, rank 1 one; a sharded forward needs every rank (it hung)
    write_classes(tmp_path / 'data' / 'train', 2)
    write_classes(tmp_path / 'data' / 'val', 1)
    shutil.copy(tmp_path / 'data' / 'val' / 'red' / '0.png', tmp_path / 'data' / 'val' / 'red' / '1.png')
    result = subprocess.run(torchrun('finetune.py', '--fsdp', '--pretrained', str(sharded / 'fsdp' / 'checkpoint.pth'),
                                     '--data-path', str(tmp_path / 'data'), '--batch-size', '1', '--epochs', '1',
                                     '--num-workers', '0', '--amp', 'off', '--aa', '', '--mixup', '0', '--cutmix', '0',
                                     '--dist-timeout', '0.5', '--output', str(tmp_path / 'ft')),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert re.search(r'epoch 0 validation: top-1 .* on 3 images', result.stdout)


def test_an_fsdp_checkpoint_reshards_to_another_world_size_and_keeps_names_and_groups(sharded):
    results = torch.multiprocessing.Manager().dict()
    port = 29500 + (os.getpid() + 700) % 1000
    torch.multiprocessing.spawn(reshard_worker, args=(port, str(sharded / 'fsdp'), results), nprocs=1)
    assert dict(results) == dict(gap=0.0, names=True, groups=True, steps={8})


def test_swinv2_huge_and_giant_have_the_papers_parameter_counts():
    for name, paper in (('swinv2_huge', 658e6), ('swinv2_giant', 3.0e9)):
        with torch.device('meta'):
            model = models.build_classifier(name, num_classes=1000)
        count = sum(p.numel() for p in model.parameters())
        assert abs(count / paper - 1) < 0.01, (name, count)
        norms = [n for n, _ in model.named_parameters() if '.norm3.' in n]  # every 6th block of a stage
        assert norms[:2] == ['layers.2.blocks.5.norm3.weight', 'layers.2.blocks.5.norm3.bias']
        assert len(norms) == (6 if name == 'swinv2_huge' else 14)
