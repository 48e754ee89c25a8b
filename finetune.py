"""Fine-tuning, evaluation and inference of SimMIM-pretrained encoders.

    torchrun --nproc_per_node 8 finetune.py --pretrained output/simmim_pretrain/checkpoint.pth \
        --data-path /data/imagenet
    python finetune.py --eval --resume output/simmim_finetune/best.pth --data-path /data/imagenet
    python finetune.py --predict photo.jpg photos/ --resume output/simmim_finetune/best.pth

Defaults are the official Swin-B fine-tuning recipe: 224px, window 7, 100 epochs with 20 warmup, lr 1.25e-3 per 512
images, layer decay 0.9, drop path 0.1, RandAugment, random erasing, mixup/cutmix with label smoothing. The run
machinery (distributed run, optimizer, AMP step, checkpoints, logging) is engine.py's, shared with pretrain.py.
"""
import contextlib
import csv
import io
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import data
import engine
import models

# The official layer decay per model family (Swin-B 100-epoch pretraining: 0.9; 800 epochs: 0.8)
LAYER_DECAY = {'swin_large': 0.7, 'swinv2_base': 0.75, 'vit_small': 0.65, 'vit_base': 0.65, 'vit_large': 0.65}
# What a resumed, evaluated or used checkpoint carries over: the whole classifier
CLASSIFIER_FLAGS = engine.ARCH_FLAGS + ('window_size', 'img_size', 'num_classes', 'classes', 'linear_probe',
                                        'probe_block', 'pretrained_window_sizes', 'vit_norm', 'crop_pct')
# The timm model each of ours is (the printed timm.create_model call sets every field that differs)
TIMM_NAMES = {'swin_tiny': 'swin_tiny_patch4_window7_224', 'swin_small': 'swin_small_patch4_window7_224',
              'swin_base': 'swin_base_patch4_window7_224', 'swin_large': 'swin_large_patch4_window7_224',
              'swinv2_tiny': 'swinv2_tiny_window8_256', 'swinv2_small': 'swinv2_small_window8_256',
              'swinv2_base': 'swinv2_base_window8_256', 'swinv2_large': 'swinv2_large_window12_192',
              'vit_small': 'beit_base_patch16_224', 'vit_base': 'beit_base_patch16_224',
              'vit_large': 'beit_large_patch16_224'}
# The recipes for the flags left unset: the official fine-tuning's, and a linear probe's: MAE's main_linprobe.py (90
# epochs, 10 warmup, BatchNorm + linear, no weight decay, mixup or RandAugment) but SGD at lr 1.0 per 512 images for
# its LARS, which barely moves the head at one GPU's batches (README)
FINETUNE_DEFAULTS = dict(epochs=100, warmup_epochs=20, base_lr=1.25e-3, warmup_lr=2.5e-7, min_lr=2.5e-7,
                         weight_decay=0.05, clip_grad=5.0, mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25,
                         aa='rand-m9-mstd0.5-inc1', color_jitter=0.4, drop_path=None)
PROBE_DEFAULTS = dict(epochs=90, warmup_epochs=10, base_lr=1.0, warmup_lr=0., min_lr=0., weight_decay=0., clip_grad=0.,
                      mixup=0., cutmix=0., smoothing=0., reprob=0., aa='', color_jitter=0., drop_path=0.)
# Besides engine.TRAJECTORY_FLAGS, what a resumed fine-tuning must keep
FINETUNE_FLAGS = ('layer_decay', 'drop_path', 'mixup', 'cutmix', 'mixup_prob', 'mixup_switch_prob', 'smoothing', 'aa',
                  'color_jitter', 'reprob', 'scale', 'hflip')


def get_args_parser():
    p = engine.Parser(description='SimMIM fine-tuning', formatter_class=engine.HelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--pretrained', default=None,
                   help='SimMIM pretraining checkpoint to start from: a file, a Hugging Face folder or a published '
                        'name (README)')
    g.add_argument('--model', default=None, choices=list(models.MODELS),
                   help="encoder (default: the checkpoint's, else swin_base)")
    g.add_argument('--img-size', type=engine.SIZE, default=None, help='input size in pixels (default 224)')
    engine.add_arch_args(g)
    g.add_argument('--num-classes', type=engine.SIZE, default=None, help='default: the class folders of DATA/train')
    g.add_argument('--vit-norm', default=None, choices=['fc', 'final'],
                   help="ViT's pooled features: 'fc' mean-pools, then a new LayerNorm (the official fine-tuning, "
                        "default); 'final' keeps the pretrained final norm on the tokens (an exported encoder's)")
    g.add_argument('--linear-probe', action='store_true', default=None,
                   help='freeze the encoder, train BatchNorm + linear on pooled features with the probe recipe: SGD, '
                        'lr 1.0, 90 epochs, no weight decay, mixup, RandAugment, erasing or smoothing (flags given '
                        'win)')
    g.add_argument('--probe-block', type=engine.SIZE, default=None,
                   help="ViT: probe the output of this block (the paper's ViT-B: 8) instead of the last")
    g = p.add_argument_group('augmentation (official fine-tuning values)')
    g.add_argument('--scale', type=engine.FRACTION, default=0.08,
                   help='RandomResizedCrop: smallest crop, a fraction of the area')
    g.add_argument('--hflip', type=engine.PROBABILITY, default=0.5,
                   help='horizontal flip probability (0 for text, digits, ...)')
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help="timm RandAugment policy; '' for none")
    g.add_argument('--color-jitter', type=engine.AMOUNT, default=0.4,
                   help='brightness, contrast and saturation jitter, used without RandAugment; 0 = off')
    g.add_argument('--reprob', type=engine.PROBABILITY, default=0.25, help='random erasing probability')
    g.add_argument('--mixup', type=engine.AMOUNT, default=0.8, help='mixup alpha, 0 = off')
    g.add_argument('--cutmix', type=engine.AMOUNT, default=1.0, help='cutmix alpha, 0 = off')
    g.add_argument('--mixup-prob', type=engine.PROBABILITY, default=1.0, help='probability of mixing a batch')
    g.add_argument('--mixup-switch-prob', type=engine.PROBABILITY, default=0.5,
                   help='probability of cutmix instead of mixup')
    g.add_argument('--smoothing', type=engine.number('[0, 1)'), default=0.1, help='label smoothing')
    g.add_argument('--crop-pct', type=engine.FRACTION, default=None,
                   help='evaluation and prediction: resize to img size / crop pct, center crop (default 0.875; 1 '
                        'keeps the borders)')
    engine.add_data_args(p.add_argument_group('data'), 'folder with train/ and val/ class folders (ImageNet layout)')
    g = engine.add_optim_args(p)  # defaults: FINETUNE_DEFAULTS or PROBE_DEFAULTS, set in start()
    g.add_argument('--layer-decay', type=engine.FRACTION, default=None,
                   help='lr x decay^(depth - layer): 0.9 Swin-T/S/B, 0.7 Swin-L, 0.75 SwinV2-B, 0.65 ViT')
    engine.add_run_args(p, output='output/simmim_finetune', compile='off')
    g = p.add_argument_group('evaluate and use')
    g.add_argument('--eval', action='store_true', help='evaluate the --resume checkpoint on DATA/val and exit')
    g.add_argument('--throughput', action='store_true', help="print the model's inference images/s and exit")
    g.add_argument('--predict', nargs='+', default=None, metavar='IMG',
                   help='print the top-5 classes of these images (files or folders) with the --resume checkpoint')
    g.add_argument('--predict-csv', default=None, metavar='PATH', help='also write the predictions to this CSV file')
    g.add_argument('--export', default=None, metavar='PATH',
                   help="write the --pretrained encoder (at --img-size) or the --resume classifier as a timm state "
                        "dict and print the timm.create_model call that loads it")
    p.set_defaults(pretrained_window_sizes=None, classes=None)  # taken from the checkpoint
    p.set_defaults(**dict.fromkeys(PROBE_DEFAULTS))  # the recipe's, set in start()
    for action in p._actions:
        if action.dest in PROBE_DEFAULTS:
            shown = f'default {FINETUNE_DEFAULTS[action.dest]}; ' if action.dest != 'drop_path' else ''
            action.help = f"{action.help or ''} ({shown}--linear-probe: {PROBE_DEFAULTS[action.dest]!r})".strip()
    return p


# ---------------------------------------------------------------------------------------------------------------------
# Model

def layer_id(name, model):
    """The official layer-wise lr decay assignment. Swin (N blocks): patch embedding 0, block b of stage s
    sum(depths[:s]) + b + 1, the patch merging after stage s sum(depths[:s + 1]) (timm keeps it at the start of stage
    s + 1), the rest N + 1. ViT: tokens and patch embedding 0, block i i + 1, the rest N + 1. -> (id, N)."""
    parts = name.split('.')
    if hasattr(model, 'blocks'):  # ViT
        n = len(model.blocks)
        if parts[0] in ('cls_token', 'mask_token', 'pos_embed', 'patch_embed'):
            return 0, n
        return (int(parts[1]) + 1 if parts[0] == 'blocks' else n + 1), n
    depths = [len(stage.blocks) for stage in model.layers]
    n = sum(depths)
    if parts[0] in ('patch_embed', 'mask_token', 'absolute_pos_embed'):
        return 0, n
    if parts[0] == 'layers':
        stage = int(parts[1])
        return (sum(depths[:stage]) if parts[2] == 'downsample' else sum(depths[:stage]) + int(parts[3]) + 1), n
    return n + 1, n


def layer_scales(model, decay):
    def scale(name):
        i, n = layer_id(name, model)
        return decay ** (n + 1 - i)
    return scale


def classifier_overrides(args):
    """The classifier's architecture arguments beyond engine.arch_overrides: SwinV2's pretraining windows, ViT's
    pooling norm."""
    vit = models.MODELS[args.model]['family'] == models.VIT
    return dict(engine.arch_overrides(args), pretrained_window_sizes=args.pretrained_window_sizes,
                **({'use_fc_norm': args.vit_norm != 'final'} if vit else {}))


def build_model(args):
    model = models.build_classifier(args.model, args.img_size, args.num_classes, args.use_checkpoint,
                                    **classifier_overrides(args))
    if args.linear_probe:  # frozen encoder, BatchNorm (no affine) + linear on the pooled features
        for p in model.parameters():
            p.requires_grad = False
        parent, attr = (model.head, 'fc') if hasattr(model.head, 'fc') else (model, 'head')
        setattr(parent, attr, models.probe_head(getattr(parent, attr).requires_grad_(True)))
    return model


def pretrained_windows(saved):
    """SwinV2's per-stage windows in pretraining, which its continuous position bias is scaled by."""
    _, kw = models.model_kwargs(saved['model'], saved.get('img_size'), True, **models.arch_kwargs(saved))
    res = kw['img_size'] // kw['patch_size']
    return [min(kw['window_size'], res // 2 ** i) for i in range(len(kw['depths']))]


def load_data(args, normalize):
    """DATA/train (unless --eval) and DATA/val as class-folder datasets, checked now; sets args.classes and
    args.num_classes. Errors are ValueErrors."""
    if args.data_path is None:
        raise ValueError("give --data-path, a folder with train/ and val/ class folders (the demo: --data-path demo)")
    if args.aa and args.in_chans not in (1, 3) and not args.eval:
        raise ValueError(f"RandAugment (--aa) works on 1- or 3-channel images, not {args.in_chans}: pass --aa ''")
    splits = ['val'] if args.eval else ['train', 'val']
    for split in splits:
        if not os.path.isdir(os.path.join(args.data_path, split)):
            raise ValueError(f"--data-path '{args.data_path}' has no {split}/ folder; fine-tuning needs train/ and "
                             f"val/, each with one folder of images per class")
    datasets = {}
    if not args.eval:
        train = os.path.join(args.data_path, 'train')
        try:
            transform = data.finetune_transform(args.img_size, normalize, args.aa, args.reprob, args.scale, args.hflip,
                                                args.color_jitter)
        except AssertionError:  # timm's answer to an unknown policy
            raise ValueError(f"--aa '{args.aa}' is no timm augmentation policy: use e.g. rand-m9-mstd0.5-inc1 (the "
                             f"official), or '' for none") from None
        datasets['train'] = data.ImageDataset(train, transform, args.in_chans, args.classes, args.intensity)
        datasets['train'].load(0)  # a readable training image now, not in a loader worker
        if not datasets['train'].classes:
            raise ValueError(f"'{train}' has no class folders, or images outside them: put each class's images in a "
                             f"folder of its own")
        folders = [d.name for d in os.scandir(train) if d.is_dir() and not d.name.startswith('.')]
        empty = sorted(set(folders) - set(datasets['train'].classes))
        if empty:
            raise ValueError(f"class folder(s) without images in '{train}': {', '.join(empty[:5])}; add images or "
                             f"remove the folder")
        args.classes = datasets['train'].classes
    transform = data.eval_transform(args.img_size, normalize, args.crop_pct)
    datasets['val'] = data.ImageDataset(os.path.join(args.data_path, 'val'), transform, args.in_chans, args.classes,
                                        args.intensity)
    datasets['val'].load(0)  # a readable validation image now, not after the first epoch
    args.classes = args.classes or datasets['val'].classes
    if args.num_classes and len(args.classes) > args.num_classes:  # labels past the classifier's outputs
        raise ValueError(f"{args.num_classes} classes (--num-classes or the checkpoint's), but {len(args.classes)} "
                         f"class folders ({', '.join(args.classes[:5])}{', ...' * (len(args.classes) > 5)}); leave "
                         f"--num-classes out to count the folders")
    args.num_classes = args.num_classes or len(args.classes)
    if 'train' in datasets and (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise ValueError(f"mixup/cutmix need an even --batch-size, got {args.batch_size}")
    return datasets


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation and use

@torch.no_grad()
def evaluate(model, loader, run, amp_context):
    """Over all ranks, every readable validation image exactly once: loss, top-1 and top-5 (%; top-5 only with more
    than 5 classes), per-class top-1 (%) and the confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    k = model.num_classes
    totals = torch.zeros(3, dtype=torch.float64, device=run.device)  # loss, top-5 hits, images
    confusion = torch.zeros(k * k, dtype=torch.float64, device=run.device)
    for images, targets, skipped in loader:
        readable = (skipped == 0).to(run.device)  # an unreadable file's stand-in is counted with its own index
        images, targets = images.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        with amp_context:
            logits = model(images).float()
        loss = F.cross_entropy(logits, targets, reduction='none')
        top5 = logits.topk(min(5, k), 1).indices.eq(targets[:, None]).any(1)
        totals += torch.stack([(loss * readable).sum(), (top5 & readable).sum(), readable.sum()]).double()
        confusion.index_add_(0, targets * k + logits.argmax(1), readable.double())  # no wait for the device
    if run.distributed:
        dist.all_reduce(totals)
        dist.all_reduce(confusion)
    confusion = confusion.view(k, k).long()
    (loss, top5, n), hits = totals.tolist(), confusion.diag()
    return dict(loss=loss / max(n, 1), acc1=100 * hits.sum().item() / max(n, 1),
                acc5=100 * top5 / max(n, 1) if k > 5 else None, images=int(n),
                per_class=[100 * h / n if n else None for h, n in zip(hits.tolist(), confusion.sum(1).tolist())],
                confusion=confusion.tolist())  # per class: None for a class without validation images


def accuracy_line(stats):
    """'top-1 ..% [top-5 ..%] loss .. on N images'"""
    return f"top-1 {stats['acc1']:.2f}% " + (f"top-5 {stats['acc5']:.2f}% " if stats['acc5'] is not None else '') + \
        f"loss {stats['loss']:.4f} on {stats['images']} images"


@torch.no_grad()
def throughput(model, args, run, amp_context, steps=10):
    model.eval()
    x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size, device=run.device)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        with amp_context:
            model(x)
        if run.device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times[3:])[len(times[3:]) // 2]
    run.print(f"throughput: {args.batch_size / seconds:.1f} images/s ({args.model}, {args.img_size}px, batch "
              f"{args.batch_size}, median of {steps} forward passes, {run.device})")


@torch.no_grad()
def classify(model, image, k=5, autocast=contextlib.nullcontext()):
    """One image file -> its top-k [(class name, probability)], preprocessed by model.pretrained_cfg (a model of
    models.load_model, or of this script)."""
    cfg, num_classes = model.pretrained_cfg, getattr(model, 'num_classes', 0)
    if not num_classes:
        raise ValueError("classify needs a classifier; these are pretraining weights or an encoder without head "
                         "(models.extract_features reads their features)")
    names = models.class_names(num_classes, cfg.get('label_names'))
    chans, size = cfg['input_size'][:2]
    transform = data.eval_transform(size, data.normalization(chans, cfg['mean'], cfg['std']), cfg['crop_pct'])
    pixels = data.load_image(image, chans, cfg.get('intensity', 'type'))  # timm's own models: the default rule
    with autocast:
        probs = model.eval()(transform(pixels)[None].to(next(model.parameters()).device)).float().softmax(1)[0]
    top = probs.topk(min(k, len(probs)))
    return [(names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]


def predict(model, paths, args, amp_context, k=5):
    """Print each image's top-k classes (k up to the number of classes); write them to --predict-csv too."""
    rows, k = [], min(k, args.num_classes)
    try:
        files = data.image_files(paths)
    except FileNotFoundError as e:
        raise SystemExit(f"error: --predict: {e}") from None
    target = args.predict_csv and os.path.abspath(args.predict_csv)
    if target and (target in map(os.path.abspath, files) or not os.path.isdir(os.path.dirname(target))):
        raise SystemExit(f"error: --predict-csv '{args.predict_csv}' is one of the images, or its folder does not "
                         f"exist: name a new file in an existing folder")
    for path in files:
        name = os.fsencode(path).decode(errors='replace')  # printable under any locale
        try:
            guesses = classify(model, path, k, amp_context)
        except data.UNREADABLE as e:
            print(f"{name}: unreadable ({e})", flush=True)
            rows.append([name, 'unreadable'] + [''] * (2 * k - 1))
            continue
        print(f"{name}: " + ', '.join(f"{c} {100 * p:.1f}%" for c, p in guesses), flush=True)
        rows.append([name] + [v for c, p in guesses for v in (c, f'{p:.6f}')])
    if args.predict_csv:
        table = io.StringIO()
        csv.writer(table).writerows([['image'] + [f'{v}_{i + 1}' for i in range(k) for v in ('class', 'score')]] + rows)
        engine.save_atomic(lambda f: f.write(table.getvalue().encode()), args.predict_csv)
        print(f"wrote {args.predict_csv}")


def export(model, args, run):
    """Write the classifier (or head-less encoder) for timm: its state dict, a linear probe's BatchNorm folded into the
    linear head, with the preprocessing as timm's pretrained_cfg; print the call that loads both."""
    state = models.fold_probe_head(model.state_dict())
    cfg = models.preprocessing(vars(args), args.num_classes)
    if run.main:
        engine.save_atomic(lambda f: torch.save(dict(state_dict=state, pretrained_cfg=cfg, intensity=args.intensity),
                                                f), args.export)
        _, kw = models.model_kwargs(args.model, args.img_size, False, **classifier_overrides(args))
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items() if k not in ('drop_path_rate',
                                                                                              'init_values')}
        shown = ', '.join(f"{k}={v!r}" for k, v in kw.items())
        run.print(f"wrote {args.export}; in timm: timm.create_model('{TIMM_NAMES[args.model]}', {shown}, num_classes="
                  f"{args.num_classes}, checkpoint_path='{args.export}', pretrained_cfg_overlay=torch.load("
                  f"'{args.export}')['pretrained_cfg'])")


# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning

def main(args):
    engine.launch(start, args)


def start(args, run):
    """Load the model, then predict, measure, export, evaluate or fine-tune."""
    use = args.eval or args.predict or args.throughput or args.export
    resume, source = engine.find_resume(args, run, training=not use)
    source = source or (engine.load_checkpoint(args.pretrained, args.allow_pickle, run) if args.pretrained else None)
    ours = bool(resume) and 'max_accuracy' in source  # a finetune.py checkpoint, which can continue training
    modes = [f'--{m}' for m in ('eval', 'predict', 'throughput', 'export') if getattr(args, m)]
    if len(modes) > 1:
        raise SystemExit(f"error: {' and '.join(modes)} each run alone: pass one of them")
    if (args.eval or args.predict) and not resume:
        raise SystemExit("error: --eval and --predict need a fine-tuned checkpoint: pass --resume PATH")
    if (args.eval or args.predict) and not source['args'].get('num_classes'):
        raise SystemExit(f"error: '{resume}' holds no classifier (a pretraining checkpoint?): fine-tune it first "
                         f"(--pretrained {resume}), then --eval or --predict with the result")
    if args.export and not source:
        raise SystemExit("error: --export writes trained weights: pass --pretrained (an encoder) or --resume (a "
                         "classifier)")
    if args.export and os.path.exists(args.export) and any(
            os.path.exists(p) and os.path.samefile(args.export, p) for p in (resume, args.pretrained) if p):
        raise SystemExit(f"error: --export '{args.export}' is the checkpoint it would read: name a new file")
    if args.export and args.linear_probe and not resume:
        raise SystemExit("error: --export writes a trained model: export the probe's checkpoint (--resume PATH), or "
                         "the encoder without --linear-probe")
    if args.predict_csv and not args.predict:
        raise SystemExit("error: --predict-csv writes the predictions of --predict IMG ...: pass both")
    if resume and not ours and not use:
        raise SystemExit(f"error: '{resume}' is no finetune.py checkpoint, so training cannot resume from it; "
                         f"start from it with --pretrained")
    saved = source['args'] if source else {}
    engine.inherit(args, saved, CLASSIFIER_FLAGS if resume else engine.ARCH_FLAGS)  # a resumed classifier: all of it
    if args.img_size is None and saved.get('img_size') not in (None, 192, 224):  # not the ImageNet recipe's 192 -> 224
        engine.inherit(args, saved, ('img_size', 'window_size'))
    args.model, args.img_size, args.in_chans = args.model or 'swin_base', args.img_size or 224, args.in_chans or 3
    args.crop_pct = args.crop_pct or 0.875
    args.vit_norm = args.vit_norm or ('final' if args.export and not resume else 'fc')  # an encoder: its final norm
    if saved and models.MODELS[args.model]['family'] == models.SWINV2:
        args.pretrained_window_sizes = args.pretrained_window_sizes or saved.get('pretrained_window_sizes') \
            or pretrained_windows(saved)
    unset = {k: v for k, v in (PROBE_DEFAULTS if args.linear_probe else FINETUNE_DEFAULTS).items()
             if getattr(args, k) is None}
    vars(args).update(unset)
    if args.linear_probe and not use:
        run.print(', '.join(["linear probe: SGD (momentum 0.9)"] + [f"--{k.replace('_', '-')} {v!r}"
                                                                     for k, v in unset.items()]))
    if args.probe_block and not (args.linear_probe and models.MODELS[args.model]['family'] == models.VIT):
        raise SystemExit("error: --probe-block is for --linear-probe of ViT models (a Swin probe reads the last stage)")
    normalize = engine.normalization(args)
    run.print(f"input: {args.img_size}px, {args.in_chans} channels, mean {args.mean} std {args.std} of 0-1 pixels, "
              f"intensity {args.intensity}; evaluation crop {args.crop_pct}")
    try:
        datasets = load_data(args, normalize) if not (args.predict or args.throughput or args.export) else {}
        if args.num_classes is None:  # no data: a throughput model has ImageNet's classes, an exported encoder none
            args.num_classes = 1000 if args.throughput else 0
        torch.manual_seed(args.seed)  # the new head's initialisation
        model = build_model(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.eval and not saved.get('classes') and len(args.classes) != args.num_classes:
        run.print(f"warning: '{resume}' names no classes: its outputs 0-{len(args.classes) - 1} are taken for the "
                  f"{len(args.classes)} class folders in sorted order, of its {args.num_classes}")
    if ours:  # the model and the data it was trained on; one line naming a change
        engine.check_resume_flags(run, args, saved, resume, engine.SHAPE_FLAGS + ('mean', 'std', 'intensity',
                                                                                  'linear_probe', 'probe_block'), use)
        engine.load_model_state(model, source['model'], resume)
        run.print(f"loaded {resume} (epoch {source.get('epoch')}"
                  + (f", top-1 {source['acc1']:.2f})" if 'acc1' in source else ')'))
    elif source:
        engine.load_pretrained(model, source, resume or args.pretrained, run)
    if args.probe_block and len(model.blocks) != args.probe_block:  # the blocks past it go; the checkpoints say so
        if args.probe_block > len(model.blocks):
            raise SystemExit(f"error: --probe-block {args.probe_block}, but the model has {len(model.blocks)} blocks"
                             + ("; a probe keeps only the blocks it reads: start afresh (--no-auto-resume or another "
                                "--output)" if ours else ''))
        del model.blocks[args.probe_block:]
        args.depths = [args.probe_block]
    if args.export:
        return export(model, args, run)
    model.to(run.device)
    models.use_fused_attention(model, run.device.type == 'cuda')
    amp, amp_context = engine.autocast(args.amp, run.device)
    classes = models.class_names(args.num_classes, args.classes)  # checkpoints of other code: ImageNet's or numbers
    model.pretrained_cfg = dict(models.preprocessing(vars(args), args.num_classes), intensity=args.intensity)
    if args.predict:
        if run.main:
            predict(model, args.predict, args, amp_context)
        return
    if args.throughput:
        return throughput(model, args, run, amp_context)
    val_loader = data.build_loader(datasets['val'], args.batch_size, args.num_workers, args.seed, run.world_size,
                                   run.rank, train=False)
    if args.eval:
        stats = evaluate(model, val_loader, run, amp_context)
        run.print(f"{accuracy_line(stats)} of {args.data_path}/val; per class: "
                  + ', '.join(f"{c} {'no images' if a is None else f'{a:.1f}%'}"
                              for c, a in zip(classes[:50], stats['per_class'])))
        if len(classes) <= 20:
            run.print('confusion matrix (rows: true class, columns: predicted):\n' + '\n'.join(
                f"{name:>20.20} " + ' '.join(f'{n:6d}' for n in row) for name, row in zip(classes, stats['confusion'])))
        return
    finetune(args, run, model, datasets['train'], val_loader, resume, source if resume else None)


def finetune(args, run, model, train_set, val_loader, resume, resume_state):
    loader = data.build_loader(train_set, args.batch_size, args.num_workers, args.seed, run.world_size, run.rank)
    try:
        schedule = engine.scale_lrs(args, run.world_size, len(loader))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    model_ddp = run.wrap(model, args.compile)

    # optimizer: AdamW with layer-wise lr decay, per-step cosine schedule with linear warmup
    if args.layer_decay is None:
        args.layer_decay = LAYER_DECAY.get(args.model, 0.9)
    optimizer = engine.build_optimizer(model, args, layer_scales(model, args.layer_decay),
                                       momentum=0.9 if args.linear_probe else None)
    trainer = engine.Trainer(model_ddp, optimizer, engine.build_scheduler(optimizer, args), args, run)
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                  switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing, num_classes=args.num_classes) \
        if args.mixup > 0 or args.cutmix > 0 else None
    criterion = SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(args.smoothing) \
        if args.smoothing > 0 else nn.CrossEntropyLoss()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.print(f"{args.model}: {trainable:,} trainable parameters, {args.img_size}px, {args.num_classes} classes; "
              f"{len(train_set):,} training and {len(val_loader.dataset):,} validation images in {args.data_path}")
    run.print(f"{schedule}; amp {trainer.amp}; device {run.device}; "
              + ('linear probe' if args.linear_probe else f'layer decay {args.layer_decay}'))
    start_epoch, start_step, best, best_loss = 0, 0, 0., math.inf
    if resume_state:
        engine.check_resume_flags(run, args, resume_state['args'], resume,
                                  engine.TRAJECTORY_FLAGS + FINETUNE_FLAGS)
        trainer.load_state_dict(resume_state)
        start_epoch, start_step = engine.resume_position(resume_state, args, resume)
        best, best_loss = resume_state['max_accuracy'], resume_state.get('best_loss', math.inf)
        run.print(f"resuming at epoch {start_epoch}" + (f" step {start_step}" if start_step else ''))
    engine.start_output(run, args, start_epoch * args.steps_per_epoch + start_step)

    # the loop: cross-entropy on mixed images and soft labels; validation after each epoch, best.pth by top-1 (ties:
    # the lower validation loss)
    def loss_fn(batch):
        images, targets, _ = batch
        images, targets = images.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        if mixup:
            images, targets = mixup(images, targets)
        return criterion(model_ddp(images), targets)

    def state_fn(epoch, step):
        return dict(model=model.state_dict(), **trainer.state_dict(), epoch=epoch, step=step, args=vars(args),
                    max_accuracy=best, best_loss=best_loss)

    run.training = True  # from here a SIGTERM saves and stops the run at the next log line
    for epoch in range(start_epoch, args.epochs):
        if engine.train_one_epoch(trainer, loader, loss_fn, epoch, args, run, state_fn,
                                  start_step if epoch == start_epoch else 0) is None:
            return
        stats = evaluate(model, val_loader, run, trainer.autocast)
        is_best = epoch == 0 or (stats['acc1'], -stats['loss']) > (best, -best_loss)
        if is_best:
            best, best_loss = stats['acc1'], stats['loss']
        run.print(f"epoch {epoch} validation: {accuracy_line(stats)}; best top-1 {best:.2f}%")
        if len(stats['confusion']) > 100:  # ImageNet's would be a million numbers per epoch
            del stats['confusion']
        run.log(dict(epoch=epoch, **{f'val_{k}': v for k, v in stats.items()}, max_accuracy=best))
        numbered = (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs
        engine.save_checkpoint(run, dict(state_fn(epoch, args.steps_per_epoch), acc1=stats['acc1']),
                               [f'ckpt_epoch_{epoch}.pth'] * numbered + ['best.pth'] * is_best)
        if run.stopping:
            run.print(f"SIGTERM: stopped after epoch {epoch}; rerun the same command to resume")
            return
    trainer.check_nonfinite(args.epochs * args.steps_per_epoch, final=True)
    run.print(f"done: best top-1 {best:.2f}%; checkpoints (best.pth) and log.jsonl are in {args.output}")


if __name__ == '__main__':
    main(get_args_parser().parse_args())
