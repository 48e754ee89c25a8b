"""SimMIM pretraining.

    python pretrain.py --model swin_tiny --epochs 50     # the bundled demo images, one process
    torchrun --nproc_per_node 8 pretrain.py --model swin_base --data-path /data/imagenet/train

Defaults are the paper's Swin-B recipe (RECIPE): 192px, window 6, 100 epochs, lr 2e-4 per 512
images. The run machinery (distributed run, AMP step, the loop, resume) is engine.py's, shared
with finetune.py; checkpoint files are checkpoints.py's.
"""
import contextlib
import dataclasses
import itertools
import os

import torch
import torchvision

import checkpoints
import data
import engine
import models

DEMO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo')
# The paper's Swin-B recipe: the defaults of the flags that set what a run trains
RECIPE = dict(epochs=100, warmup_epochs=10, base_lr=2e-4, warmup_lr=1e-6, min_lr=1e-5,
              **engine.OPTIMIZATION, mask_patch_size=32, mask_ratio=0.6, scale=0.67, hflip=0.5,
              data_path=DEMO_DATA, pretrained=None)
# What continued pretraining, a resumed run and --reconstruct take from the checkpoint if not given
KEPT = models.SHAPE + ('mean', 'std', 'intensity', 'norm_target_window')


def get_args_parser():
    p = engine.Parser('SimMIM pretraining', RECIPE, 'output/simmim_pretrain', compile='auto')
    p.model.add_argument('--pretrained',
                         help='continue pretraining from (or --reconstruct with) these weights: a '
                              'file of any supported layout, a Hugging Face folder or model id '
                              '(owner/name[@revision]) or a published name (README); the decoder '
                              'too if present')
    p.model.add_argument('--norm-target-window', type=engine.number('[0, inf)', int),
                         help="regress pixels normalised over this odd window (SwinV2 configs: "
                              "47); 0 = raw pixels (default: the checkpoint's, else 0)")
    g = p.add_argument_group('masking')
    g.add_argument('--mask-patch-size', type=engine.number('[1, inf)', int),
                   help="side of a masked square, pixels (the checkpoint's if any)")
    g.add_argument('--mask-ratio', type=engine.number('(0, 1)'), help='fraction masked')
    p.data.add_argument('--data-path', help='folder of images, searched recursively (labels '
                                            'unused); default: the bundled demo/ images')
    p.data.add_argument('--scale', type=engine.number('(0, 1]'),
                        help='RandomResizedCrop: smallest crop, a fraction of the area')
    p.data.add_argument('--hflip', type=engine.number('[0, 1]'),
                        help='horizontal flip probability (0 where sides differ: X-rays, text)')
    p.data.add_argument('--decode', choices=['workers', 'device'], default='workers',
                        help="where RGB JPEGs are decoded and cropped: by the loader's workers "
                             "(PIL), or on the training device (nvJPEG on a GPU; the workers "
                             "only read the files); pixels within 1 of 255 of the workers' on a "
                             "CPU (README)")
    p.data.add_argument('--stats', action='store_true',
                        help='print the --mean and --std of the data (up to 1000 images spread '
                             'over it) and exit')
    p.data.add_argument('--reconstruct', nargs='+', metavar='IMG',
                        help='draw the reconstructions of these images (files or folders) by the '
                             '--pretrained model into OUTPUT/reconstruction_N.png (8 a picture; '
                             'the mask: --mask-ratio, --seed) and exit')
    return p


def main(args):
    body = stats if args.stats else reconstruct if args.reconstruct else pretrain
    engine.launch(body, args)


def settings(args, run, resume=True):
    """The run's settings, decided once: the flags given, else a resumed run's (if resume) or
    --pretrained's, else the recipe's. -> (model config, recipe, resumed, source checkpoint)."""
    resumed = None
    if resume:
        resumed = checkpoints.find_resume(args.output, args.resume, args.auto_resume,
                                          allow_pickle=args.allow_pickle, say=run.print)
    if resumed and resumed.kind != 'pretrain':
        fix = "start from its weights with --pretrained" if args.resume else \
            "give another --output (or --no-auto-resume)"
        raise ValueError(f"'{resumed.path}' is no pretrain.py checkpoint, so pretraining cannot "
                         f"resume from it; {fix}")
    source = resumed
    if args.pretrained and not resumed:
        source = checkpoints.read(args.pretrained, args.allow_pickle)
    inherited = resumed.recipe if resumed else {}  # a resumed run: all it is not given
    if source and not resumed:  # continued pretraining: its mask squares
        inherited = {'mask_patch_size': source.recipe.get('mask_patch_size')}
    recipe = engine.recipe(args, run, RECIPE, inherited)
    given = {k: getattr(args, k, None) for k in models.FIELDS}
    if resumed:
        saved = dict(resumed.recipe, **resumed.config)
        engine.check_changes(run, resumed.path, saved, dict(recipe, **given), args.accept_changes)
    fields = models.inherit(source.config, given, KEPT) if source else given
    config = models.model_config(pretrain=True, **fields)
    if recipe['drop_path'] is None:  # the official
        recipe['drop_path'] = models.MODELS[config.model]['drop_path'][0]
    return config, recipe, resumed, source


def pretrain(args, run):
    config, recipe, resumed, source = settings(args, run)
    torch.manual_seed(recipe['seed'] + run.rank)
    model = models.build_simmim(config, drop_path_rate=recipe['drop_path'],
                                 use_checkpoint=args.use_checkpoint)
    if source and not resumed:
        run.print(source.load_into(model))
    mask_generator = masking(config, recipe, run)
    normalize = data.ToNormalizedTensor(config.mean, config.std)
    transform = data.PretrainTransform(config.img_size, mask_generator, normalize,
                                       recipe['scale'], recipe['hflip'])
    if recipe['data_path'] == DEMO_DATA:
        run.print(f"no --data-path given: pretraining on the bundled demo images in {DEMO_DATA}")
    dataset = data.ImageDataset(recipe['data_path'], transform, config.in_chans,
                                intensity=config.intensity, encoded=args.decode == 'device')
    dataset.load(0)  # at least one readable image, else one clear error now, not in a worker
    loader = data.build_loader(dataset, recipe['batch_size'], args.num_workers, recipe['seed'],
                               run.world_size, run.rank)
    schedule = engine.Schedule(recipe, len(loader), run.world_size)
    model.to(run.device)
    models.use_fused_attention(model, run.device.type == 'cuda')

    # AdamW with the official weight decay, the per-step schedule with linear warmup
    trainer = engine.Trainer(model, schedule, recipe, args, run)
    run.print(f"{config.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{config.img_size}px, mask {recipe['mask_ratio']} of {recipe['mask_patch_size']}px "
              f"squares; {len(dataset):,} images in {recipe['data_path']}")
    run.print(f"{schedule}; amp {trainer.amp}; device {run.device}")
    run.print(f"normalisation: mean {list(config.mean)} std {list(config.std)} of 0-1 pixels; "
              f"intensity {config.intensity}")
    # the pictures: every rank draws (with --fsdp the model is theirs together), rank 0 writes
    picture = lambda name: os.path.join(args.output, f'reconstruction_{name}.png') if run.main \
        else None
    shown = data.eval_transform(config.img_size, normalize, crop_pct=1.0)
    pictures = picture_batch(dataset, shown, mask_generator, run.device)
    if not resumed:
        run.make_output()
        drawn = save_reconstructions(model, *pictures, config, picture('start'), trainer.autocast)
        run.picture('reconstruction', drawn, 0)

    # the loss: the L1 distance of the reconstructed pixels in the masked squares (models.SimMIM)
    to_device = images_to_device(args, dataset, config, normalize, run)

    def loss_fn(batch):
        (images, masks), _, skipped = batch
        images = to_device(images, skipped)
        return trainer.wrapped(images, masks.to(run.device, non_blocking=True))

    def end_epoch(epoch, numbered):
        if numbered:
            name = 'end' if epoch + 1 == schedule.epochs else f'epoch_{epoch}'
            drawn = save_reconstructions(model, *pictures, config, picture(name), trainer.autocast)
            run.picture('reconstruction', drawn, (epoch + 1) * schedule.steps_per_epoch)
        return []

    entries = dict(kind='pretrain', config=dataclasses.asdict(config), recipe=recipe)
    if engine.fit(trainer, loader, loss_fn, resumed, entries, end_epoch):
        run.print(f"done: checkpoints, log.jsonl and reconstruction pictures are in "
                  f"{args.output}")


def images_to_device(args, dataset, config, normalize, run):
    """The loader's images -> the device's batch (data.batch_to_device); a warning where
    --decode device cannot take the images."""
    if args.decode == 'device' and not dataset.encoded:
        run.print(f"warning: --decode device decodes RGB JPEGs for 3-channel models; these "
                  f"{config.in_chans}-channel images are decoded by the workers")
    return data.batch_to_device(dataset, config.img_size, normalize, run.device)


def masking(config, recipe, run):
    """The mask generator of the recipe; a warning when few squares remain to mask."""
    size, square, patch = config.img_size, recipe['mask_patch_size'], config.patch_size
    generator = data.MaskGenerator(size, square, patch, recipe['mask_ratio'])
    cells = (size // square) ** 2
    if cells < 16:  # the paper's: 36 (Swin) and 49 (ViT)
        fits = [d for d in range(patch, size // 4 + 1, patch) if size % d == 0]
        hint = f"; --mask-patch-size {fits[-1]} gives {(size // fits[-1]) ** 2}" if fits else ''
        run.print(f"warning: {square}px mask squares cut {size}px images into only {cells} "
                  f"cells{hint}")
    return generator


@torch.no_grad()
def save_reconstructions(model, images, masks, config, path, autocast=contextlib.nullcontext()):
    """A PNG grid, a row per image: original | masked input | reconstruction | reconstruction in
    the masked squares; written to path if any. -> the grid (C, H, W)."""
    was_training = model.training
    with autocast:  # as in training (--fsdp: bf16 weights)
        rec = model.eval().reconstruct(images, masks).float()
    model.train(was_training)
    mean, std = (torch.tensor(v, device=images.device).view(1, -1, 1, 1)
                 for v in (config.mean, config.std))
    images, rec = (images * std + mean).clamp(0, 1), (rec * std + mean).clamp(0, 1)
    p = model.patch_size
    m = masks.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).to(images.dtype)
    rows = [images, images * (1 - m) + 0.5 * m, rec, images * (1 - m) + rec * m]
    grid = torch.stack(rows, 1).flatten(0, 1)[:, :3]  # more channels: the first three shown
    grid = torchvision.utils.make_grid(grid.cpu(), nrow=4, padding=2)
    if path:
        write = lambda f: torchvision.utils.save_image(grid, f, format='PNG')
        checkpoints.save_atomic(write, path)
    return grid


def picture_batch(dataset, transform, mask_generator, device, n=8):
    """The pictures' batch: n images spread over the dataset, center-cropped, with fixed masks."""
    index = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long().tolist()
    images = torch.stack([transform(dataset.load(i)[0]) for i in index])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        masks = torch.stack([mask_generator() for _ in index])
    return images.to(device), masks.to(device)


def stats(args, run):
    """--stats: the --mean and --std that normalise --data-path (under --intensity) to mean 0 and
    std 1."""
    engine.warn_unused(run, args, '--stats', (*models.FIELDS, *RECIPE),
                       used=('in_chans', 'intensity', 'data_path'))
    given = {k: getattr(args, k) for k in ('in_chans', 'intensity') if getattr(args, k)}
    dataset = data.ImageDataset(args.data_path or DEMO_DATA, None, **given)
    mean, std, n = data.folder_stats(dataset)
    run.print(f"{n} of {len(dataset)} images in {dataset.root}, {dataset.in_chans} channels, "
              f"intensity {dataset.intensity}: --mean {' '.join(f'{v:.4f}' for v in mean)} "
              f"--std {' '.join(f'{v:.4f}' for v in std)}")


def reconstruct(args, run):
    """--reconstruct: the training's pictures of these images by the --pretrained model at its
    own size, a mask of --mask-ratio drawn with --seed; 8 images a picture."""
    if not args.pretrained:
        raise ValueError("--reconstruct draws with pretrained weights: pass --pretrained PATH (a "
                         "checkpoint, a Hugging Face folder or model id, or a published name)")
    try:
        files = data.image_files(args.reconstruct)
    except ValueError as e:
        raise ValueError(f"--reconstruct: {e}") from None
    engine.warn_unused(run, args, '--reconstruct', RECIPE,
                       used=('pretrained', 'mask_patch_size', 'mask_ratio', 'seed'))
    config, recipe, _, source = settings(args, run, resume=False)
    if not source.simmim:
        raise ValueError(f"'{args.pretrained}' holds no SimMIM decoder (a classifier?): "
                         f"reconstructions need pretraining weights")
    model = models.build_simmim(config)
    run.print(source.load_into(model))
    model.to(run.device)
    mask_generator = masking(config, recipe, run)
    normalize = data.ToNormalizedTensor(config.mean, config.std)
    transform = data.eval_transform(config.img_size, normalize, crop_pct=1.0)
    run.make_output()
    images = readable(files, transform, config, run)
    for n in itertools.count(1):  # 8 images a picture
        chunk = list(itertools.islice(images, 8))
        if not chunk:
            break
        batch = torch.stack([image for _, image in chunk])
        with data.seeded(recipe['seed'] + n):
            masks = torch.stack([mask_generator() for _ in batch])
        path = os.path.join(args.output, f'reconstruction_{n}.png')
        save_reconstructions(model, batch.to(run.device), masks.to(run.device), config,
                             path if run.main else None)
        run.print(f"wrote {path}: " + ', '.join(p for p, _ in chunk))
    if n == 1:
        raise ValueError(f"none of the {len(files)} images given to --reconstruct could be read")


def readable(files, transform, config, run):
    """(path, image) of the files that can be read; the others named and left out."""
    for path in files:
        try:
            yield path, transform(data.load_image(path, config.in_chans, config.intensity))
        except data.UNREADABLE as e:
            run.print(f"{path}: unreadable ({e}), left out")


if __name__ == '__main__':
    main(get_args_parser().parse_args())
