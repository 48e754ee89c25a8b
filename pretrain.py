"""SimMIM pretraining.

    python pretrain.py --model swin_tiny --epochs 50             # the bundled demo images, one process (CPU or GPU)
    torchrun --nproc_per_node 8 pretrain.py --model swin_base --data-path /data/imagenet/train

Defaults are the paper's Swin-B recipe: 192px, window 6, 100 epochs, lr 2e-4 per 512 images. The run machinery
(distributed run, optimizer, AMP step, checkpoints, logging) is engine.py's, shared with finetune.py.
"""
import itertools
import os

import torch
import torchvision

import data
import engine
import models

DEMO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo')
# What continued pretraining, a resumed run and --reconstruct take from the checkpoint unless given
CHECKPOINT_FLAGS = engine.ARCH_FLAGS + ('img_size', 'window_size', 'mask_patch_size', 'norm_target_window')
# Besides engine.TRAJECTORY_FLAGS, what a resumed pretraining must keep
PRETRAIN_FLAGS = ('mask_patch_size', 'mask_ratio', 'norm_target_window', 'scale', 'hflip')


def get_args_parser():
    p = engine.Parser(description='SimMIM pretraining', formatter_class=engine.HelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--model', default=None, choices=list(models.MODELS),
                   help="encoder (default: --pretrained's, else swin_base)")
    g.add_argument('--img-size', type=engine.SIZE, default=None,
                   help="input size in pixels (default: the checkpoint's, else 192 Swin, 224 ViT)")
    engine.add_arch_args(g)
    g.add_argument('--pretrained', default=None,
                   help='continue pretraining from (or --reconstruct with) these weights: a file of any supported '
                        'layout, a Hugging Face folder or a published name (README); the decoder too if present')
    g = p.add_argument_group('masking')
    g.add_argument('--mask-patch-size', type=engine.SIZE, default=None,
                   help="side of a masked square, pixels (default: the checkpoint's, else 32)")
    g.add_argument('--mask-ratio', type=engine.number('(0, 1)'), default=0.6, help='fraction of masked squares')
    g.add_argument('--norm-target-window', type=engine.COUNT, default=None,
                   help="regress pixels normalised over this odd window (SwinV2 configs: 47); 0 = raw pixels "
                        "(default: the checkpoint's, else 0)")
    g = p.add_argument_group('data')
    engine.add_data_args(g, 'folder of images, searched recursively (labels unused); default: the bundled demo/ images')
    g.add_argument('--scale', type=engine.FRACTION, default=0.67,
                   help='RandomResizedCrop: smallest crop, a fraction of the area')
    g.add_argument('--hflip', type=engine.PROBABILITY, default=0.5,
                   help='horizontal flip probability (0 where sides differ: X-rays, text)')
    g.add_argument('--stats', action='store_true', help='print the --mean and --std of the data (up to 1000 images '
                                                        'spread over it) and exit')
    g.add_argument('--reconstruct', nargs='+', default=None, metavar='IMG',
                   help='draw the reconstructions of these images (files or folders) by the --pretrained model into '
                        'OUTPUT/reconstruction_N.png (8 a picture; the mask: --mask-ratio, --seed) and exit')
    engine.add_optim_args(p, epochs=100, warmup_epochs=10, base_lr=2e-4, warmup_lr=1e-6, min_lr=1e-5)
    engine.add_run_args(p, output='output/simmim_pretrain', compile='auto')
    return p


@torch.no_grad()
def save_reconstructions(model, images, masks, normalize, path):
    """A PNG grid, one row per image: original | masked input | reconstruction | reconstruction in the masked part."""
    was_training = model.training
    rec = model.eval().reconstruct(images, masks).float()
    model.train(was_training)
    mean, std = (torch.tensor(v, device=images.device).view(1, -1, 1, 1) for v in (normalize.mean, normalize.std))
    images, rec = (images * std + mean).clamp(0, 1), (rec * std + mean).clamp(0, 1)
    p = model.patch_size
    m = masks.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).to(images.dtype)
    grid = torch.stack([images, images * (1 - m) + 0.5 * m, rec, images * (1 - m) + rec * m], 1).flatten(0, 1)
    grid = grid[:, :3] if grid.shape[1] > 3 else grid  # more channels: the first three shown
    engine.save_atomic(lambda f: torchvision.utils.save_image(grid.cpu(), f, nrow=4, padding=2, format='PNG'), path)


def picture_batch(dataset, transform, mask_generator, device, n=8):
    """A fixed batch for the pictures: n images spread over the dataset, center-cropped, with a fixed mask."""
    index = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long().tolist()
    images = torch.stack([transform(dataset.load(i)[0]) for i in index])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        masks = torch.stack([mask_generator() for _ in index])
    return images.to(device), masks.to(device)


def main(args):
    engine.launch(stats if args.stats else reconstruct if args.reconstruct else pretrain, args)


def stats(args, run):
    """--stats: the --mean and --std that normalise --data-path (under --intensity) to mean 0 and std 1."""
    args.in_chans, args.intensity = args.in_chans or 3, args.intensity or 'type'
    try:
        dataset = data.ImageDataset(args.data_path or DEMO_DATA, None, args.in_chans, intensity=args.intensity)
        mean, std, n = data.folder_stats(dataset)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    run.print(f"{n} of {len(dataset)} images in {dataset.root}, {args.in_chans} channels, intensity {args.intensity}: "
              f"--mean {' '.join(f'{v:.4f}' for v in mean)} --std {' '.join(f'{v:.4f}' for v in std)}")


def build_model(args, run, source=None):
    """The SimMIM model of args, with the --pretrained weights (source) if any, its normalisation and mask generator."""
    args.model, args.mask_patch_size = args.model or 'swin_base', args.mask_patch_size or 32
    args.norm_target_window = args.norm_target_window or 0
    try:
        model = models.build_simmim(args.model, args.img_size, args.norm_target_window, args.use_checkpoint,
                                    **engine.arch_overrides(args))
        args.img_size, args.in_chans = model.encoder.patch_embed.img_size[0], model.in_chans
        if source:
            engine.load_pretrained(model, source, args.pretrained, run)
        normalize = engine.normalization(args)
        mask_generator = data.MaskGenerator(args.img_size, args.mask_patch_size, model.patch_size, args.mask_ratio)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if (args.img_size // args.mask_patch_size) ** 2 < 16:  # the paper's: 36 (Swin) and 49 (ViT)
        fits = [d for d in range(model.patch_size, args.img_size // 4 + 1, model.patch_size) if args.img_size % d == 0]
        run.print(f"warning: {args.mask_patch_size}px mask squares cut {args.img_size}px images into only "
                  f"{(args.img_size // args.mask_patch_size) ** 2} cells"
                  + (f"; --mask-patch-size {fits[-1]} gives {(args.img_size // fits[-1]) ** 2}" if fits else ''))
    return model, normalize, mask_generator


def reconstruct(args, run):
    """--reconstruct: the training's pictures (original | masked | reconstruction | pasted) of these images, by the
    --pretrained model at its own size, a mask of --mask-ratio drawn with --seed; 8 images a picture."""
    if not args.pretrained:
        raise SystemExit("error: --reconstruct draws with pretrained weights: pass --pretrained PATH (a checkpoint, "
                         "a Hugging Face folder or a published name)")
    try:
        files = data.image_files(args.reconstruct)
    except FileNotFoundError as e:
        raise SystemExit(f"error: --reconstruct: {e}") from None
    source = engine.load_checkpoint(args.pretrained, args.allow_pickle, run)
    if not any(k.endswith('decoder.0.weight') for k in models.to_timm_layout(source)[0]):
        raise SystemExit(f"error: '{args.pretrained}' holds no SimMIM decoder (a classifier?): reconstructions need "
                         f"pretraining weights")
    engine.inherit(args, source['args'], CHECKPOINT_FLAGS)
    model, normalize, mask_generator = build_model(args, run, source)
    transform = data.eval_transform(args.img_size, normalize, crop_pct=1.0)
    engine.make_output(args.output)
    model.to(run.device)

    def readable():
        for path in files:
            try:
                yield path, transform(data.load_image(path, args.in_chans, args.intensity))
            except data.UNREADABLE as e:
                run.print(f"{path}: unreadable ({e}), left out")

    images, n = readable(), 0
    for n, chunk in enumerate(iter(lambda: list(itertools.islice(images, 8)), []), 1):  # 8 images a picture
        batch = torch.stack([image for _, image in chunk])
        with data.seeded(args.seed + n):
            masks = torch.stack([mask_generator() for _ in batch])
        path = os.path.join(args.output, f'reconstruction_{n}.png')
        save_reconstructions(model, batch.to(run.device), masks.to(run.device), normalize, path)
        run.print(f"wrote {path}: " + ', '.join(p for p, _ in chunk))
    if n == 0:
        raise SystemExit(f"error: none of the {len(files)} images given to --reconstruct could be read")


def pretrain(args, run):
    resume, ckpt = engine.find_resume(args, run)
    if ckpt and not ('optimizer' in ckpt and 'mask_ratio' in ckpt['args']):
        raise SystemExit(f"error: '{resume}' is no pretrain.py checkpoint, so pretraining cannot resume from it; start "
                         f"from its weights with --pretrained")
    source = engine.load_checkpoint(args.pretrained, args.allow_pickle, run) if args.pretrained and not resume \
        else None
    if ckpt or source:  # a resumed run is the run it was: its model, size, masking and normalisation
        engine.inherit(args, (ckpt or source)['args'], CHECKPOINT_FLAGS)
    torch.manual_seed(args.seed + run.rank)

    # model and data; the errors of bad input are one line
    model, normalize, mask_generator = build_model(args, run, source)
    try:
        if args.data_path is None:
            args.data_path = DEMO_DATA
            run.print(f"no --data-path given: pretraining on the bundled demo images in {DEMO_DATA}")
        transform = data.PretrainTransform(args.img_size, mask_generator, normalize, args.scale, args.hflip)
        dataset = data.ImageDataset(args.data_path, transform, args.in_chans, intensity=args.intensity)
        dataset.load(0)  # at least one readable image, else one clear error now rather than in a worker
        loader = data.build_loader(dataset, args.batch_size, args.num_workers, args.seed, run.world_size, run.rank)
        schedule = engine.scale_lrs(args, run.world_size, len(loader))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    model.to(run.device)
    models.use_fused_attention(model, run.device.type == 'cuda')
    model_ddp = run.wrap(model, args.compile)

    # optimizer: AdamW, per-step cosine (or multistep) schedule with linear warmup
    optimizer = engine.build_optimizer(model, args)
    trainer = engine.Trainer(model_ddp, optimizer, engine.build_scheduler(optimizer, args), args, run)
    run.print(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {args.img_size}px, mask "
              f"{args.mask_ratio} of {args.mask_patch_size}px squares; {len(dataset):,} images in {args.data_path}")
    run.print(f"{schedule}; amp {trainer.amp}; device {run.device}")
    run.print(f"normalisation: mean {args.mean} std {args.std} of 0-1 pixels; intensity {args.intensity}")
    start_epoch, start_step = 0, 0
    if resume:
        engine.check_resume_flags(run, args, ckpt['args'], resume, engine.TRAJECTORY_FLAGS + PRETRAIN_FLAGS)
        engine.load_model_state(model, ckpt['model'], resume)
        trainer.load_state_dict(ckpt)
        start_epoch, start_step = engine.resume_position(ckpt, args, resume)
        run.print(f"resumed from {resume} at epoch {start_epoch}" + (f" step {start_step}" if start_step else ''))
    engine.start_output(run, args, start_epoch * args.steps_per_epoch + start_step)
    if run.main:
        pictures = picture_batch(dataset, data.eval_transform(args.img_size, normalize, crop_pct=1.0),
                                 mask_generator, run.device)
        if start_epoch == 0:
            save_reconstructions(model, *pictures, normalize, os.path.join(args.output, 'reconstruction_start.png'))

    # the loop: the loss is the L1 distance of the reconstructed pixels in the masked squares (models.SimMIM)
    def loss_fn(batch):
        (images, masks), _, _ = batch
        return model_ddp(images.to(run.device, non_blocking=True), masks.to(run.device, non_blocking=True))

    def state_fn(epoch, step):
        return dict(model=model.state_dict(), **trainer.state_dict(), epoch=epoch, step=step, args=vars(args))

    run.training = True  # from here a SIGTERM saves and stops the run at the next log line
    for epoch in range(start_epoch, args.epochs):
        if engine.train_one_epoch(trainer, loader, loss_fn, epoch, args, run, state_fn,
                                  start_step if epoch == start_epoch else 0) is None:
            return
        last = epoch + 1 == args.epochs
        numbered = (epoch + 1) % args.save_freq == 0 or last
        engine.save_checkpoint(run, state_fn(epoch, args.steps_per_epoch), [f'ckpt_epoch_{epoch}.pth'] * numbered)
        if numbered and run.main:
            name = 'reconstruction_end.png' if last else f'reconstruction_epoch_{epoch}.png'
            save_reconstructions(model, *pictures, normalize, os.path.join(args.output, name))
        if run.stopping:
            run.print(f"SIGTERM: stopped after epoch {epoch}; rerun the same command to resume")
            return
    trainer.check_nonfinite(args.epochs * args.steps_per_epoch, final=True)
    run.print(f"done: checkpoints, log.jsonl and reconstruction pictures are in {args.output}")


if __name__ == '__main__':
    main(get_args_parser().parse_args())
