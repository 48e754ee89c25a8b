"""SimMIM data: the mask generator, transforms, an image-folder dataset that survives bad files,
and the loader. Bad input is a ValueError."""
import atexit
import contextlib
import io
import itertools
import math
import os
import random
import signal
import sys
import typing
import warnings
import weakref

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageOps
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff', '.npy')
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # a bad image file's


class MaskGenerator:
    """Random SimMIM mask on the model's patch grid (1 = masked).

    The image is cut into (input_size / mask_patch_size)^2 cells; ceil(cells * mask_ratio) of them,
    chosen uniformly at random, are masked, each repeated to cover mask_patch_size /
    model_patch_size model patches. Swin at 192px: 22 of 36 cells, a 48x48 mask; ViT at 224px: 30
    of 49 cells, a 14x14 mask.
    """

    def __init__(self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6):
        if input_size % mask_patch_size or mask_patch_size % model_patch_size:
            raise ValueError(f"the mask patch size {mask_patch_size} must divide the image size "
                             f"{input_size} and be a multiple of the model's patch size "
                             f"{model_patch_size}")
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio}")
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.mask_count = math.ceil(self.rand_size ** 2 * mask_ratio)

    def __call__(self):
        """-> int64 (input_size / model_patch_size,) * 2, drawn from torch's global generator."""
        mask = torch.zeros(self.rand_size ** 2, dtype=torch.int64)
        mask[torch.randperm(self.rand_size ** 2)[:self.mask_count]] = 1
        mask = mask.view(self.rand_size, self.rand_size)
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)


class ToNormalizedTensor:
    """8-bit PIL image -> float tensor (C, H, W) = (pixels / 255 - mean) / std: torchvision's
    ToTensor and Normalize in one pass. A float tensor of 0-1 pixels (load_image's for deeper
    data) -> (pixels - mean) / std."""

    def __init__(self, mean, std):
        if mean is None or std is None:
            raise ValueError("images of other than 1 or 3 channels need a mean and a std for each "
                             "channel: give --mean and --std (pretrain.py --stats computes them)")
        self.mean, self.std = list(mean), list(std)
        std = torch.tensor(self.std).view(-1, 1, 1)
        self.scale, self.shift = 1 / (255 * std), -torch.tensor(self.mean).view(-1, 1, 1) / std

    def __call__(self, img):
        if isinstance(img, torch.Tensor):
            return torch.addcmul(self.shift, img, self.scale * 255)
        return torch.addcmul(self.shift, T.functional.pil_to_tensor(img), self.scale)


class PretrainTransform:
    """image -> (normalised tensor, mask): RandomResizedCrop (area scale-1, bilinear), horizontal
    flip, the mask. The official values: scale 0.67, flip probability 0.5."""

    def __init__(self, img_size, mask_generator, normalize, scale=0.67, hflip=0.5):
        self.transform = T.Compose([
            T.RandomResizedCrop(img_size, scale=(scale, 1.), ratio=(3. / 4., 4. / 3.),
                                interpolation=T.InterpolationMode.BILINEAR),
            T.RandomHorizontalFlip(hflip),
            normalize,
        ])
        self.mask_generator = mask_generator

    def __call__(self, img):
        if isinstance(img, EncodedJpeg):  # the same draws; the crop is DeviceDecoder's
            crop, flip = self.transform.transforms[:2]
            shape = torch.empty((3, img.size[1], img.size[0]), device='meta')
            box = crop.get_params(shape, crop.scale, crop.ratio)
            flipped = bool(torch.rand(1) < flip.p)
            crop = JpegCrop(img.data, tuple(box), flipped, img.path, img.size[::-1])
            return crop, self.mask_generator()
        return self.transform(img), self.mask_generator()


class EncodedJpeg(typing.NamedTuple):
    """An 8-bit RGB JPEG file not yet decoded (read_jpeg's)."""
    data: torch.Tensor  # the file's bytes, uint8
    size: tuple  # (width, height)
    path: str


class JpegCrop(typing.NamedTuple):
    """An encoded JPEG and the crop and flip PretrainTransform drew for it (DeviceDecoder's)."""
    data: torch.Tensor  # None in a JpegBatch, which holds the bytes
    box: tuple  # (top, left, height, width)
    flip: bool
    path: str
    shape: tuple  # (height, width) by its header


class JpegBatch(typing.NamedTuple):
    """collate_crops' images, each kind in one tensor (a tensor from a loader worker is an open
    file in the training process, and the open files are limited): the JPEG files end to end
    (the n-th crop's bytes: files[ends[n - 1]:ends[n]]), the other images stacked."""
    files: torch.Tensor
    ends: list
    crops: list  # JpegCrops without their data, in batch order
    at: list  # their places in the batch
    others: torch.Tensor  # the images the workers transformed, in batch order

    def pin_memory(self):  # the loader's: nvJPEG copies the files into its own pinned buffers
        return self._replace(others=self.others.pin_memory())


def read_jpeg(path):
    """-> EncodedJpeg of an 8-bit RGB JPEG that needs no turning (EXIF) and ends whole, from its
    header alone; None for any other file (load_image's). Grey and CMYK JPEGs are the others."""
    with open(path, 'rb') as f:
        raw = f.read()
    if not raw.startswith(b'\xff\xd8') or not raw.endswith(b'\xff\xd9'):
        return None  # not a JPEG, or one cut short: PIL says which
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != 'JPEG' or img.mode != 'RGB' or img.getexif().get(0x0112, 1) != 1:
                return None
            size = img.size
    except UNREADABLE:
        return None  # load_image names the problem
    return EncodedJpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), size, str(path))


def collate_crops(samples):
    """default_collate of pretraining samples, but the images become a JpegBatch: JpegCrops for
    DeviceDecoder and the other images transformed by the workers."""
    (_, masks), labels, skipped = default_collate([((0, m), y, s) for (_, m), y, s in samples])
    images = [image for (image, _), _, _ in samples]
    at = [i for i, image in enumerate(images) if isinstance(image, JpegCrop)]
    files = [images[i].data for i in at]
    others = [image for image in images if not isinstance(image, JpegCrop)]
    batch = JpegBatch(torch.cat(files) if files else torch.empty(0, dtype=torch.uint8),
                      np.cumsum([len(f) for f in files]).tolist(),
                      [images[i]._replace(data=None) for i in at], at,
                      torch.stack(others) if others else torch.empty(0))
    return (batch, masks), labels, skipped


class DeviceDecoder:
    """A JpegBatch (collate_crops') -> (B, C, H, W) on device, normalised. Its JpegCrops are
    decoded there by torchvision (nvJPEG on a GPU, libjpeg-turbo on a CPU, as PIL), cropped,
    resized (bilinear, antialiased: PIL's filter), rounded to 8 bits, flipped and normalised, so
    the loader's workers only read the files; the other images come transformed by the workers.
    A JPEG the decoder refuses is read by PIL, else skipped with a warning and replaced by another
    image of the batch (of an earlier batch if it has none)."""

    def __init__(self, img_size, normalize, device):
        try:  # deprecated in torchvision 0.29 for TorchCodec's
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:
            raise ValueError("--decode device needs torchvision's decode_jpeg, gone from this "
                             "torchvision: use --decode workers") from None
        self.size, self.device = [img_size, img_size], torch.device(device)
        self.decode_jpeg = lambda data: decode_jpeg(data, ImageReadMode.RGB, self.device)
        probe = io.BytesIO()
        Image.new('RGB', (8, 8)).save(probe, 'JPEG')
        try:  # a torchvision built without nvJPEG would leave every image to PIL, slowly
            self.decode_jpeg(torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8))
        except RuntimeError as e:
            raise ValueError(f"torchvision cannot decode JPEGs on {self.device} here "
                             f"({str(e).splitlines()[0]}): use --decode workers") from None
        self.spare = None  # an image of an earlier batch, for a batch none of which is readable
        std = torch.tensor(normalize.std, device=self.device).view(1, -1, 1, 1)
        self.scale = 1 / (255 * std)
        self.shift = -torch.tensor(normalize.mean, device=self.device).view(1, -1, 1, 1) / std

    def __call__(self, batch, skipped):
        """-> the batch's images; skipped (the collated counts) counts the replaced ones too."""
        others = batch.others.to(self.device, non_blocking=True)
        if not batch.crops:
            return others
        files = torch.tensor_split(batch.files, batch.ends[:-1])
        decoded = self.decode([c._replace(data=f) for c, f in zip(batch.crops, files)])
        pixels = [None if x is None else self.crop(x, c) for c, x in zip(batch.crops, decoded)]
        if any(x is not None for x in pixels):
            read = torch.cat([x for x in pixels if x is not None]).round_().clamp_(0, 255)
            read = iter(torch.addcmul(self.shift, read, self.scale))
            pixels = [None if x is None else next(read) for x in pixels]
        rows, others, crops, at = [], iter(others), iter(pixels), set(batch.at)
        for i in range(len(pixels) + len(batch.others)):
            rows.append(next(crops) if i in at else next(others))
        return torch.stack(self.replace_unreadable(rows, batch, skipped))

    def replace_unreadable(self, rows, batch, skipped):
        """rows, the unreadable ones (None) replaced by the batch's first image, else by the
        first image of an earlier batch (a batch of one), and counted in skipped."""
        readable = [x for x in rows if x is not None]
        if not readable and self.spare is None:
            raise ValueError(f"none of the images of a batch could be read, and no earlier batch "
                             f"has one to stand in (e.g. {batch.crops[0].path})")
        substitute = readable[0] if readable else self.spare
        self.spare = substitute.clone()
        if len(readable) == len(rows):
            return rows
        skipped += torch.tensor([x is None for x in rows])
        return [substitute if x is None else x for x in rows]

    def decode(self, crops):
        """-> the JpegCrops' images (3, H, W) uint8 on the device, None for unreadable ones. One
        the decoder refuses, or decodes to another size than its header's (damaged), PIL reads."""
        try:
            images = self.decode_jpeg([c.data for c in crops])
        except RuntimeError:  # one of them: which
            images = []
            for c in crops:
                try:
                    images.append(self.decode_jpeg(c.data))
                except RuntimeError:
                    images.append(None)
        return [x if x is not None and tuple(x.shape[1:]) == c.shape else self.read(c)
                for x, c in zip(images, crops)]

    def read(self, crop):
        """The JpegCrop's image read by PIL (the workers' decoder), or None with a warning."""
        try:
            with Image.open(io.BytesIO(crop.data.numpy().tobytes())) as img:
                return T.functional.pil_to_tensor(img.convert('RGB')).to(self.device)
        except UNREADABLE as e:
            warnings.warn(f"skipping unreadable image {crop.path}: {e}")

    def crop(self, image, crop):
        """The crop's box of image, resized and flipped: (1, 3, size, size) float 0-255 pixels."""
        top, left, height, width = crop.box
        box = image[None, :, top:top + height, left:left + width].float()
        box = torch.nn.functional.interpolate(box, self.size, mode='bilinear', antialias=True)
        return box.flip(-1) if crop.flip else box


def batch_to_device(dataset, img_size, normalize, device):
    """-> f(images, skipped): a loader batch's images on device, a DeviceDecoder for an encoded
    dataset's (which counts the JPEGs it replaces in skipped), else copied."""
    if dataset.encoded:
        return DeviceDecoder(img_size, normalize, device)
    return lambda images, _: images.to(device, non_blocking=True)


def eval_transform(img_size, normalize, crop_pct=224 / 256):
    """Resize the short side to int(img_size / crop_pct) (bicubic), center crop, normalise."""
    return T.Compose([
        T.Resize(int(img_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        normalize,
    ])


def finetune_transform(img_size, normalize, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25,
                       scale=0.08, hflip=0.5, color_jitter=0.4):
    """timm's training transform as the official fine-tuning uses it: RandomResizedCrop (bicubic,
    area scale-1), flip, RandAugment (or without it color jitter), normalisation, random erasing
    (pixel mode, one box). Its ToTensor + Normalize become normalize, which takes load_image's
    tensors too; RandAugment gets deeper images rounded to 8 bits, color jitter 1 or 3 channels.
    An unknown policy is a ValueError."""
    try:
        transform = create_transform(
            img_size, is_training=True, scale=(scale, 1.0), hflip=hflip, re_count=1,
            auto_augment=auto_augment or None, interpolation='bicubic', re_prob=re_prob,
            re_mode='pixel', mean=normalize.mean, std=normalize.std,
            color_jitter=color_jitter or None)
    except AssertionError:  # timm's answer to an unknown policy
        raise ValueError(f"--aa '{auto_augment}' is no timm augmentation policy: use e.g. "
                         f"rand-m9-mstd0.5-inc1 (the official), or '' for none") from None
    steps = [to_8_bit] if auto_augment else []
    for t in transform.transforms:
        for op in getattr(t, 'ops', []):  # RandAugment's; posterize that any Pillow takes
            if op.name.startswith('Posterize'):
                op.aug_fn = posterize
        if isinstance(t, T.Normalize):
            steps.append(normalize)
        elif isinstance(t, T.ColorJitter) and len(normalize.mean) not in (1, 3):
            warnings.warn(f"color jitter changes 1 or 3 channels, not {len(normalize.mean)}: "
                          f"left out (--color-jitter 0 says so)")
        elif not isinstance(t, T.ToTensor):
            steps.append(t)
    return T.Compose(steps)


def to_8_bit(img):
    """A deeper image (load_image's float tensor, 1 or 3 channels) as an 8-bit PIL image."""
    if not isinstance(img, torch.Tensor):
        return img
    warnings.warn("images of more than 8 bits are rounded to 8 bits for RandAugment, which takes "
                  "8-bit images only; train without RandAugment to keep their precision")
    return T.functional.to_pil_image(img.mul(255).round().to(torch.uint8))


def posterize(img, bits_to_keep, **_):
    """timm's posterize for RandAugment. At the top magnitude it keeps 0 bits: Pillow 13 refuses
    that, earlier Pillow (the official recipe's) made the image black, as this does."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def load_image(path, in_chans=3, intensity='type'):
    """Open an image for a model of in_chans channels.

    8-bit images come as PIL images, 'RGB' for 3 channels or 'L' for 1: EXIF orientation applied,
    transparency on white. Images of more bits (16-bit PNG or TIFF, float TIFF) and .npy arrays
    (H x W or H x W x C) come as float tensors (in_chans, H, W) of 0-1 pixels, with their
    precision, by the intensity rule: 'type': integers as a fraction of their type's range
    (0-65535 for 16 bits), floats from their own min-max; 'image': each image's own min-max;
    'percentile': each image's 0.5-99.5 percentiles; a number: the value that becomes white (4095
    for 12-bit data in 16-bit files). Values outside are clipped, NaN becomes black. One channel
    is repeated for 3-channel models, RGB turned grey for 1-channel models.
    """
    if str(path).lower().endswith('.npy'):
        pixels, type_max = np.load(path, allow_pickle=False), None
    else:
        img = open_image(path)
        if not img.mode.startswith(('I', 'F')):  # 8 bits per channel
            return eight_bit(img, path, in_chans)
        sixteen = img.mode.startswith('I;16') or img.format == 'PNG'  # older Pillow: 'I'
        pixels = np.asarray(img)
        type_max = 65535 if sixteen else None  # else the array type's: 32-bit TIFF
    if pixels.dtype.kind in 'ui':
        type_max = type_max or np.iinfo(pixels.dtype).max
    elif pixels.dtype.kind != 'f':
        raise ValueError(f"{path}: an array of {pixels.dtype}, not of numbers")
    pixels = pixels.astype(np.float32)
    if pixels.ndim not in (2, 3) or not pixels.size:
        raise ValueError(f"{path}: not an image (H x W or H x W x C)")
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if len(pixels) != in_chans and (len(pixels), in_chans) not in ((1, 3), (3, 1)):
        raise ValueError(f"{path} has {len(pixels)} channels, the model takes {in_chans} "
                         f"(--in-chans)")
    pixels = torch.from_numpy(to_unit_range(pixels, intensity, type_max, path))
    if len(pixels) == 1 and in_chans == 3:
        return pixels.expand(3, -1, -1).clone()
    if len(pixels) == 3 and in_chans == 1:  # as PIL's 'L'
        return torch.tensordot(torch.tensor([0.299, 0.587, 0.114]), pixels, 1)[None]
    return pixels


def open_image(path):
    """A PIL image, loaded whole (a truncated file fails here), turned upright by its EXIF tag."""
    with Image.open(path) as img:
        img.load()
    if img.getexif().get(0x0112, 1) != 1:  # exif_transpose would copy even an upright image
        img = ImageOps.exif_transpose(img)
    return img


def eight_bit(img, path, in_chans):
    """An 8-bit PIL image as 'L' (1 channel) or 'RGB' (3), transparency on white."""
    if in_chans not in (1, 3):
        raise ValueError(f"{path}: image files give 1 or 3 channels, not {in_chans}; store "
                         f"{in_chans}-channel data as .npy arrays (H x W x {in_chans})")
    if img.mode in ('RGBA', 'LA', 'PA') or 'transparency' in img.info:
        img = img.convert('RGBA')
        white = Image.new('RGBA', img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    mode = 'L' if in_chans == 1 else 'RGB'
    return img if img.mode == mode else img.convert(mode)


def to_unit_range(pixels, intensity, type_max, path):
    """float32 pixels (C, H, W) -> 0-1 by load_image's intensity rule."""
    finite = pixels[np.isfinite(pixels)]
    if intensity not in ('type', 'image', 'percentile'):
        low, high = 0., float(intensity)
    elif intensity == 'type' and type_max:
        low, high = 0., float(type_max)
    elif not finite.size:  # all NaN
        low, high = 0., 1.
    elif intensity == 'percentile':
        low, high = np.percentile(finite, (0.5, 99.5))
    else:  # 'image', and floats under 'type'
        low, high = finite.min(), finite.max()
    dim = intensity == 'type' and type_max and finite.size and finite.max() < type_max / 16
    if dim and not _warned:
        _warned.append(path)
        warnings.warn(f"{path}: its pixels reach {finite.max():.0f} of {type_max} (12-bit data in "
                      f"16-bit files?), so it reads nearly black with the 'type' intensity rule; "
                      f"give --intensity the data's maximum, 'image' or 'percentile'")
    pixels = np.clip(np.nan_to_num(pixels, nan=low), low, high)
    return np.ascontiguousarray((pixels - low) / max(high - low, 1e-12), dtype=np.float32)


_warned = []  # load_image warns once per process of data using a small part of its type's range


def find_images(root):
    """All image files under root, recursively, sorted; labels from the first-level folders when
    every image is in one (ImageNet layout), else -1. -> (samples [(path, label)], class names).

    Links are followed, each real folder read once (a link back up the tree is skipped with a
    warning); hidden files and folders and anything that is not a regular file (a FIFO, a socket)
    are left out; unreadable folders are skipped with a warning. Large trees report progress."""
    if not os.path.isdir(root):
        raise ValueError(f"data path '{root}' is not a folder; point the data path at a folder "
                         f"of images")
    paths = scan(root)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under '{root}'")
    tops = [os.path.relpath(p, root).split(os.sep)[0] for p in paths]
    if any(t == os.path.relpath(p, root) for t, p in zip(tops, paths)):  # an image in root
        return [(p, -1) for p in paths], []
    classes = sorted(set(tops))
    index = {c: i for i, c in enumerate(classes)}
    return [(p, index[t]) for p, t in zip(paths, tops)], classes


def scan(root):
    """find_images' search: the sorted paths of the image files under root."""
    paths, seen, folders = [], set(), [root]
    while folders:
        folder = folders.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                warnings.warn(f"skipping {folder}: it leads back to a folder already scanned (a "
                              f"link cycle or a second link to the same folder)")
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = list(os.scandir(folder))
        except OSError as e:
            warnings.warn(f"skipping folder {folder}: {e.strerror}")
            continue
        for entry in entries:
            try:
                if entry.name.startswith('.'):
                    continue
                if entry.is_dir():
                    folders.append(entry.path)
                elif entry.name.lower().endswith(IMG_EXTENSIONS) and entry.is_file():
                    paths.append(entry.path)
                    if len(paths) % 100_000 == 0 and os.environ.get('RANK', '0') == '0':
                        print(f"scanning {root}: {len(paths):,} images so far", file=sys.stderr,
                              flush=True)
            except OSError:  # a broken link, or a file removed meanwhile
                continue
    return sorted(paths)


def image_files(paths):
    """The image files named by paths, in order: files as they are, folders as find_images."""
    files = []
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"'{path}' does not exist")
        if os.path.isdir(path):
            files += [p for p, _ in find_images(path)[0]]
        elif os.path.isfile(path):
            files.append(str(path))
        else:  # a FIFO or a device would block the read
            raise ValueError(f"'{path}' is neither a file nor a folder; give image files or "
                             f"folders")
    return files


class ImageDataset(Dataset):
    """Images under a folder (recursively) -> (transform(image), label, skipped), read by
    load_image. A file that cannot be read is skipped with a warning naming it and the next one
    used instead; `skipped` counts them for the training log. An index may come as (index, seed)
    from SeededSampler: the transform then runs under that seed (see seeded), so augmentations
    and masks depend on neither workers nor restarts. classes: the names the labels index (e.g.
    val/ labelled with train/'s classes). encoded: 8-bit RGB JPEGs are only read, not decoded
    (read_jpeg; PretrainTransform draws their crop, DeviceDecoder makes it)."""

    def __init__(self, root, transform, in_chans=3, classes=None, intensity='type',
                 encoded=False):
        self.root, self.intensity = root, intensity
        self.encoded = encoded and in_chans == 3  # JPEGs read, not decoded (DeviceDecoder)
        samples, self.classes = find_images(root)
        files = [p for p, _ in samples if not p.lower().endswith('.npy')]
        if in_chans not in (1, 3) and files:
            raise ValueError(f"'{root}' holds image files (e.g. {files[0]}), which give 1 or 3 "
                             f"channels, not {in_chans}; store {in_chans}-channel data as .npy "
                             f"arrays (H x W x {in_chans})")
        if classes is not None:
            samples = self.relabel(samples, classes)
        # Paths in one byte array, not a list of str: loader workers touching a list's reference
        # counts would each end up with a private copy (hundreds of MB per worker on ImageNet).
        paths = [os.fsencode(p) for p, _ in samples]
        self.paths = np.frombuffer(b''.join(paths), dtype=np.uint8)
        self.ends = np.cumsum([len(p) for p in paths])
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.transform = transform
        self.in_chans = in_chans

    def relabel(self, samples, classes):
        """samples labelled by their folder's index in classes."""
        stray = [p for p, _ in samples if os.sep not in os.path.relpath(p, self.root)]
        if stray:
            raise ValueError(f"'{self.root}' has images outside the class folders (e.g. "
                             f"{stray[0]}): put each in the folder of its class")
        unknown = sorted(set(self.classes) - set(classes))
        if unknown:
            shown = ', '.join(classes[:5]) + ', ...' * (len(classes) > 5)
            raise ValueError(f"'{self.root}' has class folders that are not among the "
                             f"{len(classes)} classes of the model ({shown}): "
                             f"{', '.join(unknown[:5])}")
        index = {c: i for i, c in enumerate(classes)}
        found, self.classes = self.classes, list(classes)
        return [(p, index[found[label]]) for p, label in samples]

    def __len__(self):
        return len(self.labels)

    def sample(self, index):
        """-> (path, label) of image index."""
        start = self.ends[index - 1] if index else 0
        path = os.fsdecode(self.paths[start:self.ends[index]].tobytes())
        return path, int(self.labels[index])

    def load(self, index, encoded=False):
        """-> (image, label, skipped): the image at index, or the next readable one; with
        encoded, an 8-bit RGB JPEG as read_jpeg's EncodedJpeg."""
        for skipped in range(len(self)):
            path, label = self.sample((index + skipped) % len(self))
            try:
                jpeg = encoded and not path.lower().endswith('.npy') and read_jpeg(path)
                image = jpeg or load_image(path, self.in_chans, self.intensity)
                return image, label, skipped
            except UNREADABLE as e:
                warnings.warn(f"skipping unreadable image {path}: {e}")
                last = e
        raise ValueError(f"none of the {len(self)} image files under '{self.root}' could be read "
                         f"(the last: {last})")

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        img, label, skipped = self.load(index, self.encoded)
        if seed is None:
            return self.transform(img), label, skipped
        with seeded(seed):
            return self.transform(img), label, skipped


def folder_stats(dataset, max_images=1000):
    """Per-channel mean and std of the 0-1 pixels of up to max_images images spread over dataset
    (unreadable ones left out): the normalisation to mean 0 and std 1.
    -> (mean list, std list, images used)."""
    count = min(max_images, len(dataset))
    index = np.linspace(0, len(dataset) - 1, count).round().astype(int)
    total = squares = pixels_seen = used = 0
    for i in sorted(set(index.tolist())):
        path = dataset.sample(i)[0]
        try:
            img = load_image(path, dataset.in_chans, dataset.intensity)
        except UNREADABLE as e:
            warnings.warn(f"skipping unreadable image {path}: {e}")
            continue
        used += 1
        if not isinstance(img, torch.Tensor):
            img = T.functional.pil_to_tensor(img).double() / 255
        pixels = img.double().flatten(1)
        total = total + pixels.sum(1)
        squares = squares + pixels.square().sum(1)
        pixels_seen += pixels.shape[1]
    if not used:
        raise ValueError(f"none of the {count} image files tried under '{dataset.root}' could be "
                         f"read")
    mean = total / pixels_seen
    std = (squares / pixels_seen - mean.square()).clamp(min=0).sqrt()
    return mean.tolist(), std.tolist(), used


@contextlib.contextmanager
def seeded(seed):
    """Run under seed in the global generators the transforms draw from: torch's CPU one
    (torchvision, the mask), Python's and numpy's (timm's crop, RandAugment and erasing); they are
    restored afterwards. torch.manual_seed would also queue GPU seeding, for every image."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


class SeededSampler(DistributedSampler):
    """DistributedSampler (also for one process) that hands each index out with a seed derived
    from (seed, epoch, index): the order and every sample's augmentation are a function of the
    epoch alone. set_epoch(epoch, skip) starts after the first `skip` indices (a resumed epoch)."""
    skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        for index in itertools.islice(super().__iter__(), self.skip, None):
            yield index, hash((self.seed, self.epoch, index)) & 0xFFFF_FFFF_FFFF


def build_loader(dataset, batch_size, num_workers, seed, world_size=1, rank=0, train=True):
    """Training: shuffled per epoch (loader.sampler.set_epoch), the incomplete last batch dropped.
    Evaluation: in order, rank r takes images r, r + world_size, ...: each once over all ranks."""
    if train:
        sampler = SeededSampler(dataset, world_size, rank, shuffle=True, seed=seed)
    else:
        sampler = range(rank, len(dataset), world_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                        num_workers=num_workers, persistent_workers=num_workers > 0,
                        pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_sigterm,
                        collate_fn=collate_crops if getattr(dataset, 'encoded', False) else None)
    if num_workers:
        atexit.register(end_workers, weakref.ref(loader))  # runs before multiprocessing's own
    return loader


def ignore_sigterm(worker_id):
    """Loader workers leave SIGTERM to the training process. Schedulers signal every process of a
    job: a worker that died of it would end the run with a traceback before the training process
    saved its checkpoint. The workers still end with the run: the loader stops them, or they see
    their parent gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def end_workers(loader):
    """At exit, SIGKILL the workers of a loader that is still alive (loader: a weak reference).
    Python ends daemonic children with SIGTERM and waits for them; loader workers ignore SIGTERM,
    so a process leaving past a live loader (an error, Ctrl-C) would wait forever."""
    iterator = getattr(loader(), '_iterator', None)
    workers = [w for w in getattr(iterator, '_workers', []) if w.is_alive()]
    if workers:  # the loader's SIGCHLD handler would report their deaths as errors
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
