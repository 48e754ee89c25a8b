"""Checkpoint files. read() takes any supported file, Hugging Face folder, Hugging Face model id or
published name into one Checkpoint, its weights converted to timm's layout once; save() writes ours
whole, with a checksum; find_resume() is the auto-resume search; export() writes a classifier or
encoder as timm's Hugging Face folder; load_model() gives the model of any checkpoint, for Python.

    model = load_model('swin-base-w6_simmim-100e-pre_8xb256-coslr-100e_in1k-192px')   # eval mode
    ckpt = read('output/simmim_pretrain/checkpoint.pth')   # .config, .state, .recipe, .saved
"""
import dataclasses
import difflib
import errno
import json
import os
import pickle
import re
import shutil
import tempfile
import urllib.error
import warnings
import zlib

import filelock  # installed with torch
import timm
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import models


class Corrupt(ValueError):
    """A checkpoint that cannot be read whole: auto-resume passes over it."""


class PickledCheckpoint(ValueError):
    """A checkpoint holding pickled Python objects, read without allow_pickle."""


class DownloadError(ValueError):
    """A published checkpoint that could not be downloaded whole."""


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint as read: its model, and for ours the recipe that trained it."""
    path: str
    config: dict   # the models.ModelConfig fields it states or its weights show
    state: dict    # its weights in timm's layout (models.to_timm_layout)
    layout: str    # 'ours', 'microsoft', 'mmpretrain', 'huggingface' or 'timm'
    recipe: dict   # ours: the settings a resumed run keeps; else empty
    saved: dict    # the file's dict (ours: model, optimizer, trainer, epoch, step, ...)
    continues: bool = False  # OUTPUT's, found by auto-resume: the series of runs it continues

    @property
    def kind(self):
        """'pretrain' or 'finetune' for a training checkpoint of ours, else None."""
        training = 'optimizer' in self.saved or 'sharded' in self.saved
        return self.saved.get('kind') if training else None

    @property
    def simmim(self):
        """Pretraining weights: with a decoder."""
        return any(k.startswith('decoder.') for k in self.state)

    def load_into(self, model):
        """These weights into model (models.load_pretrained). -> the report, one line."""
        try:
            report = models.load_pretrained(model, self.state)
        except ValueError as e:
            raise ValueError(f"'{self.path}': {e}; pass the --model and architecture flags it was "
                             f"trained with") from None
        dropped = ', '.join(sorted({k.split('.')[0] for k in report['dropped']})) or '-'
        line = (f"{self.path}: {len(report['loaded'])} tensors loaded, {len(report['resized'])} "
                f"position tables resized, new: {', '.join(report['missing']) or '-'}, dropped: "
                f"{len(report['dropped'])} ({dropped})")
        if report['adapted']:
            line += f"; patch embedding adapted from {report['adapted'][1]} (timm's rule)"
        return line


# ---------------------------------------------------------------------------------------------
# Reading

def read(path, allow_pickle=False, consolidate=True):
    """A .pth / .pt / .bin / .safetensors file, a Hugging Face model folder (timm's or
    transformers'), a Hugging Face model id (owner/name[@revision]) or a published name
    (downloaded once) -> Checkpoint, its checksum verified. Pickled objects (official checkpoints'
    yacs config) are refused unless allow_pickle: unpickling runs the file's code. A sharded
    checkpoint's (--fsdp) shards are verified too, and its weights gathered whole unless
    consolidate is False (resuming it)."""
    path = os.fspath(path)
    saved = load_file(path, allow_pickle)
    if not isinstance(saved, dict):
        raise Corrupt(f"'{path}' holds a {type(saved).__name__}, not a checkpoint (a dict of "
                      f"weights)")
    if 'checksum' in saved and saved.pop('checksum') != checksum(saved):
        raise Corrupt(f"checkpoint '{path}' is corrupted: its contents do not match the checksum "
                      f"saved with them (a bad copy or failing storage); resume from an earlier "
                      f"one (--resume OUTPUT/ckpt_epoch_N.pth)")
    if isinstance(saved.get('args'), dict):  # ours, as saved before the config: its flags
        saved = from_flags(saved)
    if 'sharded' in saved:
        verify_shards(path, saved['sharded'])
        if consolidate:
            saved = dict(saved, model=gather_weights(shard_folder(path, saved['sharded'])))
    state, layout = models.to_timm_layout(saved)
    if 'recipe' in saved:  # ours
        return Checkpoint(path, saved['config'], state, 'ours', saved['recipe'], saved)
    try:
        config = models.infer_arch(state)
    except (KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"'{path}' is not a Swin, SwinV2 or ViT checkpoint that this code knows "
                         f"(no {e})") from None
    config.update(exported_preprocessing(saved))
    return Checkpoint(path, config, state, layout, {}, saved)


def load_file(path, allow_pickle):
    """The dict of a file, a folder, a published name or a Hugging Face id, as torch or
    safetensors reads it."""
    if not os.path.exists(path):
        cached = download(path)
        try:
            return load_file(cached, allow_pickle)
        except PickledCheckpoint:
            raise
        except Exception as e:
            hub = HUB_ID.fullmatch(path)
            fix = f'hf cache rm model/{hub[1]}' if hub and path not in PUBLISHED else 'delete it'
            raise DownloadError(f"the downloaded '{path}' in {cached} cannot be read "
                                f"({first_line(e).split(';')[0]}): {fix} to download it again; "
                                f"if it fails again, the published file is not a checkpoint") \
                from None
    if os.path.isdir(path):
        return load_folder(path, allow_pickle)
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file as load_safetensors  # installed with timm
            return load_safetensors(path)
        return torch.load(path, map_location='cpu', weights_only=not allow_pickle)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR):  # not damaged
            raise ValueError(f"cannot read '{path}': {e.strerror or e}") from None
        raise Corrupt(f"cannot load checkpoint '{path}' ({first_line(e)}); it is truncated, "
                      f"corrupted or not a PyTorch checkpoint") from None
    except Exception as e:  # torch's text for no checkpoint advises weights_only=False: not shown
        found = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        if found:
            raise PickledCheckpoint(
                f"'{path}' holds pickled Python objects ({found[1]}), as official SimMIM "
                f"checkpoints store their config; loading them (allow_pickle=True, "
                f"--allow-pickle) runs code from the file: only for files you trust") from None
        other = isinstance(e, (pickle.UnpicklingError, KeyError, UnicodeDecodeError))
        why = 'not a PyTorch file' if other else first_line(e)
        raise Corrupt(f"cannot load checkpoint '{path}' ({why}); it is truncated, corrupted or "
                      f"not a PyTorch checkpoint") from None


def load_folder(path, allow_pickle):
    """A Hugging Face model folder (timm's or transformers'): model.safetensors or
    pytorch_model.bin, with config.json."""
    files = [os.path.join(path, f) for f in ('model.safetensors', 'pytorch_model.bin')]
    found = [f for f in files if os.path.isfile(f)]
    if not found:
        ours = ' (a run of ours: pass its checkpoint.pth)' if os.path.isfile(
            os.path.join(path, 'checkpoint.pth')) else ''
        raise ValueError(f"'{path}' is a folder without model.safetensors or pytorch_model.bin"
                         f"{ours}")
    weights = load_file(found[0], allow_pickle)
    config = os.path.join(path, 'config.json')
    if not os.path.isfile(config):
        return weights
    try:
        with open(config) as f:
            return dict(model=weights, hf_config=json.load(f))
    except ValueError as e:
        raise ValueError(f"'{config}' is not JSON ({e})") from None


def from_flags(saved):
    """A checkpoint of ours as saved before the config (vars(args)) -> as saved now. The flags
    serve as the recipe: a resumed run compares those it has."""
    args = saved['args']
    config = {k: args[k] for k in models.FIELDS if args.get(k) is not None}
    if 'vit_norm' in args:
        config['fc_norm'] = args['vit_norm'] != 'final'
    kind = 'pretrain' if 'mask_ratio' in args else 'finetune'
    recipe = {k: v for k, v in args.items() if v is not None}  # None: not given, unknown
    recipe['linear_probe'] = bool(args.get('linear_probe'))
    for key in ('data_path', 'pretrained'):  # as given, relative to where the run started
        if recipe.get(key) and os.path.exists(recipe[key]):
            recipe[key] = os.path.abspath(recipe[key])
    if recipe.get('drop_path') is None and config.get('model') in models.MODELS:  # the official
        recipe['drop_path'] = models.MODELS[config['model']]['drop_path'][kind == 'finetune']
    return dict(saved, config=config, recipe=recipe, kind=kind,
                steps_per_epoch=args.get('steps_per_epoch'))


def exported_preprocessing(saved):
    """The config fields an export states: a timm Hugging Face folder's config.json (its
    pretrained_cfg, label names and our intensity), or an export .pth of ours before folders."""
    hub = saved.get('hf_config') or {}
    cfg = hub.get('pretrained_cfg', saved.get('pretrained_cfg'))
    if not (isinstance(cfg, dict) and 'input_size' in cfg):
        return {}  # transformers' config.json: its weights say it all
    chans, _, size = cfg['input_size']
    labels = hub.get('label_names') or cfg.get('label_names') or None
    if isinstance(labels, dict):  # timm's id -> name, maybe with gaps
        named = {int(k): v for k, v in labels.items()}
        labels = [named.get(i, f'class {i}') for i in range(max(named) + 1)]
    intensity = hub.get('intensity', saved.get('intensity'))
    if cfg.get('interpolation', 'bicubic') != 'bicubic':
        warnings.warn(f"its preprocessing resizes {cfg['interpolation']}; this code resizes "
                      f"bicubic (outputs may differ a little)")
    return dict(in_chans=chans, img_size=size, mean=cfg['mean'], std=cfg['std'],
                crop_pct=cfg.get('crop_pct'), intensity=intensity, classes=labels)


def first_line(error):
    """An error's text up to its first line or sentence end, at most 200 characters."""
    return re.split(r'\n|(?<=\w)\. ', str(error) or type(error).__name__)[0][:200]


# ---------------------------------------------------------------------------------------------
# Saving

def save_atomic(write, path):
    """write(file) into path.tmp, flushed to disk, then renamed over path: path is always whole
    or absent. A failed write (a full disk; torch reports it as a RuntimeError) removes path.tmp
    and is a ValueError saying so."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # SIGTERM, Ctrl-C: no .tmp left either
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        causes = (e, e.__cause__, e.__context__)
        cause = next((c for c in causes if isinstance(c, OSError)), e)
        reason = getattr(cause, 'strerror', None) or str(cause).splitlines()[0][:200]
        full = getattr(cause, 'errno', None) == 28  # ENOSPC
        fix = 'free some space' if full else 'fix the path or the folder'
        kept = '; the previous file is intact' if os.path.isfile(path) else ''
        raise ValueError(f"could not write {path} ({reason}){kept}: {fix} and rerun the same "
                         f"command") from None


def checksum(obj):
    """CRC-32 of a checkpoint's payload: every tensor's bytes, shapes and dtypes, every value."""
    crc, rest = 0, []

    def walk(o):
        nonlocal crc
        if isinstance(o, torch.Tensor):
            data = o.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
            crc = zlib.crc32(data, crc)
            rest.append(f'{tuple(o.shape)}{o.dtype}')
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                rest.append(repr(k))
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        else:
            rest.append(repr(o))
    walk(obj)
    return zlib.crc32(''.join(rest).encode(), crc)


def save(folder, entries, copies=()):
    """folder/checkpoint.pth = entries with their checksum, then copies of it named copies (e.g.
    ckpt_epoch_N.pth); each written atomically."""
    latest = os.path.join(folder, 'checkpoint.pth')
    save_atomic(lambda f: torch.save(dict(entries, checksum=checksum(entries)), f), latest)
    for name in copies:
        copy(latest, os.path.join(folder, name))


def copy(path, to):
    """The file at path copied to `to`, atomically."""
    with open(path, 'rb') as source:
        save_atomic(lambda f: shutil.copyfileobj(source, f), to)


def save_sharded(folder, entries, copies=()):
    """A checkpoint whose weights and optimizer state are sharded (FSDP), whole or absent: every
    rank writes its shards (torch.distributed.checkpoint) into a new OUTPUT/shards-EPOCH.STEP-ID
    and the CRC-32s of a share of the files; then rank 0 writes checkpoint.pth, the manifest
    naming them with the rest of entries, and its copies. Shard folders no manifest names (a save
    killed midway, or replaced) are deleted; a folder some manifest names is never written."""
    token = [os.urandom(3).hex()]
    dist.broadcast_object_list(token, src=0)
    name = f"shards-{entries['epoch']}.{entries['step']}-{token[0]}"
    path, rank, world = os.path.join(folder, name), dist.get_rank(), dist.get_world_size()
    try:
        unwrapped(dcp.save, dict(model=entries['model'], optimizer=entries['optimizer']),
                  checkpoint_id=path)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"could not write {path} ({first_line(e)}); the previous checkpoint is "
                         f"intact: fix the folder or free some space, and rerun") from None
    files = sorted(os.listdir(path))
    crcs = [None] * world
    dist.all_gather_object(crcs, {f: file_crc(os.path.join(path, f)) for f in files[rank::world]})
    if rank == 0:
        manifest = {k: v for k, v in entries.items() if k not in ('model', 'optimizer')}
        manifest['sharded'] = dict(folder=name, files={k: v for c in crcs for k, v in c.items()})
        save(folder, manifest, copies)
        named = [manifest_of(os.path.join(folder, f)) for f in os.listdir(folder)]
        kept = {name} | {m['sharded']['folder'] for m in named if m and 'sharded' in m}
        for old in os.listdir(folder):
            if old.startswith('shards-') and old not in kept:
                shutil.rmtree(os.path.join(folder, old), ignore_errors=True)
    dist.barrier()


def manifest_of(path):
    """The dict of a .pth (a sharded checkpoint's manifest), or None; memory-mapped, so a whole
    checkpoint's weights are not read."""
    if not path.endswith('.pth'):
        return None
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:
        return None


def unwrapped(call, *args, **kwargs):
    """A torch.distributed.checkpoint call whose CheckpointException (a BaseException holding
    each rank's error) is raised as the first rank's error."""
    try:
        return call(*args, **kwargs)
    except CheckpointException as e:
        raise next(iter(e.failures.values()))[0] from None


def file_crc(path):
    crc = 0
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(2 ** 24), b''):
            crc = zlib.crc32(chunk, crc)
    return crc


def shard_folder(path, sharded):
    return os.path.join(os.path.dirname(os.path.abspath(path)), sharded['folder'])


def verify_shards(path, sharded):
    """Corrupt unless every shard file is whole (its CRC-32); under torchrun each rank checks a
    share of the files and they agree."""
    folder, files = shard_folder(path, sharded), sorted(sharded['files'])
    if not os.path.isdir(folder):
        raise Corrupt(f"checkpoint '{path}' names its shards' folder {folder}, which is missing: "
                      f"copy it beside the checkpoint (a checkpoint.pth of --fsdp is a manifest)")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    bad = []
    for f in files[rank::world]:
        full = os.path.join(folder, f)
        if not os.path.isfile(full) or file_crc(full) != sharded['files'][f]:
            bad.append(f)
    counts = [len(bad)]
    if world > 1:
        counts = [None] * world
        dist.all_gather_object(counts, len(bad))
    if sum(counts):
        raise Corrupt(f"checkpoint '{path}' is corrupted: {sum(counts)} of its shard files in "
                      f"{folder} are missing or damaged (e.g. {(bad or ['on another rank'])[0]}); "
                      f"resume from an earlier one (--resume OUTPUT/ckpt_epoch_N.pth)")


def load_shards(checkpoint, state):
    """Fill state ({'model': ..., 'optimizer': ...}, FSDP's sharded state dicts) from a sharded
    checkpoint, resharded to this run's processes."""
    folder = shard_folder(checkpoint.path, checkpoint.saved['sharded'])
    try:
        unwrapped(dcp.load, state, checkpoint_id=folder)
    except (OSError, AssertionError) as e:  # verified, then gone: another run's save
        raise Corrupt(f"cannot read {folder} ({first_line(e)}); if another run saves into this "
                      f"folder, give each run its own --output") from None


def gather_weights(folder):
    """The whole model weights of a sharded checkpoint, on the CPU."""
    reader = dcp.FileSystemReader(folder)
    tensors = reader.read_metadata().state_dict_metadata
    model = {k[len('model.'):]: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in tensors.items()
             if k.startswith('model.') and isinstance(m, dcp.metadata.TensorStorageMetadata)}
    with warnings.catch_warnings():  # that it reads in one process, as asked
        warnings.simplefilter('ignore')
        unwrapped(dcp.load, dict(model=model), storage_reader=reader, no_dist=True)
    return model


def find_resume(output, resume, auto=True, training=True, allow_pickle=False, say=print):
    """The checkpoint to resume: resume (a path or name), else OUTPUT's newest intact one when auto
    (checkpoint.pth, else the newest ckpt_epoch_N.pth); in training OUTPUT's also when a run of the
    same resume saved it there (the same command, rerun, continues its own progress). The search
    passes over a corrupted or missing checkpoint.pth, saying so, and over the checkpoints of
    runs before the series last started in OUTPUT (a fresh start, or a --resume): with none of
    its own, that series starts again from where it started. -> Checkpoint or None."""
    latest = os.path.join(output, 'checkpoint.pth')
    numbered = {}
    for name in os.listdir(output) if os.path.isdir(output) else []:
        found = re.fullmatch(r'ckpt_epoch_(\d+)\.pth', name)
        if found:
            numbered[int(found[1])] = os.path.join(output, name)
    auto = auto and (os.path.isfile(latest) or bool(numbered))
    record = run_record(output) or {}
    started_from = record.get('started_from', (record.get('args') or {}).get('resume'))
    same = lambda a, b: a == b or a and b and os.path.abspath(a) == os.path.abspath(b)
    if resume and auto and training and same(started_from, resume):
        say(f"{output} holds the progress of a run started from --resume {resume}: continuing it")
    elif resume:
        return read(resume, allow_pickle, consolidate=False)
    if not auto:
        return None
    if not os.path.isfile(latest):
        say(f"{latest} is missing: passed over")
    candidates = [latest] * os.path.isfile(latest) + [numbered[e] for e in sorted(numbered)[::-1]]
    series = record.get('series')  # None (no args.json, or older ones): any is its own
    corrupt = earlier = False
    for path in candidates:
        try:
            found = read(path, allow_pickle, consolidate=False)
        except Corrupt as e:
            say(f"{str(e).split(';')[0]}: passed over")
            corrupt = True
            continue
        if not training or series is None or found.saved.get('series') == series:
            return dataclasses.replace(found, continues=True)
        say(f"{path} is of a run before the one last started in {output}: passed over")
        earlier = True
    if resume:  # none of its own: from where it started
        return read(resume, allow_pickle, consolidate=False)
    if corrupt:
        which = 'intact checkpoint of the run last started' if earlier else 'intact checkpoint'
        raise ValueError(f"no {which} in {output}; start afresh with --no-auto-resume")
    return None


def run_record(output):
    """OUTPUT/args.json, written by the run that last started there, or None if unreadable."""
    try:
        with open(os.path.join(output, 'args.json')) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# ---------------------------------------------------------------------------------------------
# Use: export to timm, load_model

EXPORTED = {'config.json', 'model.safetensors', 'pytorch_model.bin', 'README.md', '.gitattributes'}


def check_export(folder):
    """A ValueError unless folder is a new or empty one, or an export to replace."""
    if folder.lower().endswith(FILE_TYPES):
        raise ValueError(f"--export writes a folder (timm's Hugging Face format: config.json and "
                         f"model.safetensors), not a file: name a folder, e.g. "
                         f"{os.path.splitext(folder)[0]}/")
    if os.path.commonpath([os.getcwd(), os.path.abspath(folder)]) == os.path.abspath(folder):
        raise ValueError(f"--export '{folder}' holds the current folder: name a new folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--export '{folder}' is a file: name a new folder")
    if os.path.isdir(folder) and not set(os.listdir(folder)) <= EXPORTED:
        raise ValueError(f"--export '{folder}' holds other files than an export: name a new "
                         f"folder (an export's is replaced)")


def export(model, config, folder):
    """Write a classifier or a head-less encoder (a linear probe's BatchNorm folded into its head)
    as timm's save_for_hf writes a model: folder/config.json (the timm architecture and arguments,
    the preprocessing as pretrained_cfg, the label names, our intensity rule) and
    folder/model.safetensors, the folder whole or as it was. -> how to load it in timm."""
    from timm.models._hub import save_for_hf
    check_export(folder)
    timm_name = models.MODELS[config.model]['timm']
    if not timm_name:
        raise ValueError(f"timm has no {config.model} (its SwinV2 lacks the extra norms): "
                         f"export is for the other models")
    kw = models.timm_kwargs(config)
    kw.pop('init_values', None)  # the timm name's own
    if models.MODELS[config.model]['family'] == models.VIT:
        kw['use_fc_norm'] = config.fc_norm
    theirs = timm.create_model(timm_name, num_classes=config.num_classes, **kw)
    theirs.load_state_dict(models.to_timm_layout(model.state_dict())[0])  # all of it, strictly
    ours = models.pretrained_cfg(config)
    extra = dict(label_names=ours.pop('label_names'), intensity=ours.pop('intensity'))
    kept = ('architecture', 'first_conv', 'classifier', 'fixed_input_size')  # not its tag, license
    theirs.pretrained_cfg = dict({k: theirs.pretrained_cfg[k] for k in kept}, **ours)
    write = lambda tmp: save_for_hf(theirs, tmp, model_config=extra, model_args=kw,
                                    safe_serialization=True)
    replace_folder(write, folder, keep=('README.md', '.gitattributes'))  # a model card stays
    return f"timm.create_model('local-dir:{folder}', pretrained=True)"


def replace_folder(write, folder, keep=()):
    """write(tmp) fills a new hidden folder beside folder, which then takes folder's place with
    the old one's files named in keep: folder is whole, the old or the new (absent only between
    two renames). Its files readable as the umask says (safetensors writes 0600)."""
    folder = os.path.realpath(folder)  # a link: its target is replaced
    parent, name = os.path.split(folder)
    mask = os.umask(0)
    os.umask(mask)
    tmp = old = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f'.{name}.', dir=parent)
        write(tmp)
        for f in keep:
            if os.path.isfile(os.path.join(folder, f)):
                shutil.copy2(os.path.join(folder, f), tmp)
        for f in os.listdir(tmp):
            os.chmod(os.path.join(tmp, f), 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=f'.{name}.old.', dir=parent)
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:
            if old:  # put the old one back
                os.replace(old, folder)
                old = None
            raise
        tmp = None
    except OSError as e:
        raise ValueError(f"could not write {folder} ({e.strerror or e}): fix the path or free "
                         f"some space, and rerun") from None
    finally:
        for path in (tmp, old):
            if path:
                shutil.rmtree(path, ignore_errors=True)


def load_model(path, allow_pickle=False):
    """A checkpoint (a file, a Hugging Face folder or a published name) -> its model, in eval
    mode: a classifier at its own size (an export without head: the encoder), or the SimMIM model
    of pretraining weights (extract_features reads its encoder, reconstruct draws).
    model.pretrained_cfg: its preprocessing (timm's keys) and 'intensity'."""
    ckpt = read(path, allow_pickle)
    config = models.model_config(pretrain=ckpt.simmim, **ckpt.config)
    build = models.build_simmim if ckpt.simmim else models.build_classifier
    model = build(config)
    models.load_pretrained(model, ckpt.state)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Downloads: published names (mmpretrain's, with torch.hub's hash check) and any Hugging Face model

# mmpretrain's (each file's name ends in the first 8 hex digits of its SHA-256).
# name -> (what it is, its path under MMPRETRAIN).
MMPRETRAIN = 'https://download.openmmlab.com/mmselfsup/1.x/simmim/'
_B100 = 'simmim_swin-base_8xb256-amp-coslr-100e_in1k-192'
_B800 = 'simmim_swin-base_16xb128-amp-coslr-800e_in1k-192'
_L800 = 'simmim_swin-large_16xb128-amp-coslr-800e_in1k-192'
_B100_FT = 'swin-base_ft-8xb256-coslr-100e_in1k'
_B800_FT = 'swin-base_ft-8xb256-coslr-100e_in1k-224'
_L800_FT = 'swin-large_ft-8xb256-coslr-ws14-100e_in1k-224'
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
        'Swin-B ImageNet-1k classifier, 800-epoch pretraining (file named 224px): top-1 83.8',
        f'{_B800}/{_B800_FT}/{_B800_FT}_20221208-155cc6e6.pth'),
    'swin-large-w14_simmim-800e-pre_8xb256-coslr-100e_in1k': (
        'Swin-L ImageNet-1k classifier, 800-epoch pretraining, 224px, window 14: top-1 84.8',
        f'{_L800}/{_L800_FT}/{_L800_FT}_20220916-d4865790.pth'),
}
HUB_ID = re.compile(r'(?:hf-hub:)?([\w.-]+/[\w.-]+)(?:@(\S+))?')  # owner/name[@revision]
FILE_TYPES = ('.pth', '.pt', '.bin', '.safetensors', '.json', '.tar')  # names of missing files


def download(name, progress=os.environ.get('RANK', '0') == '0'):
    """A published name -> its file in torch's hub cache; a Hugging Face model id -> the folder of
    its files in Hugging Face's cache. Downloaded the first time; the processes of a machine share
    the work (one downloads, the others wait for it)."""
    if name in PUBLISHED:
        return download_published(name, progress)
    hub = HUB_ID.fullmatch(name)
    if hub and not name.lower().endswith(FILE_TYPES):
        return download_from_hub(*hub.groups())
    close = difflib.get_close_matches(name, PUBLISHED, n=3, cutoff=0.4)
    hint = f"; close ones: {', '.join(close)}" if close else " (README lists them)"
    raise ValueError(f"'{name}' does not exist, nor is it a published name{hint} or a Hugging "
                     f"Face model id (owner/name)")


def download_from_hub(repo, revision=None):
    """owner/name at revision (a branch, tag or commit; default main) -> the folder of its
    config.json and weights (model.safetensors, else pytorch_model.bin), by huggingface_hub: its
    cache, HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE and file locks."""
    import huggingface_hub
    from huggingface_hub import errors
    name = repo + (f'@{revision}' if revision else '')
    get = lambda f, **kw: huggingface_hub.hf_hub_download(repo, f, revision=revision, **kw)
    try:
        local = False  # True: the Hub did not answer, so the cache's files only
        try:
            weights = get('model.safetensors')
        except errors.EntryNotFoundError as e:  # an older repository's .bin, or no answer
            local = isinstance(e, errors.LocalEntryNotFoundError)
            try:
                weights = get('pytorch_model.bin', local_files_only=local)
            except errors.LocalEntryNotFoundError:
                if local:  # neither cached: the Hub's silence is the reason
                    raise e from None
                raise
        try:
            get('config.json', local_files_only=local)
        except errors.EntryNotFoundError:  # weights alone: they show the architecture
            pass
        return os.path.dirname(weights)
    except Exception as e:
        raise DownloadError(f"cannot download '{name}' from the Hugging Face Hub: "
                            f"{hub_failure(e, repo, revision)}") from None


def hub_failure(error, repo, revision):
    """What went wrong in a Hugging Face download, and the fix, in a few words."""
    from huggingface_hub import constants, errors
    if isinstance(error, errors.RevisionNotFoundError):
        return f"{repo} has no revision '{revision}' (a branch, tag or commit)"
    if isinstance(error, errors.RepositoryNotFoundError):
        return (f"no file or folder '{repo}' here, nor a model {repo} at {constants.ENDPOINT} (or "
                f"it is private or gated: log in with hf auth login, or set HF_TOKEN)")
    if getattr(getattr(error, 'response', None), 'status_code', None) in (401, 403):
        return f"{constants.ENDPOINT} refused it: log in with hf auth login, or set HF_TOKEN"
    if isinstance(error, errors.RemoteEntryNotFoundError):
        return f"{repo} holds neither model.safetensors nor pytorch_model.bin"
    if isinstance(error, errors.LocalEntryNotFoundError):
        cause = error.__cause__ or error.__context__
        why = 'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else \
            f"{constants.ENDPOINT} did not answer ({first_line(cause)[:100]})"
        return (f"no file or folder '{repo}' here; {why}, and Hugging Face's cache "
                f"({constants.HF_HUB_CACHE}) does not hold it: run the command once where there is "
                f"a network (then HF_HUB_OFFLINE=1 reads the cache without asking)")
    if isinstance(error, OSError) and error.errno and \
            not isinstance(error, errors.HfHubHTTPError):  # the cache's disk or folder
        fix = 'make room there' if error.errno == errno.ENOSPC else 'fix its permissions'
        return f"{first_line(error)}: {fix}, or set HF_HOME to another folder"
    return first_line(error)


def download_published(name, progress):
    """download()'s published name: one file, checked against the SHA-256 its name carries; a
    failed or killed download leaves nothing under its name."""
    url = PUBLISHED[name][1]
    url = url if '://' in url else MMPRETRAIN + url
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    path = os.path.join(folder, url.rsplit('/', 1)[1])
    if os.path.isfile(path):  # a read-only shared cache needs no lock
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        with filelock.FileLock(path + '.lock'):
            if not os.path.isfile(path):
                fetch(name, url, path, progress)
    except OSError as e:  # here: a full disk, an unwritable cache
        raise DownloadError(f"cannot store '{name}' in {folder} ({e.strerror or e}): make room "
                            f"there, or set TORCH_HOME to another folder") from None
    return path


def fetch(name, url, path, progress):
    """One file into path, with one line for each way it can fail."""
    folder = os.path.dirname(path)
    digest = re.search(r'-([0-9a-f]{8})\.\w+$', url)[1]
    partial = os.path.join(folder, f'.{os.getpid()}.{os.path.basename(path)}')
    yourself = f"download it yourself and pass the path (or put the file, named as in the URL, " \
               f"into {folder})"
    try:
        torch.hub.download_url_to_file(url, partial, digest, progress)
        os.replace(partial, path)
    except Exception as e:
        reason = first_line(getattr(e, 'reason', None) or e)
        if isinstance(e, urllib.error.HTTPError):
            raise DownloadError(f"cannot download '{name}': {url} answered {e.code} {e.reason}; "
                                f"{yourself}") from None
        if isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError)):
            raise DownloadError(f"cannot download '{name}' from {url} ({reason}): where there is "
                                f"a network, {yourself}") from None
        if isinstance(e, OSError):
            raise
        what = reason
        if 'invalid hash' in reason:
            what = f"cut short or altered: its SHA-256 does not start with {digest}"
        raise DownloadError(f"the download of '{name}' from {url} is not the published file "
                            f"({what}): deleted; try again, or {yourself}") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
