"""Fine-tuning, evaluation and inference of SimMIM-pretrained encoders.

    torchrun --nproc_per_node 8 finetune.py --pretrained output/simmim_pretrain/checkpoint.pth \\
        --data-path /data/imagenet
    python finetune.py --eval --resume output/simmim_finetune/best.pth --data-path /data/imagenet
    python finetune.py --predict photo.jpg photos/ --resume output/simmim_finetune/best.pth

Defaults are the official Swin-B fine-tuning recipe (RECIPE): 224px, window 7, 100 epochs with 20
warmup, lr 1.25e-3 per 512 images, layer decay 0.9, drop path 0.1, RandAugment, random erasing,
mixup/cutmix with label smoothing. The run machinery (distributed run, AMP step, the loop,
resume) is engine.py's, shared with pretrain.py; checkpoint files are checkpoints.py's.
"""
import contextlib
import csv
import dataclasses
import io
import math
import os
import re
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import checkpoints
import data
import engine
import models

# The official layer decay per model (Swin-B after 100 pretraining epochs: 0.9; after 800: 0.8)
LAYER_DECAY = {'swin_large': 0.7, 'swinv2_base': 0.75, 'vit_small': 0.65, 'vit_base': 0.65,
               'vit_large': 0.65}
# The official fine-tuning recipe: the defaults of the flags that set what a run trains
RECIPE = dict(epochs=100, warmup_epochs=20, base_lr=1.25e-3, warmup_lr=2.5e-7, min_lr=2.5e-7,
              **engine.OPTIMIZATION, layer_decay=None, mixup=0.8, cutmix=1.0,
              mixup_prob=1.0, mixup_switch_prob=0.5, smoothing=0.1, aa='rand-m9-mstd0.5-inc1',
              color_jitter=0.4, reprob=0.25, scale=0.08, hflip=0.5, linear_probe=False,
              probe_block=None, data_path=None, pretrained=None)
# A linear probe's: MAE's main_linprobe.py (90 epochs, 10 warmup, BatchNorm + linear, no weight
# decay, mixup or RandAugment) but SGD at lr 1.0 per 512 images for its LARS, which barely moves
# the head at one GPU's batches (README)
PROBE_CHANGES = dict(epochs=90, warmup_epochs=10, base_lr=1.0, warmup_lr=0., min_lr=0.,
                     weight_decay=0., clip_grad=0., mixup=0., cutmix=0., smoothing=0., reprob=0.,
                     aa='', color_jitter=0., drop_path=0.)
PROBE = dict(RECIPE, **PROBE_CHANGES, linear_probe=True)
# What fine-tuning takes from the pretraining checkpoint unless given (not its 192px size: the
# recipe fine-tunes at 224px)
FROM_PRETRAINING = ('model', 'patch_size', 'embed_dim', 'depths', 'num_heads', 'in_chans',
                    'mean', 'std', 'intensity')


def get_args_parser():
    p = engine.Parser('SimMIM fine-tuning', RECIPE, 'output/simmim_finetune', compile='off',
                      probe=PROBE)
    size = engine.number('[1, inf)', int)
    fraction, probability = engine.number('(0, 1]'), engine.number('[0, 1]')
    g = p.model
    g.add_argument('--pretrained', help='SimMIM pretraining checkpoint to start from: a file, a '
                                        'Hugging Face folder or model id (owner/name[@revision]) '
                                        'or a published name (README)')
    g.add_argument('--num-classes', type=size, help='default: the class folders of DATA/train')
    g.add_argument('--vit-norm', choices=['fc', 'final'],
                   help="ViT's pooled features: 'fc' mean-pools, then a new LayerNorm (the "
                        "official fine-tuning, default); 'final' keeps the pretrained final norm "
                        "on the tokens (an exported encoder's)")
    g.add_argument('--linear-probe', action='store_true', default=None,
                   help='freeze the encoder, train BatchNorm + linear on pooled features with the '
                        'probe recipe: SGD, lr 1.0, 90 epochs, no weight decay, mixup, '
                        'RandAugment, erasing or smoothing (flags given win)')
    g.add_argument('--probe-block', type=size,
                   help="ViT: probe the output of this block (the paper's ViT-B: 8), not the last")
    g = p.add_argument_group('augmentation (official fine-tuning values)')
    g.add_argument('--scale', type=fraction, help='RandomResizedCrop: smallest crop, of the area')
    g.add_argument('--hflip', type=probability, help='horizontal flip probability (0 for text)')
    g.add_argument('--aa', help="timm RandAugment policy; '' for none")
    g.add_argument('--color-jitter', type=engine.number('[0, inf)'),
                   help='brightness, contrast and saturation jitter, without RandAugment; 0 off')
    g.add_argument('--reprob', type=probability, help='random erasing probability')
    g.add_argument('--mixup', type=engine.number('[0, inf)'), help='mixup alpha, 0 = off')
    g.add_argument('--cutmix', type=engine.number('[0, inf)'), help='cutmix alpha, 0 = off')
    g.add_argument('--mixup-prob', type=probability, help='probability of mixing a batch')
    g.add_argument('--mixup-switch-prob', type=probability, help='of cutmix instead of mixup')
    g.add_argument('--smoothing', type=engine.number('[0, 1)'), help='label smoothing')
    g.add_argument('--crop-pct', type=fraction,
                   help='evaluation and prediction: resize to img size / crop pct, center crop '
                        '(default 0.875; 1 keeps the borders)')
    p.data.add_argument('--data-path', help='folder with train/ and val/ class folders')
    p.optimization.add_argument('--layer-decay', type=fraction,
                                help='lr x decay^(depth - layer): 0.9 Swin-T/S/B, 0.7 Swin-L, '
                                     '0.75 SwinV2-B, 0.65 ViT')
    g = p.add_argument_group('evaluate and use')
    g.add_argument('--eval', action='store_true', help='evaluate --resume on DATA/val and exit')
    g.add_argument('--throughput', action='store_true', help="print inference images/s and exit")
    g.add_argument('--predict', nargs='+', metavar='IMG',
                   help='print the top-5 classes of these images (files or folders) with the '
                        '--resume checkpoint')
    g.add_argument('--predict-csv', metavar='PATH', help='also write the predictions to this CSV')
    g.add_argument('--export', metavar='DIR',
                   help="write the --pretrained encoder (at --img-size) or the --resume "
                        "classifier as timm's Hugging Face folder (config.json, "
                        "model.safetensors): timm.create_model('local-dir:DIR', pretrained=True)")
    return p


def main(args):
    engine.launch(start, args)


# ---------------------------------------------------------------------------------------------
# Settings

def settings(args, run):
    """The run's settings, decided once: the flags given, else the resumed or used checkpoint's,
    else the recipe's (the probe's with --linear-probe). -> (model config, recipe, resumed
    checkpoint, source checkpoint: the resumed one or --pretrained)."""
    use = bool(args.eval or args.predict or args.throughput or args.export)
    check_modes(args, run)
    if use:  # the checkpoint named, not OUTPUT's
        resumed = checkpoints.read(args.resume, args.allow_pickle) if args.resume else None
    else:
        resumed = checkpoints.find_resume(args.output, args.resume, args.auto_resume,
                                          allow_pickle=args.allow_pickle, say=run.print)
    source = resumed
    if args.pretrained and not resumed:
        source = checkpoints.read(args.pretrained, args.allow_pickle)
    check_sources(args, resumed, source, use)
    inherited = resumed.recipe if resumed else {}
    probe = args.linear_probe or inherited.get('linear_probe')
    recipe = engine.recipe(args, run, PROBE if probe else RECIPE, inherited)
    if probe and recipe['fsdp'] and not use:
        how = 'leave --fsdp out' if args.fsdp else \
            f"probe its weights in a new --output (--pretrained {resumed.path} --linear-probe)"
        raise ValueError(f"a linear probe trains its head only, which needs no --fsdp: {how}")
    if resumed:  # its model, and (training) its recipe
        saved = dict(resumed.recipe, **resumed.config)
        saved['vit_norm'] = 'fc' if saved.get('fc_norm', True) else 'final'
        given = dict(model_flags(args), fc_norm=None, vit_norm=args.vit_norm)
        if use:  # evaluating at another crop is a use of it
            given['crop_pct'] = None
            given.update(linear_probe=args.linear_probe, probe_block=args.probe_block)
        else:
            given.update(recipe)
        engine.check_changes(run, resumed.path, saved, given, args.accept_changes, use)
    config = model_settings(args, recipe, resumed, source, use)
    if recipe['layer_decay'] is None:
        recipe['layer_decay'] = LAYER_DECAY.get(config.model, 0.9)
    if recipe['drop_path'] is None:  # the official
        recipe['drop_path'] = models.MODELS[config.model]['drop_path'][1]
    unset = [f"--{k.replace('_', '-')} {v!r}" for k, v in PROBE_CHANGES.items()
             if getattr(args, k) is None and not resumed]
    if probe and not use:
        run.print(', '.join(["linear probe: SGD (momentum 0.9)"] + unset))
    return config, recipe, resumed, source


def check_modes(args, run):
    """One use at a time, with what it needs, and a warning naming the training flags given."""
    modes = [f'--{m}' for m in ('eval', 'predict', 'throughput', 'export') if getattr(args, m)]
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(modes)} each run alone: pass one of them")
    if args.export == '':
        raise ValueError("--export needs a folder name")
    if args.predict_csv and not args.predict:
        raise ValueError("--predict-csv writes the predictions of --predict IMG ...: pass both")
    if modes and args.resume and args.pretrained:
        raise ValueError(f"{modes[0]} uses one checkpoint: pass --resume or --pretrained")
    if modes:  # what each mode takes besides its checkpoint (pretrained, linear_probe, probe_block)
        used = {'--eval': ('batch_size', 'amp', 'data_path'), '--predict': ('amp',),
                '--throughput': ('batch_size', 'amp'), '--export': ()}[modes[0]]
        used += ('pretrained', 'linear_probe', 'probe_block')
        engine.warn_unused(run, args, modes[0], RECIPE, used)


def check_sources(args, resumed, source, use):
    """What each mode needs of its checkpoint."""
    if (args.eval or args.predict) and not resumed:
        raise ValueError("--eval and --predict need a fine-tuned checkpoint: pass --resume PATH")
    if (args.eval or args.predict) and not source.config.get('num_classes'):
        raise ValueError(f"'{resumed.path}' holds no classifier (a pretraining checkpoint?): "
                         f"fine-tune it first (--pretrained {resumed.path}), then --eval or "
                         f"--predict with the result")
    if args.export and not source:
        raise ValueError("--export writes trained weights: pass --pretrained (an encoder) or "
                         "--resume (a classifier)")
    read = [p for p in (source and source.path, args.pretrained) if p and os.path.exists(p)]
    if args.export and os.path.exists(args.export) and \
            any(os.path.samefile(args.export, p) for p in read):
        raise ValueError(f"--export '{args.export}' is the checkpoint it would read: name a new "
                         f"folder")
    if args.export:
        checkpoints.check_export(args.export)
    if args.export and args.linear_probe and not resumed:
        raise ValueError("--export writes a trained model: export the probe's checkpoint "
                         "(--resume PATH), or the encoder without --linear-probe")
    if resumed and resumed.kind != 'finetune' and not use:
        fix = "start from it with --pretrained" if args.resume else \
            "give another --output (or --no-auto-resume)"
        raise ValueError(f"'{resumed.path}' is no finetune.py checkpoint, so training cannot "
                         f"resume from it; {fix}")


def model_flags(args):
    """The model config fields the flags give (None: not given)."""
    given = {k: getattr(args, k, None) for k in models.FIELDS}
    given['fc_norm'] = None if args.vit_norm is None else args.vit_norm == 'fc'
    return given


def model_settings(args, recipe, resumed, source, use):
    """The classifier's config: a resumed or used classifier's own; from pretraining weights
    their architecture and preprocessing; the classes of the data."""
    given = model_flags(args)
    saved = source.config if source else {}
    if resumed:
        fields = models.inherit(saved, given, models.FIELDS)
    else:
        keys = FROM_PRETRAINING
        if args.img_size is None and saved.get('img_size') not in (None, 192, 224):
            keys += ('img_size', 'window_size')  # not the ImageNet recipe's 192 -> 224
        fields = models.inherit(saved, given, keys)
    if args.export and source.simmim and given['fc_norm'] is None:  # an encoder: its final norm
        fields['fc_norm'] = False
    if not use or args.eval:
        fields.update(class_fields(args, recipe['data_path'], fields, resumed))
    if args.throughput and not fields['num_classes']:
        fields['num_classes'] = 1000
    config = models.model_config(pretrain=False, **fields)
    family = models.MODELS[config.model]['family']
    if args.vit_norm and family != models.VIT:
        raise ValueError(f"--vit-norm is for ViT models, not {config.model}: leave it out")
    if source and not resumed and family == models.SWINV2:
        windows = pretraining_windows(saved)
        config = dataclasses.replace(config, pretrained_window_sizes=windows)
    depth, block = config.depths[0], recipe['probe_block']
    if block and not (recipe['linear_probe'] and family == models.VIT):
        raise ValueError("--probe-block is for --linear-probe of ViT models (a Swin probe reads "
                         "the last stage)")
    if block and block > depth:
        hint = ("; a probe keeps only the blocks it reads: start afresh (--no-auto-resume or "
                "another --output)" if resumed and not use else '')
        raise ValueError(f"--probe-block {block}, but the model has {depth} blocks{hint}")
    if block:  # the blocks past it go: the config says so
        config = dataclasses.replace(config, depths=(block,))
    return config


def pretraining_windows(saved):
    """SwinV2's per-stage windows in pretraining, which its continuous position bias scales by."""
    c = models.model_config(pretrain=True, **saved)
    res = c.img_size // c.patch_size
    return tuple(min(c.window_size, res // 2 ** i) for i in range(len(c.depths)))


def class_fields(args, data_path, fields, resumed):
    """num_classes and classes: training, the class folders of DATA/train; evaluation, the
    checkpoint's names, else those of DATA/val."""
    if data_path is None or not os.path.isdir(data_path):
        given = f"'{data_path}' is not a folder: " if data_path else ''
        raise ValueError(f"give --data-path {given}a folder with train/ and val/ class folders "
                         f"(the demo: --data-path demo)")
    for split in ['val'] if args.eval else ['train', 'val']:
        if not os.path.isdir(os.path.join(data_path, split)):
            raise ValueError(f"--data-path '{data_path}' has no {split}/ folder; fine-tuning "
                             f"needs train/ and val/, each with one folder of images per class")
    classes = fields['classes']
    if not classes or not resumed:
        folder = os.path.join(data_path, 'val' if args.eval else 'train')
        classes = sorted(d.name for d in os.scandir(folder)
                         if d.is_dir() and not d.name.startswith('.'))
    num_classes = fields['num_classes'] or len(classes)
    if len(classes) > num_classes:  # labels past the classifier's outputs
        shown = ', '.join(classes[:5]) + ', ...' * (len(classes) > 5)
        raise ValueError(f"{num_classes} classes (--num-classes or the checkpoint's), but "
                         f"{len(classes)} class folders ({shown}); leave --num-classes out to "
                         f"count the folders")
    return dict(classes=classes, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# Model and data

def load_data(args, config, recipe):
    """DATA/train (unless --eval) and DATA/val as class-folder datasets, checked now."""
    normalize = data.ToNormalizedTensor(config.mean, config.std)
    augmented = recipe['aa'] and not args.eval
    if augmented and config.in_chans not in (1, 3):
        raise ValueError(f"RandAugment (--aa) works on 1- or 3-channel images, not "
                         f"{config.in_chans}: pass --aa ''")
    mixed = recipe['mixup'] > 0 or recipe['cutmix'] > 0
    if not args.eval and mixed and recipe['batch_size'] % 2:
        raise ValueError(f"mixup/cutmix need an even --batch-size, got {recipe['batch_size']}")
    transforms = {}
    if not args.eval:
        transforms['train'] = data.finetune_transform(
            config.img_size, normalize, recipe['aa'], recipe['reprob'], recipe['scale'],
            recipe['hflip'], recipe['color_jitter'])
    transforms['val'] = data.eval_transform(config.img_size, normalize, config.crop_pct)
    datasets = {}
    for split, transform in transforms.items():
        folder = os.path.join(recipe['data_path'], split)
        datasets[split] = data.ImageDataset(folder, transform, config.in_chans, config.classes,
                                            config.intensity)
        datasets[split].load(0)  # a readable image now, not in a loader worker
        labels = torch.bincount(torch.from_numpy(datasets[split].labels), minlength=len(
            config.classes))
        empty = [c for c, n in zip(config.classes, labels.tolist()) if n == 0]
        if split == 'train' and empty:
            raise ValueError(f"class folder(s) without images in '{folder}': "
                             f"{', '.join(empty[:5])}; add images or remove the folder")
    return datasets


def build_model(config, recipe, args, train):
    """The classifier of config; for training a linear probe, frozen with the probe's head."""
    model = models.build_classifier(config, drop_path_rate=recipe['drop_path'],
                                     use_checkpoint=args.use_checkpoint)
    if train and recipe['linear_probe']:
        models.linear_probe(model)
    return model


def load_weights(model, config, source, resumed, run):
    """The weights of a used checkpoint or of the pretraining into model (a resumed training's
    are fit's to load); a probe takes only the blocks it keeps."""
    block = lambda k: re.match(r'blocks\.(\d+)\.', k)
    state = {k: v for k, v in source.state.items()
             if not block(k) or int(block(k)[1]) < config.depths[0]}
    line = dataclasses.replace(source, state=state).load_into(model)
    saved = source.saved
    if source is resumed and source.recipe:  # a classifier of ours, used
        line = f"loaded {source.path} (epoch {saved.get('epoch')}"
        if saved.get('step') == saved.get('steps_per_epoch') and 'acc1' in saved:  # its top-1
            line += f", top-1 {saved['acc1']:.2f}"
        line += ')'
    run.print(line)


# ---------------------------------------------------------------------------------------------
# The run: use or fine-tune

def start(args, run):
    """Decide the settings, load the model, then export, predict, measure, evaluate or train."""
    config, recipe, resumed, source = settings(args, run)
    use = args.eval or args.predict or args.throughput or args.export
    datasets = load_data(args, config, recipe) if not use or args.eval else {}
    run.print(f"input: {config.img_size}px, {config.in_chans} channels, mean {list(config.mean)} "
              f"std {list(config.std)} of 0-1 pixels, intensity {config.intensity}; evaluation "
              f"crop {config.crop_pct}")
    if args.eval and not source.config.get('classes') and len(config.classes) != \
            config.num_classes:
        run.print(f"warning: '{resumed.path}' names no classes: its outputs 0-"
                  f"{len(config.classes) - 1} are taken for the {len(config.classes)} class "
                  f"folders in sorted order, of its {config.num_classes}")
    torch.manual_seed(recipe['seed'])  # the new head's initialisation
    model = build_model(config, recipe, args, train=not use)
    if source and (use or not resumed):
        load_weights(model, config, source, resumed, run)
    if args.export:
        if run.main:
            call = checkpoints.export(model, config, args.export)
            run.print(f"wrote {args.export}; in timm: {call}")
        return
    model.to(run.device)
    models.use_fused_attention(model, run.device.type == 'cuda')
    _, amp = engine.autocast(args.amp, run.device)
    if args.predict:
        if run.main:
            predict(model, args.predict, args.predict_csv, amp)
        return
    if args.throughput:
        return throughput(model, config, recipe['batch_size'], run, amp)
    val_loader = data.build_loader(datasets['val'], recipe['batch_size'], args.num_workers,
                                   recipe['seed'], run.world_size, run.rank, train=False)
    if args.eval:
        stats = evaluate(model, val_loader, run, amp)
        return report(stats, config, recipe['data_path'], run)
    finetune(args, run, config, recipe, model, datasets['train'], val_loader, resumed)


def finetune(args, run, config, recipe, model, train_set, val_loader, resumed):
    loader = data.build_loader(train_set, recipe['batch_size'], args.num_workers, recipe['seed'],
                               run.world_size, run.rank)
    schedule = engine.Schedule(recipe, len(loader), run.world_size)
    # AdamW with layer-wise lr decay (a probe: SGD), the per-step schedule with linear warmup
    momentum = 0.9 if recipe['linear_probe'] else None
    trainer = engine.Trainer(model, schedule, recipe, args, run, momentum)
    mixup, criterion = mixing(recipe, config.num_classes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.print(f"{config.model}: {trainable:,} trainable parameters, {config.img_size}px, "
              f"{config.num_classes} classes; {len(train_set):,} training and "
              f"{len(val_loader.dataset):,} validation images in {recipe['data_path']}")
    how = 'linear probe' if recipe['linear_probe'] else f"layer decay {recipe['layer_decay']}"
    run.print(f"{schedule}; amp {trainer.amp}; device {run.device}; {how}")

    # the loss: cross-entropy on mixed images and soft labels
    def loss_fn(batch):
        images, targets, _ = batch
        images = images.to(run.device, non_blocking=True)
        targets = targets.to(run.device, non_blocking=True)
        if mixup:
            images, targets = mixup(images, targets)
        return criterion(trainer.wrapped(images), targets)

    # after each epoch: validation; best.pth by top-1 (ties: the lower validation loss)
    saved = resumed.saved if resumed else {}
    entries = dict(kind='finetune', config=dataclasses.asdict(config), recipe=recipe,
                   max_accuracy=saved.get('max_accuracy', 0.),
                   best_loss=saved.get('best_loss', math.inf))

    def end_epoch(epoch, numbered):
        stats = evaluate(model, val_loader, run, trainer.autocast, trainer.sharded)
        best = (stats['acc1'], -stats['loss']) > (entries['max_accuracy'], -entries['best_loss'])
        if epoch == 0 or best:
            entries.update(max_accuracy=stats['acc1'], best_loss=stats['loss'])
        run.print(f"epoch {epoch} validation: {accuracy_line(stats)}; best top-1 "
                  f"{entries['max_accuracy']:.2f}%")
        if len(stats['confusion']) > 100:  # ImageNet's would be a million numbers per epoch
            del stats['confusion']
        record = {f'val_{k}': v for k, v in stats.items()}
        run.log(dict(epoch=epoch, **record, max_accuracy=entries['max_accuracy']),
                (epoch + 1) * schedule.steps_per_epoch)
        entries['acc1'] = stats['acc1']
        return ['best.pth'] if epoch == 0 or best else []

    if engine.fit(trainer, loader, loss_fn, resumed, entries, end_epoch):
        run.print(f"done: best top-1 {entries['max_accuracy']:.2f}%; checkpoints and log.jsonl "
                  f"are in {args.output}")


def mixing(recipe, num_classes):
    """(timm's Mixup or None, the loss it needs)."""
    r = recipe
    if r['mixup'] > 0 or r['cutmix'] > 0:
        mixup = Mixup(mixup_alpha=r['mixup'], cutmix_alpha=r['cutmix'], prob=r['mixup_prob'],
                      switch_prob=r['mixup_switch_prob'], label_smoothing=r['smoothing'],
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if r['smoothing'] > 0:
        return None, LabelSmoothingCrossEntropy(r['smoothing'])
    return None, nn.CrossEntropyLoss()


# ---------------------------------------------------------------------------------------------
# Evaluation and use

@torch.no_grad()
def evaluate(model, loader, run, amp_context, sharded=False):
    """Over all ranks, every readable validation image once: loss, top-1 and top-5 (%; top-5 with
    more than 5 classes), per-class top-1 (%; None: no images) and the confusion matrix (rows:
    true class, columns: predicted). A sharded model's forward gathers its weights from every
    rank, so there the ranks with fewer batches run uncounted ones until all ran as many."""
    model.eval()
    k = model.num_classes
    totals = torch.zeros(3, dtype=torch.float64, device=run.device)  # loss, top-5 hits, images
    confusion = torch.zeros(k * k, dtype=torch.float64, device=run.device)
    extra = 0  # forwards to run beyond this rank's batches
    if sharded:
        most = torch.tensor(len(loader), device=run.device)
        dist.all_reduce(most, dist.ReduceOp.MAX)
        extra = int(most) - len(loader)
    for images, targets, skipped in loader:
        readable = (skipped == 0).to(run.device)  # an unreadable file's stand-in: not counted
        images = images.to(run.device, non_blocking=True)
        targets = targets.to(run.device, non_blocking=True)
        with amp_context:
            logits = model(images).float()
        loss = F.cross_entropy(logits, targets, reduction='none')
        top5 = logits.topk(min(5, k), 1).indices.eq(targets[:, None]).any(1)
        sums = [(loss * readable).sum(), (top5 & readable).sum(), readable.sum()]
        totals += torch.stack(sums).double()
        confusion.index_add_(0, targets * k + logits.argmax(1), readable.double())  # no wait
    if extra:
        image = loader.dataset[0][0][None].to(run.device)
        for _ in range(extra):
            with amp_context:
                model(image)
    if run.distributed:
        dist.all_reduce(totals)
        dist.all_reduce(confusion)
    confusion = confusion.view(k, k).long()
    (loss, top5, n), hits = totals.tolist(), confusion.diag()
    counts = confusion.sum(1).tolist()
    per_class = [100 * h / c if c else None for h, c in zip(hits.tolist(), counts)]
    return dict(loss=loss / max(n, 1), acc1=100 * hits.sum().item() / max(n, 1),
                acc5=100 * top5 / max(n, 1) if k > 5 else None, images=int(n),
                per_class=per_class, confusion=confusion.tolist())


def accuracy_line(stats):
    """'top-1 ..% [top-5 ..%] loss .. on N images'"""
    top5 = f"top-5 {stats['acc5']:.2f}% " if stats['acc5'] is not None else ''
    return f"top-1 {stats['acc1']:.2f}% {top5}loss {stats['loss']:.4f} on {stats['images']} images"


def report(stats, config, data_path, run):
    """--eval's lines: the accuracy, per class, and the confusion matrix of up to 20 classes."""
    classes = models.class_names(config.num_classes, config.classes)
    per_class = [f"{c} {'no images' if a is None else f'{a:.1f}%'}"
                 for c, a in zip(classes[:50], stats['per_class'])]
    run.print(f"{accuracy_line(stats)} of {data_path}/val; per class: " + ', '.join(per_class))
    if len(classes) <= 20:
        rows = [f"{name:>20.20} " + ' '.join(f'{n:6d}' for n in row)
                for name, row in zip(classes, stats['confusion'])]
        run.print('confusion matrix (rows: true class, columns: predicted):\n' + '\n'.join(rows))


@torch.no_grad()
def throughput(model, config, batch_size, run, amp_context, steps=10):
    model.eval()
    size = config.img_size
    x = torch.randn(batch_size, config.in_chans, size, size, device=run.device)
    times = []
    for _ in range(steps + 3):
        start = time.perf_counter()
        with amp_context:
            model(x)
        if run.device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times[3:])[steps // 2]
    run.print(f"throughput: {batch_size / seconds:.1f} images/s ({config.model}, {size}px, batch "
              f"{batch_size}, median of {steps} forward passes, {run.device})")


@torch.no_grad()
def classify(model, image, k=5, autocast=contextlib.nullcontext()):
    """One image file -> its top-k [(class name, probability)], preprocessed by
    model.pretrained_cfg (a model of checkpoints.load_model, of this script, or timm's)."""
    cfg, num_classes = model.pretrained_cfg, getattr(model, 'num_classes', 0)
    if not num_classes:
        raise ValueError("classify needs a classifier; these are pretraining weights or an "
                         "encoder without head (models.extract_features reads their features)")
    names = models.class_names(num_classes, cfg.get('label_names'))
    chans, size = cfg['input_size'][:2]
    normalize = data.ToNormalizedTensor(cfg['mean'], cfg['std'])
    transform = data.eval_transform(size, normalize, cfg['crop_pct'])
    pixels = data.load_image(image, chans, cfg.get('intensity', 'type'))  # timm's: the default
    x = transform(pixels)[None].to(next(model.parameters()).device)
    with autocast:
        probs = model.eval()(x).float().softmax(1)[0]
    top = probs.topk(min(k, len(probs)))
    return [(names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]


def predict(model, paths, csv_path, amp_context, k=5):
    """Print each image's top-k classes (k up to the number of classes); to csv_path too."""
    rows, k = [], min(k, model.num_classes)
    try:
        files = data.image_files(paths)
    except ValueError as e:
        raise ValueError(f"--predict: {e}") from None
    target = csv_path and os.path.abspath(csv_path)
    why = target and ('is one of the images' if target in map(os.path.abspath, files) else
                      'is a folder' if os.path.isdir(target) else
                      'is in no folder that exists' if not os.path.isdir(os.path.dirname(target))
                      else None)
    if why:
        raise ValueError(f"--predict-csv '{csv_path}' {why}: name a new file in an existing "
                         f"folder")
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
    if csv_path:
        header = ['image'] + [f'{v}_{i + 1}' for i in range(k) for v in ('class', 'score')]
        table = io.StringIO()
        csv.writer(table).writerows([header] + rows)
        checkpoints.save_atomic(lambda f: f.write(table.getvalue().encode()), csv_path)
        print(f"wrote {csv_path}")


if __name__ == '__main__':
    main(get_args_parser().parse_args())
